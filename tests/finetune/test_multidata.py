"""Fine-tuning over several datasets: MMHS150K + Fakeddit through a label map, upsampling, per-source metrics."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmcache.data.base import Sample
from mmcache.errors import MMCacheError
from mmcache.finetune import run as ft
from mmcache.finetune.run import FinetuneConfig, finetune, rows_metrics
from mmcache.heads.metrics import classification_metrics
from tests.data.test_combined import write_map, write_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("multi")
    return write_pair(d / "data", n=6), write_map(d / "map.json")


def _cfg(pair: tuple[Path, Path], tmp_path: Path, **kw: Any) -> FinetuneConfig:
    root, lm = pair
    base: dict[str, Any] = dict(dataset="mmhs150k,fakeddit", data_dir=str(root), dataset_options={"label_map": str(lm)},
                                encoders={"image": "clip-tiny", "text": "clip-tiny"}, runs_dir=str(tmp_path / "runs"),
                                epochs=2, batch_size=4, num_workers=0, quiet=True, head_hparams={"D": 16}, encoder_lr=1e-3,
                                run_name="r")
    base.update(kw)
    return FinetuneConfig(**base)


def test_two_datasets_end_to_end_with_upsampling_and_per_source_metrics(
        pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Counter[str | None]] = []
    loader = ft._loader

    def spy(samples: list[Sample], *a: Any, **k: Any) -> Any:
        if samples and all(s.split == "train" for s in samples):
            seen.append(Counter(s.source for s in samples))
        return loader(samples, *a, **k)

    monkeypatch.setattr(ft, "_loader", spy)
    res = finetune(_cfg(pair, tmp_path, upsample={"mmhs150k": 2}))
    assert res is not None and res.run_dir == tmp_path / "runs" / "mmhs150k-fakeddit" / "r"
    # Each source keeps 5 rows per split; mmhs150k's train rows twice per epoch: 10 + 5 rows an epoch.
    assert seen == [Counter({"mmhs150k": 10, "fakeddit": 5})] * 2
    resolved = res.config["resolved"]
    assert resolved["epoch_rows"] == 15 and resolved["rows"] == {"train": 10, "val": 10, "test": 10}
    assert resolved["sources"] == {"mmhs150k": {"train": 5, "val": 5, "test": 5},
                                   "fakeddit": {"train": 5, "val": 5, "test": 5}}
    assert resolved["train"]["samples"] == 30
    met = json.loads((res.run_dir / "metrics.json").read_text())
    assert met["select"] == {"task": "label", "metric": "macro_f1", "value": met["select"]["value"]}
    for split in ("val", "test"):
        overall = met["splits"][split]["label"]
        per = met["by_source"][split]
        assert set(per) == {"mmhs150k", "fakeddit"}
        assert [per[n]["label"]["n"] for n in ("mmhs150k", "fakeddit")] == [5, 5] and overall["n"] == 10
        # Overall accuracy is the row-weighted mean of the sources' accuracies.
        acc = sum(per[n]["label"]["accuracy"] * per[n]["label"]["n"] for n in per) / overall["n"]
        assert acc == pytest.approx(overall["accuracy"], abs=1e-9)
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["dataset"] == "mmhs150k,fakeddit" and cfg["upsample"] == {"mmhs150k": 2}


def test_select_on_one_source_and_bad_names(pair: tuple[Path, Path], tmp_path: Path) -> None:
    res = finetune(_cfg(pair, tmp_path, epochs=1, select_metric="fakeddit/accuracy", encoders={"text": "clip-tiny"}))
    assert res is not None
    assert res.select["source"] == "fakeddit" and res.select["metric"] == "accuracy"
    # The epoch was chosen on fakeddit's val rows alone: its value is fakeddit's val accuracy, not the overall one.
    met = json.loads((res.run_dir / "metrics.json").read_text())
    assert res.select["value"] == pytest.approx(met["by_source"]["val"]["fakeddit"]["label"]["accuracy"], abs=1e-6)
    with pytest.raises(MMCacheError, match="'mvsa' is not a source dataset of this run; its sources are mmhs150k, "
                                           "fakeddit"):
        finetune(_cfg(pair, tmp_path, run_name="b", select_metric="mvsa/accuracy", encoders={"text": "clip-tiny"}))
    with pytest.raises(MMCacheError, match="--upsample mvsa: not a source dataset"):
        finetune(_cfg(pair, tmp_path, run_name="c", upsample={"mvsa": 2}, encoders={"text": "clip-tiny"}))


def test_rows_metrics_per_source_equal_metrics_of_each_sources_rows_alone() -> None:
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    samples = [Sample(id=f"{src}/{i}", split="val", labels={"label": int(rng.integers(3))}, source=src)
               for src in ("x", "y") for i in range(20)]
    by_id = {s.id: s for s in samples}
    order = [s.id for s in samples]
    rng.shuffle(order)
    logits = {"label": rng.normal(size=(len(order), 3)).astype(np.float32)}
    got = rows_metrics(order, logits, by_id, {"label": names}, by_source=True)[1]
    for src in ("x", "y"):
        rows = [k for k, i in enumerate(order) if by_id[i].source == src]
        y = np.array([by_id[order[k]].labels["label"] for k in rows])
        want = classification_metrics(y, logits["label"][rows], names)
        assert got[src]["label"]["n"] == 20
        for key in ("accuracy", "macro_f1", "weighted_f1"):
            assert got[src]["label"][key] == pytest.approx(want[key], abs=1e-12)
        assert got[src]["label"]["confusion_matrix"] == want["confusion_matrix"]


def test_two_datasets_with_upsampling_under_torchrun(pair: tuple[Path, Path], tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root, lm = pair
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "mmcache.finetune.cli", "run", "--dataset", "mmhs150k,fakeddit", "--data-dir", str(root),
           "--label-map", str(lm), "--upsample", "mmhs150k=2", "--text", "clip-tiny", "--epochs", "1",
           "--batch-size", "4", "--num-workers", "0", "--runs-dir", str(tmp_path / "runs"), "--run-name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    d = tmp_path / "runs" / "mmhs150k-fakeddit" / "ddp"
    met = json.loads((d / "metrics.json").read_text())
    # The 15 rows of the epoch (mmhs150k's 5 twice, fakeddit's 5) split over two processes (8 and 7).
    assert met["train"]["world_size"] == 2 and met["train"]["samples"] == 15
    assert set(met["by_source"]["test"]) == {"mmhs150k", "fakeddit"}
    assert json.loads((d / "config.json").read_text())["resolved"]["epoch_rows"] == 15


def test_limit_takes_the_first_rows_of_each_source(pair: tuple[Path, Path], tmp_path: Path) -> None:
    res = finetune(_cfg(pair, tmp_path, epochs=1, limit=2, encoders={"text": "clip-tiny"}))
    assert res is not None
    assert res.config["resolved"]["sources"] == {"mmhs150k": {"train": 2, "val": 2, "test": 2},
                                                 "fakeddit": {"train": 2, "val": 2, "test": 2}}
