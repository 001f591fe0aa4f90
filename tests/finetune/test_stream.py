"""`finetune run --stream`: training on WebDataset shards read as a stream, validation from unpacked shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mmcache.errors import MMCacheError
from mmcache.extract.base import DecodeError
from mmcache.extract.decode import decode_image
from mmcache.finetune.run import FinetuneConfig, finetune
from tests.data.layouts import write_shard

NAMES = ("neg", "pos")


def png(label: int, i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200 if label else 20, (i * 37) % 255, 90)).save(buf, format="PNG")
    return buf.getvalue()


def members(prefix: str, n: int, bad: int = 0) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for i in range(n):
        y = i % 2
        label = {"cls": str(NAMES[y])} if i % 3 == 0 else {"json": {"label": NAMES[y]}}
        out[f"{prefix}{i:04d}"] = {"png": png(y, i), "txt": f"{NAMES[y]} caption {i}", **label}
    for i in range(bad):  # an undecodable image: skipped and counted
        out[f"{prefix}bad{i}"] = {"jpg": b"\xff\xd8 not a jpeg", "txt": "x", "json": {"label": "pos"}}
    return out


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.fixture()
def shards(tmp_path: Path) -> tuple[Path, Path]:
    train, val = tmp_path / "train", tmp_path / "val"
    for k in range(4):
        write_shard(train / f"train-{k:06d}.tar", members(f"t{k}-", 6, bad=1))
    write_shard(val / "val-000000.tar", members("v", 8))
    write_shard(val / "test-000000.tar", members("e", 6))
    return train, val


def _cfg(train: Path, val: Path, tmp_path: Path, **kw: object) -> FinetuneConfig:
    base = dict(dataset="webdataset", data_dir=str(train / "train-{000000..000003}.tar"), val_data=str(val),
                stream=True, steps_per_epoch=3, encoders={"image": "clip-tiny", "text": "clip-tiny"},
                runs_dir=str(tmp_path / "runs"), epochs=2, batch_size=4, num_workers=0, quiet=True,
                head_hparams={"D": 16}, encoder_lr=1e-3, run_name="s", shuffle_buffer=8)
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def test_streamed_finetune_trains_the_requested_steps_and_writes_metrics(
        shards: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, val = shards
    before = listing(train)
    res = finetune(_cfg(train, val, tmp_path))
    d = Path(res.run_dir)
    metrics = json.loads((d / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"val", "test"}
    assert metrics["splits"]["val"]["label"]["n"] == 8 and metrics["splits"]["test"]["label"]["n"] == 6
    assert 0.0 <= metrics["splits"]["test"]["label"]["accuracy"] <= 1.0
    # 2 epochs x 3 steps x 4 rows, every batch full although undecodable samples were drawn
    assert metrics["train"]["samples"] == 24
    assert metrics["train"]["stream_skipped"] >= 1
    assert len(json.loads((d / "curves.json").read_text())) == 2
    assert (d / "encoders.safetensors").is_file()
    err = capsys.readouterr().err
    assert "skipped (the image is corrupt or not an image" in err and "streamed training samples skipped" in err
    assert listing(train) == before  # the training shards' folder is untouched: nothing unpacked
    config = json.loads((d / "config.json").read_text())
    assert config["stream"] is True and config["resolved"]["labels"]["tasks"] == {"label": list(NAMES)}


def test_epoch_length_from_sizes_json_with_loader_workers(shards: tuple[Path, Path], tmp_path: Path) -> None:
    train, val = shards
    (train / "sizes.json").write_text(json.dumps({f"train-{k:06d}.tar": 7 for k in range(4)}))  # 28 samples
    res = finetune(_cfg(train, val, tmp_path, steps_per_epoch=None, epochs=1, num_workers=2, batch_size=8))
    metrics = json.loads((Path(res.run_dir) / "metrics.json").read_text())
    assert metrics["train"]["samples"] == 32  # 28 samples -> 4 steps of 8 rows


@pytest.mark.parametrize(("change", "message"), [
    ({"dataset": "demo"}, "--stream reads WebDataset shards"),
    ({"val_data": None}, "--stream needs the training shards"),
    ({"steps_per_epoch": None}, "an endless stream needs an epoch length"),
    ({"encoders": {"video": "r3d-tiny"}}, "--video needs the unpacked shards"),
    ({"data_dir": "nowhere/train-{0..1}.tar"}, r"nowhere/train-0\.tar: shard not found"),
    ({"val_data": "nowhere"}, r"^--val-data nowhere: not found; pass the folder of the validation"),
])
def test_stream_errors(shards: tuple[Path, Path], tmp_path: Path, change: dict, message: str) -> None:
    train, val = shards
    with pytest.raises(MMCacheError, match=message):
        finetune(_cfg(train, val, tmp_path, **change))


def test_a_label_file_beside_the_shards_sets_the_classes(shards: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The validation rows are mapped into the training shards' label space (here with a class val lacks)."""
    train, val = shards
    (train / "labels.json").write_text(json.dumps({"tasks": {"label": ["zero", "neg", "pos"]}}))
    write_shard(val / "train-000000.tar", members("x", 3))  # training rows in the validation folder: unused
    res = finetune(_cfg(train, val, tmp_path, epochs=1, steps_per_epoch=1, quiet=False))
    config = json.loads((Path(res.run_dir) / "config.json").read_text())
    assert config["resolved"]["labels"]["tasks"] == {"label": ["zero", "neg", "pos"]}
    assert res.head.tasks == {"label": 3}  # type: ignore[union-attr]
    assert "3 rows of split(s) ['train'] are not used" in capsys.readouterr().err


