"""Prediction with a hybrid fine-tuned run: VisualBERT trained live over stored Faster R-CNN regions."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mmcache.cache.store import StoreReader, store_path
from mmcache.data.base import load_dataset
from mmcache.data.demo import generate_demo
from mmcache.errors import MMCacheError
from mmcache.extract.base import build_extractor
from mmcache.extract.runner import Request, extract
from mmcache.finetune.run import FinetuneConfig, finetune
from mmcache.predict import Predictor, predict_to_csv


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", autouse=True)
def _user_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Weight hashes are cached under the test's tmp folder, never in ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny hybrid run (VisualBERT over a frcnn store whose detector weights are a local file), trained on a
    cache that is deleted afterwards, the run's own test-split probabilities, and a table of new rows."""
    root = tmp_path_factory.mktemp("predict-hybrid")
    demo = generate_demo(root / "demo", n=48, seed=7, size=48)
    ds = load_dataset("demo", demo)
    weights = root / "frcnn.pth"
    torch.save(build_extractor("frcnn-tiny", "image").model.state_dict(), weights)
    cache = root / "cache"
    extract(ds, [Request("image", "frcnn", "frcnn-tiny", {"weights": str(weights)})], cache_dir=cache, batch_size=8,
            num_workers=0, progress=False)
    cfg = FinetuneConfig(dataset="demo", data_dir=str(demo), cache_dir=str(cache), encoders={"text": "visualbert-tiny"},
                         stores={"image": "frcnn"}, epochs=2, batch_size=8, num_workers=0, quiet=True,
                         encoder_lr=1e-3, lr=3e-3, warmup=0.0, runs_dir=str(root / "runs"), run_name="vb", device="cpu")
    res = finetune(cfg)
    assert res is not None and res.run_dir is not None
    run = Path(res.run_dir)
    # The run's own test predictions, through the training code and the training store.
    from mmcache.finetune.preset import load_finetuned_encoder
    from mmcache.finetune.run import CachedInputs, LiveModel, evaluate

    reader = StoreReader(store_path(cache, "demo", "image", "frcnn"))
    enc = load_finetuned_encoder(run, "text", consumer=True)[0]
    model = LiveModel({"text": enc}, res.head, CachedInputs({"image": reader}, {"image": ["tokens", "boxes", "mask"]},
                                                            []))
    test = [s for s in ds.split("test") if s.labels]
    ids, logits = evaluate(model, test, cfg, ["label"], torch.device("cpu"))
    own = dict(zip(ids, torch.softmax(torch.from_numpy(logits["label"]).double(), dim=1).numpy(), strict=True))
    spec_hash = reader.attrs["spec_hash"]
    shutil.rmtree(cache)  # prediction needs the run folder only
    table = root / "new.csv"
    rows = [r for r in _read(demo / "data.csv") if r["split"] == "test"]
    (root / "bad.jpg").write_bytes(b"not an image")
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "text"])
        w.writeheader()
        w.writerows([{"id": r["id"], "image": str(demo / r["image"]), "text": r["text"]} for r in rows])
        w.writerow({"id": "broken", "image": str(root / "bad.jpg"), "text": "i love this"})
    return {"run": run, "own": own, "table": table, "weights": weights, "spec_hash": spec_hash, "demo": demo,
            "classes": json.loads((run / "config.json").read_text())["resolved"]["labels"]["tasks"]["label"]}


def test_hybrid_run_predicts_new_rows_as_its_own_test_predictions(hybrid: dict[str, Any], tmp_path: Path) -> None:
    run = hybrid["run"]
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["store_specs"]["image/frcnn"]["spec"]["weights_sha256"]
    pred = Predictor.load(run, device="cpu")
    assert pred.extractors["image"].spec_hash() == hybrid["spec_hash"] and pred.dtypes["image"] == "float16"
    out, preds = predict_to_csv(run, data=hybrid["table"], out=tmp_path / "p.csv", cache_dir=tmp_path / "pc",
                                device="cpu", progress=False)
    # The regions of the new rows were extracted into the prediction's own cache, with the run's frcnn spec.
    stores = list((tmp_path / "pc").rglob("*.h5"))
    assert len(stores) == 1 and StoreReader(stores[0]).attrs["spec_hash"] == hybrid["spec_hash"]
    by_id = {p.id: p for p in preds}
    assert by_id["broken"].label is None and "image" in (by_id["broken"].error or "")
    own = hybrid["own"]
    assert set(own) == {p.id for p in preds if p.label is not None} and len(own) >= 5
    classes = hybrid["classes"]
    for sid, p in own.items():
        got = [by_id[sid].probs[c] for c in classes]
        assert got == pytest.approx(list(p), abs=1e-4), sid
    # The same in memory (regions computed in the same batch as the text).
    mem = Predictor.load(run, device="cpu").predict(
        [{"id": r["id"], "image": r["image"], "text": r["text"]} for r in _read(hybrid["table"])], batch_size=4)
    for p in mem:
        if p.id == "broken":
            assert p.label is None and "image" in (p.error or "")
            continue
        assert [p.probs[c] for c in classes] == pytest.approx(list(own[p.id]), abs=1e-4)
    rows = {r["id"]: r for r in _read(out)}
    assert rows["broken"]["predicted"] == "" and rows["broken"]["reason"]


def test_a_changed_weights_file_is_refused(hybrid: dict[str, Any], tmp_path: Path) -> None:
    run, weights = hybrid["run"], hybrid["weights"]
    saved = weights.read_bytes()
    state = torch.load(weights)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 1.0
    torch.save(state, weights)
    try:
        with pytest.raises(MMCacheError, match=r"image/frcnn: .*weights_sha256 changed") as err:
            predict_to_csv(run, data=hybrid["table"], cache_dir=tmp_path / "pc", device="cpu", progress=False)
        assert "\n" not in str(err.value)
    finally:
        weights.write_bytes(saved)
    enc = run / "encoders.safetensors"
    saved = enc.read_bytes()
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(enc))
    tensors = {k: v + 0.5 if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(enc))
    try:
        with pytest.raises(MMCacheError, match=r"encoders.safetensors is not the file this run wrote"):
            Predictor.load(run, device="cpu")
    finally:
        enc.write_bytes(saved)
    assert Predictor.load(run, device="cpu").extractors["text"].family == "visualbert"


def test_the_region_reading_encoder_is_no_extractor_on_its_own(hybrid: dict[str, Any]) -> None:
    import mmcache.finetune.preset  # noqa: F401

    with pytest.raises(MMCacheError, match=r"reads image features from a store while it encodes.*mmcache predict"):
        build_extractor(f"finetuned:{hybrid['run']}", "text")
