"""`heads train` on the cache of a dataset combined from several: metrics per source dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmcache.data import load_dataset
from mmcache.extract.runner import extract, parse_requests
from mmcache.heads.data import load_cached
from mmcache.heads.metrics import classification_metrics
from mmcache.heads.train import TrainConfig, predict_logits, train
from mmcache.manifest import Manifest, manifest_path
from tests.data.test_combined import write_map, write_pair


def test_heads_train_reports_each_source_dataset(tmp_path: Path) -> None:
    ds = load_dataset("mmhs150k,fakeddit", write_pair(tmp_path / "data", n=6), progress=False,
                      label_map=write_map(tmp_path / "map.json"))
    cache = tmp_path / "cache"
    extract(ds, parse_requests("text", "clip=clip-tiny"), cache_dir=cache, batch_size=8, progress=False)
    man = Manifest.read(manifest_path(cache, "mmhs150k-fakeddit"))
    assert man.row_sources == [s.source for s in ds.samples] and man.ids[0].startswith("mmhs150k/")
    res = train(TrainConfig(dataset="mmhs150k-fakeddit", modalities={"text": "clip"}, cache_dir=str(cache),
                            runs_dir=str(tmp_path / "runs"), epochs=3, quiet=True))
    data = load_cached("mmhs150k-fakeddit", {"text": "clip"}, cache_dir=cache, quiet=True)
    names = ds.labels.tasks["label"]
    for split in ("train", "val", "test"):
        assert set(res.by_source[split]) == {"mmhs150k", "fakeddit"}
        idx = data.split_index[split]
        logits = predict_logits(res.head, data, idx)["label"].numpy()
        y = data.targets["label"][idx].numpy()
        for src in ("mmhs150k", "fakeddit"):
            rows = [k for k, i in enumerate(idx.tolist()) if data.ids[i].startswith(f"{src}/")]
            want = classification_metrics(y[rows], logits[rows], names)
            got = res.by_source[split][src]["label"]
            assert got["n"] == want["n"] == 5
            assert got["confusion_matrix"] == want["confusion_matrix"]
            assert got["macro_f1"] == pytest.approx(want["macro_f1"], abs=1e-9)
    met = json.loads((Path(res.run_dir) / "metrics.json").read_text())
    assert met["by_source"]["test"]["fakeddit"]["label"]["n"] == 5 and set(met["splits"]["test"]) == {"label"}


def test_one_dataset_has_no_sources(tmp_path: Path) -> None:
    from tests.data.layouts import write_fakeddit

    root = write_fakeddit(tmp_path / "fakeddit", {"train": [("a", "t", 1, 0, 0)], "validate": [], "test_public": []})
    ds = load_dataset("fakeddit", root, progress=False)
    path = Manifest.from_dataset(ds).write(tmp_path / "manifest.json")
    assert Manifest.read(path).row_sources == [] and "source" not in path.read_text()
