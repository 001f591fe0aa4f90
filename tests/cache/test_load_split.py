"""StoreReader.load_split: ids, features and labels of a split together, from the dataset's manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmcache.cache import StoreReader, store_path
from mmcache.errors import MMCacheError
from tests.heads.conftest import build_cache


def test_load_split_aligns_ids_features_and_labels(tmp_path: Path) -> None:
    splits = build_cache(tmp_path / "probe", n=120, second_task=True)["split"]  # the same rows, seeded
    failed = f"r{int(np.flatnonzero(splits == 'train')[2]):04d}"
    cache = tmp_path / "cache"
    truth = build_cache(cache, n=120, fail_ids=(failed,), second_task=True)
    r = StoreReader(store_path(cache, "toy", "image", "feat"))
    man = json.loads((cache / "toy" / "manifest.json").read_text())
    want = [s["id"] for s in man["samples"] if s["split"] == "train"]
    sp = r.load_split("train")
    assert sp.missing == [failed]  # the failed row is left out, and named
    assert sp.ids == [i for i in want if i != failed] and len(sp.ids) == len(want) - 1
    rows = np.array([int(i[1:]) for i in sp.ids])
    np.testing.assert_array_equal(sp.labels["label"], truth["label"][rows])
    np.testing.assert_array_equal(sp.labels["image_score"], truth["s_img"][rows] + 1)
    np.testing.assert_array_equal(sp.features["pooled"], r.load(sp.ids)["pooled"])
    assert sp.classes == {"label": ["negative", "neutral", "positive"], "image_score": ["negative", "neutral", "positive"]}
    assert list(r.load_split("test", keys=["pooled"]).features) == ["pooled"]


def test_load_split_errors(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_cache(cache, n=30)
    r = StoreReader(store_path(cache, "toy", "text", "feat"))
    with pytest.raises(MMCacheError, match=r"no split 'dev'; its splits are \['test', 'train', 'val'\]"):
        r.load_split("dev")
    (cache / "toy" / "manifest.json").unlink()
    with pytest.raises(MMCacheError, match="manifest .* not found"):
        r.load_split("train")
