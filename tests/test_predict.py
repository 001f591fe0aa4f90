"""Prediction on new data: `mmcache predict` / `heads predict --data` / `Predictor`, for cached and fine-tuned runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmcache.data.base import load_dataset
from mmcache.data.demo import generate_demo
from mmcache.errors import MMCacheError
from mmcache.extract.runner import Request, extract
from mmcache.finetune.run import FinetuneConfig, finetune
from mmcache.heads.train import TrainConfig, predict, train
from mmcache.predict import Predictor, predict_to_csv


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A demo dataset, its clip-tiny stores, a `heads train` run on them, and a table of new posts."""
    root = tmp_path_factory.mktemp("predict")
    demo = generate_demo(root / "demo", n=60, seed=5)
    ds = load_dataset("demo", demo)
    cache = root / "cache"
    extract(ds, [Request("image", "clip", "clip-tiny"), Request("text", "clip", "clip-tiny")], cache_dir=cache,
            num_workers=0, progress=False)
    res = train(TrainConfig(dataset="demo", modalities={"image": "clip", "text": "clip"}, cache_dir=str(cache),
                            runs_dir=str(root / "runs"), head_hparams={"D": 32}, epochs=5, run_name="h", quiet=True))
    rows = [r for r in _read(demo / "data.csv") if r["split"] == "test"]
    (root / "bad.jpg").write_bytes(b"not an image at all")
    new = [{"id": r["id"], "image": str(demo / r["image"]), "text": r["text"]} for r in rows]
    new += [{"id": "broken", "image": str(root / "bad.jpg"), "text": "i love this"},
            {"id": "gone", "image": str(root / "missing.jpg"), "text": "i saw this"}]
    table = root / "new.csv"
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "text"])
        w.writeheader()
        w.writerows(new)
    return {"root": root, "demo": demo, "cache": cache, "run": res.run_dir, "table": table}  # type: ignore[dict-item]


def test_unlabelled_table_gives_the_cached_runs_predictions(setup: dict[str, Path], tmp_path: Path) -> None:
    out, preds = predict_to_csv(setup["run"], data=setup["table"], out=tmp_path / "preds.csv",
                                cache_dir=tmp_path / "pc", progress=False)
    rows = _read(out)
    assert list(rows[0]) == ["id", "predicted", "p_negative", "p_neutral", "p_positive", "reason"]
    by_id = {r["id"]: r for r in rows}
    # The same probabilities as `heads predict` on the cached test split (same extractor, same float16 rounding).
    ref = {r["id"]: r for r in _read(predict(setup["run"], split="test", out=tmp_path / "ref.csv", device="cpu"))}
    assert set(ref) == set(by_id) - {"broken", "gone"}
    for sid, r in ref.items():
        assert by_id[sid]["predicted"] == r["predicted"]
        for c in ("p_negative", "p_neutral", "p_positive"):
            assert float(by_id[sid][c]) == pytest.approx(float(r[c]), abs=1e-4)
        assert by_id[sid]["reason"] == ""
    # Inputs that cannot be decoded are listed with their reason, never dropped.
    for sid in ("broken", "gone"):
        assert by_id[sid]["predicted"] == "" and by_id[sid]["p_negative"] == "" and by_id[sid]["reason"]
    assert "image" in by_id["gone"]["reason"]
    assert len(rows) == len(preds) == len(ref) + 2
    # A second call reuses the cache: nothing is extracted again, the same file comes out.
    again, _ = predict_to_csv(setup["run"], data=setup["table"], out=tmp_path / "again.csv",
                              cache_dir=tmp_path / "pc", progress=False)
    assert again.read_text() == out.read_text()


def test_labels_and_splits_where_the_data_has_them(setup: dict[str, Path], tmp_path: Path) -> None:
    rows = _read(setup["demo"] / "data.csv")[:6]
    table = tmp_path / "lab.jsonl"
    rows[0]["label"] = ""  # an unlabelled row among labelled ones
    table.write_text("".join(json.dumps({**r, "image": str(setup["demo"] / r["image"])}) + "\n" for r in rows))
    out, _ = predict_to_csv(setup["run"], data=table, out=tmp_path / "p.csv", cache_dir=tmp_path / "pc",
                            progress=False)
    got = _read(out)
    assert list(got[0])[:4] == ["id", "split", "label", "predicted"]
    assert [r["label"] for r in got] == ["", *(r["label"] for r in rows[1:])]
    assert [r["split"] for r in got] == [r["split"] for r in rows]
    out, _ = predict_to_csv(setup["run"], data=table, split="train", out=tmp_path / "t.csv",
                            cache_dir=tmp_path / "pc", progress=False)
    assert {r["id"] for r in _read(out)} == {r["id"] for r in rows if r["split"] == "train"}
    bad = tmp_path / "bad.csv"
    bad.write_text(f"image,text,label\n{setup['root'] / 'bad.jpg'},hi,angry\n")
    with pytest.raises(MMCacheError, match=r"bad.csv, line 2: label 'angry' is not in the label space"):
        predict_to_csv(setup["run"], data=bad, cache_dir=tmp_path / "pc", progress=False)