def test_predict_without_data_reads_the_test_rows_of_the_runs_val_data(shards: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    """`mmcache predict --run RUN` on a streamed run: the test split is the --val-data shards' (the training
    pattern is no dataset folder), its labels read in the run's label space (here ordered otherwise)."""
    import csv

    from mmcache.predict import predict_to_csv

    train, val = shards
    (train / "labels.json").write_text(json.dumps({"tasks": {"label": ["pos", "neg"]}}))
    res = finetune(_cfg(train, val, tmp_path, epochs=1, steps_per_epoch=1, device="cpu"))
    out, preds = predict_to_csv(res.run_dir, out=tmp_path / "p.csv", device="cpu", progress=False)
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["id"] for r in rows) == [f"e{i:04d}" for i in range(6)]  # the test shard's rows
    assert [r["label"] for r in sorted(rows, key=lambda r: r["id"])] == [NAMES[i % 2] for i in range(6)]
    metrics = json.loads((Path(res.run_dir) / "metrics.json").read_text())
    accuracy = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(metrics["splits"]["test"]["label"]["accuracy"])


def test_an_empty_size_index_is_an_error(shards: tuple[Path, Path], tmp_path: Path) -> None:
    train, val = shards
    (train / "sizes.json").write_text(json.dumps({f"train-{k:06d}.tar": 0 for k in range(4)}))
    with pytest.raises(MMCacheError, match="sizes.json counts no samples"):
        finetune(_cfg(train, val, tmp_path, steps_per_epoch=None))


def test_decode_image_reads_an_image_files_bytes() -> None:
    im = decode_image(png(1, 0), {})
    assert im.size == (8, 8) and im.getpixel((0, 0))[0] == 200
    with pytest.raises(DecodeError, match="corrupt or not an image"):
        decode_image(b"\xff\xd8 nope", {})
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"", {})


def test_a_stopped_streamed_run_resumes_from_its_last_checkpoint(shards: tuple[Path, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from mmcache.finetune.stream import TrainStream

    train, val = shards
    take, seen = TrainStream.take, []

    def stop_at_fifth_batch(self: TrainStream, *args: object) -> None:
        seen.append(1)
        if len(seen) == 5:  # epoch 2, second batch: its first step is checkpointed
            raise KeyboardInterrupt
        take(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(TrainStream, "take", stop_at_fifth_batch)
    cfg = _cfg(train, val, tmp_path, save_every=1, quiet=False)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg)
    monkeypatch.setattr(TrainStream, "take", take)
    res = finetune(cfg)
    assert "resuming" in capsys.readouterr().err
    metrics = json.loads((Path(res.run_dir) / "metrics.json").read_text())
    assert metrics["train"]["samples"] == 24  # 4 rows before the stop + the 2 batches left of epoch 2
    assert [c["epoch"] for c in json.loads((Path(res.run_dir) / "curves.json").read_text())] == [1, 2]


def test_errors_in_loader_workers_arrive_as_one_line(shards: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mmcache.data import stream as stream_mod

    train, val = shards
    monkeypatch.setattr(stream_mod, "MAX_SKIPPED_IN_A_ROW", 1)  # the workers are forked: they see it too
    with pytest.raises(MMCacheError) as e:
        finetune(_cfg(train, val, tmp_path, num_workers=1, epochs=1))
    assert str(e.value).startswith("1 streamed samples or shard reads in a row could not be used (last: ")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(MMCacheError, match=r"4 shard\(s\) for 1 process\(es\) x 6 DataLoader worker\(s\)"):
        finetune(_cfg(train, val, tmp_path, num_workers=6, run_name="w"))


@pytest.mark.slow
def test_torchrun_two_processes_stream_their_own_shards(shards: tuple[Path, Path], tmp_path: Path) -> None:
    """2 processes (gloo) x 1 loader worker: every process draws its full batches; skips of both are summed."""
    import os
    import subprocess
    import sys

    train, val = shards
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "mmcache.finetune.cli", "run", "--dataset", "webdataset", "--stream",
           "--data-dir", str(train / "train-{000000..000003}.tar"), "--val-data", str(val), "--steps-per-epoch", "2",
           "--batch-size", "4", "--epochs", "1", "--num-workers", "1", "--image", "clip-tiny", "--text", "clip-tiny",
           "--D", "16", "--runs-dir", str(tmp_path / "runs"), "--run-name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    train_stats = json.loads((tmp_path / "runs" / "webdataset" / "ddp" / "metrics.json").read_text())["train"]
    assert train_stats["world_size"] == 2 and train_stats["samples"] == 16  # 2 steps x 4 rows x 2 processes
    assert train_stats["stream_skipped"] >= 2  # each process read shards with an undecodable image
    assert "[rank 1]" in res.stderr  # rank 1 names its own skips
