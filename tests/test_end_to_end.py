"""The foundation path as a user runs it: demo data -> CLIP features in stores -> linear heads.

The demo label is the sign of an image score plus a text score, so fusion must beat
either modality alone by a wide margin (a single modality caps near 5/9 accuracy).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mmcache.cache.store import StoreReader, store_path
from mmcache.data import load_dataset
from mmcache.data.demo import generate_demo
from mmcache.extract.runner import extract, parse_requests
from mmcache.heads.train import TrainConfig, train


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    generate_demo(root / "data" / "demo", n=1500, seed=0)
    ds = load_dataset("demo", root / "data" / "demo")
    reqs = parse_requests("image", "clip=clip-tiny") + parse_requests("text", "clip=clip-tiny")
    summaries = extract(ds, reqs, cache_dir=root / "cache", batch_size=128, progress=False)
    assert [s.written for s in summaries] == [1500, 1500]
    return root / "cache"


def test_stores_hold_every_demo_row(demo_cache: Path) -> None:
    for modality in ("image", "text"):
        r = StoreReader(store_path(demo_cache, "demo", modality, "clip"))
        assert len(r.ids) == 1500 and len(set(r.ids)) == 1500
        assert r.spec["preset"] == "clip-tiny" and r.spec["modality"] == modality
        assert r.load(keys=["pooled"])["pooled"].shape[0] == 1500


def test_fusion_beats_each_modality_on_demo(demo_cache: Path, tmp_path: Path) -> None:
    acc = {}
    for ablation, name in ((0, "both"), (1, "text"), (2, "image")):
        cfg = TrainConfig(dataset="demo", modalities={"image": "clip", "text": "clip"}, cache_dir=str(demo_cache),
                          runs_dir=str(tmp_path), head_hparams={"D": 64, "ablation": ablation}, epochs=40,
                          save=False, quiet=True)
        acc[name] = train(cfg).metrics["test"]["label"]["accuracy"]
    # Each modality alone is informative (well above the 1/3 chance level) ...
    assert acc["image"] > 0.42 and acc["text"] > 0.42, acc
    # ... and fusion, which sees both scores, is far better than either.
    assert acc["both"] > max(acc["image"], acc["text"]) + 0.15, acc