def test_image_folder_and_single_image(setup: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "posts"
    (folder / "sub").mkdir(parents=True)
    images = sorted((setup["demo"] / "images").glob("*.jpg"))[:2]
    (folder / "a.jpg").write_bytes(images[0].read_bytes())
    (folder / "a.txt").write_text("i love this")
    (folder / "sub" / "b.jpg").write_bytes(images[1].read_bytes())
    (folder / "sub" / "b.txt").write_text("i hate this")
    out, preds = predict_to_csv(setup["run"], data=folder, cache_dir=tmp_path / "pc", progress=False)
    assert out == setup["run"] / "predictions_posts_all.csv"
    assert [p.id for p in preds] == ["a.jpg", "sub/b.jpg"] and all(p.label for p in preds)
    out.unlink()
    # The run reads text too: an image alone cannot be predicted, and says why.
    with pytest.raises(MMCacheError, match=r"the run reads text features \(clip\), but no row of .*a.jpg has text"):
        predict_to_csv(setup["run"], data=folder / "a.jpg", cache_dir=tmp_path / "pc", progress=False)


def test_predictor_in_memory(setup: dict[str, Path], tmp_path: Path) -> None:
    from mmcache import Predictor as Exported

    assert Exported is Predictor
    rows = [r for r in _read(setup["table"])]
    pred = Predictor.load(setup["run"], device="cpu")
    got = pred.predict([{"image": r["image"], "text": r["text"], "id": r["id"]} for r in rows])
    _, ref = predict_to_csv(setup["run"], data=setup["table"], out=tmp_path / "p.csv", cache_dir=tmp_path / "pc",
                            progress=False)
    assert [p.id for p in got] == [p.id for p in ref]
    for a, b in zip(got, ref, strict=True):
        assert a.label == b.label and (a.error is None) == (b.error is None)
        for c, v in a.probs.items():
            assert v == pytest.approx(b.probs[c], abs=1e-4)
        if a.label is not None:
            assert sum(a.probs.values()) == pytest.approx(1.0) and a.tasks["label"]["label"] == a.label
    assert got[-1].error and got[-1].label is None  # the missing image
    with pytest.raises(MMCacheError, match="unknown field"):
        pred.predict([{"picture": "x.jpg"}])


def test_a_changed_weights_file_is_refused(setup: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip

    from mmcache.extract.clip import TINY_CLIP_CFG

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    weights = tmp_path / "clip.bin"
    torch.manual_seed(0)
    torch.save(open_clip.model.CLIP(**TINY_CLIP_CFG).state_dict(), weights)
    ds = load_dataset("demo", setup["demo"])
    cache = tmp_path / "cache"
    extract(ds, [Request("image", "w", "clip-tiny", {"weights": str(weights)})], cache_dir=cache, num_workers=0,
            progress=False)
    res = train(TrainConfig(dataset="demo", modalities={"image": "w"}, cache_dir=str(cache),
                            runs_dir=str(tmp_path / "runs"), head_hparams={"D": 16}, epochs=1, run_name="w", quiet=True))
    Predictor.load(res.run_dir, device="cpu")  # type: ignore[arg-type]  # the same file: fine
    torch.manual_seed(1)
    torch.save(open_clip.model.CLIP(**TINY_CLIP_CFG).state_dict(), weights)  # replaced at the same path
    with pytest.raises(MMCacheError, match=r"image/w: .*weights_sha256 changed"):
        Predictor.load(res.run_dir, device="cpu")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ft_run(setup: dict[str, Path]) -> Path:
    res = finetune(FinetuneConfig(dataset="demo", data_dir=str(setup["demo"]),
                                  encoders={"image": "clip-tiny", "text": "clip-tiny"}, lora=True, lora_r=4, epochs=1,
                                  batch_size=16, num_workers=0, head_hparams={"D": 32}, encoder_lr=1e-3,
                                  runs_dir=str(setup["root"] / "runs"), run_name="ft", quiet=True))
    assert res is not None and res.run_dir is not None
    return res.run_dir


def test_finetuned_run_predicts_its_test_split_and_new_data(setup: dict[str, Path], ft_run: Path,
                                                             tmp_path: Path) -> None:
    # `heads predict --run <finetune run>`: the run's dataset, test split, from raw files (LoRA re-applied).
    res = CliRunner().invoke(__import__("mmcache.cli", fromlist=["app"]).app,
                             ["heads", "predict", "--run", str(ft_run), "--out", str(tmp_path / "t.csv"),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = _read(tmp_path / "t.csv")
    assert list(rows[0])[:3] == ["id", "label", "predicted"]
    metrics = json.loads((ft_run / "metrics.json").read_text())["splits"]["test"]["label"]
    acc = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
    assert len(rows) == metrics["n"] and acc == pytest.approx(metrics["accuracy"])
    # New data through `mmcache predict`, and in memory.
    res = CliRunner().invoke(__import__("mmcache.cli", fromlist=["app"]).app,
                             ["predict", "--run", str(ft_run), "--data", str(setup["table"]), "--out",
                              str(tmp_path / "n.csv"), "--cache-dir", str(tmp_path / "pc"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "2 could not be encoded" in res.output
    got = {r["id"]: r for r in _read(tmp_path / "n.csv")}
    mem = {p.id: p for p in Predictor.load(ft_run, device="cpu").predict(
        [{"id": r["id"], "image": r["image"], "text": r["text"]} for r in _read(setup["table"])])}
    for sid, r in got.items():
        assert (r["predicted"] or None) == mem[sid].label
        if mem[sid].label:
            assert float(r["p_positive"]) == pytest.approx(mem[sid].probs["positive"], abs=1e-4)


def test_finetuned_encoder_as_an_extractor_preset(setup: dict[str, Path], ft_run: Path, tmp_path: Path) -> None:
    from mmcache.cache.store import StoreReader
    from mmcache.cli import app

    res = CliRunner().invoke(app, ["extract", "demo", "--data-dir", str(setup["demo"]), "--image",
                                   f"ft=finetuned:{ft_run}", "--cache-dir", str(tmp_path / "c"), "--num-workers", "0",
                                   "--dtype", "float32", "--no-progress", "--limit", "4"])
    assert res.exit_code == 0, res.output
    reader = StoreReader(tmp_path / "c" / "demo" / "image" / "ft.h5")
    spec = reader.spec
    assert spec["family"] == "finetuned" and spec["mode"] == "lora" and len(spec["weights_sha256"]) == 64
    assert spec["run"] == str(ft_run.absolute()) and spec["base"]["preset"] == "clip-tiny"
    # The stored features are the fine-tuned encoder's (LoRA applied), not the base preset's.
    from mmcache.extract.base import build_extractor

    ids = reader.ids
    stored = torch.from_numpy(reader.load(ids, keys=["pooled"])["pooled"])
    base = build_extractor("clip-tiny", "image").eval()
    tuned = Predictor.load(ft_run, device="cpu").extractors["image"]
    ds = load_dataset("demo", setup["demo"]).by_id()
    from PIL import Image

    x = torch.stack([tuned.preprocess({"image": Image.open(ds[i].image).convert("RGB")}) for i in ids])
    with torch.no_grad():
        want, plain = tuned(x)["pooled"], base(x)["pooled"]
    assert torch.allclose(stored, want, atol=1e-4) and not torch.allclose(stored, plain, atol=1e-4)
    with pytest.raises(MMCacheError, match="not a `finetune run`"):
        build_extractor(f"finetuned:{setup['run']}", "image")
    with pytest.raises(MMCacheError, match="fine-tuned image, text encoders, not 'audio'"):
        build_extractor(f"finetuned:{ft_run}", "audio")
    import shutil

    partial = tmp_path / "copied"  # a run folder copied without its encoders' weights
    shutil.copytree(ft_run, partial, ignore=shutil.ignore_patterns("encoders.safetensors"))
    with pytest.raises(MMCacheError, match="weights are missing; copy the run folder whole"):
        build_extractor(f"finetuned:{partial}", "image")


def test_hybrid_finetuned_run_predicts_with_its_stored_modality(setup: dict[str, Path], tmp_path: Path) -> None:
    """A `finetune run` that read image features from a store: the store's extractor encodes new images."""
    res = finetune(FinetuneConfig(dataset="demo", data_dir=str(setup["demo"]), encoders={"text": "clip-tiny"},
                                  stores={"image": "clip"}, cache_dir=str(setup["cache"]), lora=True, lora_r=4,
                                  epochs=1, batch_size=16, num_workers=0, head_hparams={"D": 32}, encoder_lr=1e-3,
                                  runs_dir=str(tmp_path / "runs"), run_name="hy", quiet=True))
    assert res is not None and res.run_dir is not None
    pred = Predictor.load(res.run_dir, device="cpu")
    assert pred.extractors["image"].preset == "clip-tiny" and pred.dtypes["image"] == "float16"
    _, preds = predict_to_csv(res.run_dir, data=setup["table"], out=tmp_path / "p.csv", cache_dir=tmp_path / "pc",
                              progress=False)
    by_id = {p.id: p for p in preds}
    assert by_id["broken"].label is None and "image" in (by_id["broken"].error or "")
    assert sum(p.label is not None for p in preds) == len(preds) - 2
    # The test split through the raw files gives the run's own test metrics.
    out, _ = predict_to_csv(res.run_dir, out=tmp_path / "t.csv", cache_dir=tmp_path / "pc", progress=False)
    rows = _read(out)
    metrics = json.loads((res.run_dir / "metrics.json").read_text())["splits"]["test"]["label"]
    assert sum(r["label"] == r["predicted"] for r in rows) / len(rows) == pytest.approx(metrics["accuracy"])


def test_predictor_refuses_duplicate_row_ids(setup: dict[str, Path]) -> None:
    with pytest.raises(MMCacheError, match=r"duplicate row ids \['a'\]"):
        Predictor.load(setup["run"], device="cpu").predict([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])


def test_a_cached_run_predicts_after_its_training_stores_are_gone(setup: dict[str, Path], tmp_path: Path) -> None:
    """The run records its stores' specs, so new data can be predicted without the training cache."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(setup["cache"], copy)
    res = train(TrainConfig(dataset="demo", modalities={"image": "clip", "text": "clip"}, cache_dir=str(copy),
                            runs_dir=str(tmp_path / "runs"), head_hparams={"D": 16}, epochs=2, run_name="gone",
                            quiet=True))
    kept = json.loads((res.run_dir / "config.json").read_text())["resolved"]["store_specs"]  # type: ignore[operator]
    assert kept["image/clip"]["spec"]["preset"] == "clip-tiny" and kept["text/clip"]["dtype"]
    shutil.rmtree(copy)
    out, _ = predict_to_csv(res.run_dir, data=setup["table"], out=tmp_path / "p.csv", cache_dir=tmp_path / "pc",
                            progress=False)
    rows = _read(out)
    assert sum(1 for r in rows if r["predicted"]) == len(rows) - 2  # all but the two undecodable inputs


def test_summary_counts_failed_inputs_by_kind(setup: dict[str, Path], tmp_path: Path) -> None:
    """Missing images at different paths are one kind of failure in the summary, as extraction counts them."""
    from mmcache.predict import summary_line

    table = tmp_path / "gone.csv"
    table.write_text("id,image,text\n" + "".join(f"g{i},{tmp_path / f'missing{i}.jpg'},i saw this\n" for i in range(3)))
    out, preds = predict_to_csv(setup["run"], data=table, out=tmp_path / "p.csv", cache_dir=tmp_path / "pc",
                                progress=False)
    line = summary_line(out, preds)
    assert "0 of 3 inputs predicted; 3 could not be encoded (reason column): 3 x image: " in line
    assert "<image>" in line and "missing0.jpg" not in line
    assert all(p.error and "missing" in p.error for p in preds)  # the CSV keeps each input's own reason


def test_run_of_a_table_without_data_says_what_to_pass(setup: dict[str, Path], tmp_path: Path) -> None:
    """A run trained on a table (named after its file, not a registered adapter) and no --data: one line saying
    to pass --data, not 'unknown dataset'."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "dataset": "tweets"}))
    with pytest.raises(MMCacheError, match=r"the run's dataset 'tweets' is not a registered dataset .*pass --data FILE"):
        predict_to_csv(run, cache_dir=tmp_path / "pc", progress=False)


def test_out_that_is_a_folder_is_refused_before_any_work(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MMCacheError, match=r"--out .* is a folder; give a file name"):
        predict_to_csv(setup["run"], data=setup["table"], out=tmp_path, cache_dir=tmp_path / "pc", progress=False)
    assert not (tmp_path / "pc").exists()  # nothing was extracted
    with pytest.raises(MMCacheError, match=r"--out .* is a folder; give a file name"):
        predict(setup["run"], split="test", out=tmp_path, device="cpu")


def test_a_dataset_labelling_other_tasks_is_warned_about(setup: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A dataset whose tasks are none of the run's is predicted (its labels cannot score the run), with a
    warning saying so instead of dropping its labels without a word."""
    rows = _read(setup["demo"] / "data.csv")[:4]
    table = tmp_path / "mood.csv"
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "text", "mood", "split"])
        w.writeheader()
        w.writerows({"id": r["id"], "image": str(setup["demo"] / r["image"]), "text": r["text"],
                     "mood": "calm" if i % 2 else "tense", "split": "test"} for i, r in enumerate(rows))
    out, preds = predict_to_csv(setup["run"], dataset="table", data_dir=table, dataset_options={"label_column": "mood"},
                                split="all", out=tmp_path / "p.csv", cache_dir=tmp_path / "pc", progress=False)
    assert "warning: 'mood' labels task(s) ['mood'], the run predicts ['label']: the predictions carry no true " \
           "label" in capsys.readouterr().err
    got = _read(out)
    assert len(got) == len(preds) == 4 and "label" not in got[0] and all(r["predicted"] for r in got)
