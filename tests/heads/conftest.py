"""Synthetic cached datasets for the trainer tests: stores + manifest written with the real writers.

The task mirrors the demo: an image score and a text score in {-1, 0, +1}, each readable from its own
modality's features; the label is sign(s_img + s_txt), so either modality alone caps accuracy at about
5/9 and only the fusion of both can reach (almost) 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcache.cache.store import FeatureStore, store_path
from mmcache.data.base import Dataset, LabelSpace, Sample

LABELS = ["negative", "neutral", "positive"]

# The heads here are tiny: one intra-op thread is faster than two on a shared 2-core machine.
torch.set_num_threads(1)


def build_cache(cache: Path, dataset: str = "toy", n: int = 600, d_img: int = 24, d_txt: int = 16, seed: int = 0,
                noise: float = 0.25, fail_ids: tuple[str, ...] = (), skip_text: tuple[str, ...] = (),
                second_task: bool = False, teacher: bool = False, splits: tuple[str, ...] = ("train", "val", "test"),
                tokens: bool = False, majority: float = 0.0, sources: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Write cache/<dataset>/{image,text}/feat.h5 and the manifest; return the latent scores and labels.
    `sources`: row i comes from source dataset sources[i % len(sources)] (a cache over several datasets)."""
    rng = np.random.default_rng(seed)
    s_img = rng.integers(-1, 2, n)
    s_txt = rng.integers(-1, 2, n)
    label = np.sign(s_img + s_txt) + 1
    if majority:  # imbalance: this share of rows is relabelled "negative" (no draw otherwise: same data)
        label[rng.random(n) < majority] = 0
    p = {"train": 0.7, "val": 0.15, "test": 0.15}
    probs = np.array([p[s] for s in splits])
    split = rng.choice(list(splits), size=n, p=probs / probs.sum())
    ids = [f"r{i:04d}" for i in range(n)]
    # Each score lives along a random direction of its modality's feature space, plus isotropic noise.
    proto_img = rng.normal(size=(3, d_img))
    proto_txt = rng.normal(size=(3, d_txt))
    img = proto_img[s_img + 1] + noise * rng.normal(size=(n, d_img))
    txt = proto_txt[s_txt + 1] + noise * rng.normal(size=(n, d_txt))
    tasks = {"label": LABELS}
    if second_task:
        tasks["image_score"] = LABELS
    samples = []
    for i in range(n):
        labels = {"label": int(label[i])}
        if second_task:
            labels["image_score"] = int(s_img[i] + 1)
        samples.append(Sample(id=ids[i], split=str(split[i]), labels=labels,
                              source=sources[i % len(sources)] if sources else None))
    ds = Dataset(name=dataset, samples=samples, labels=LabelSpace(tasks=tasks), root=cache)
    ds.write_manifest(cache / dataset / "manifest.json")
    for mod, arr, skip in (("image", img, fail_ids), ("text", txt, skip_text)):
        keep = [i for i in range(n) if ids[i] not in skip]
        arrays = {"pooled": arr[keep].astype(np.float32)}
        if tokens:
            arrays["tokens"] = np.repeat(arr[keep, None, :], 3, axis=1).astype(np.float32)
            arrays["mask"] = np.ones((len(keep), 3), dtype=bool)
        with FeatureStore(store_path(cache, dataset, mod, "feat"), {"preset": f"toy-{mod}", "d": arr.shape[1]},
                          dataset, capacity=n) as st:
            for s in range(0, len(keep), 256):
                st.write([ids[i] for i in keep[s:s + 256]], {k: v[s:s + 256] for k, v in arrays.items()})
            if mod == "image":
                for fid in fail_ids:
                    st.fail(fid, "corrupt image")
    if teacher:
        logits = np.eye(3)[label] * 4.0
        with FeatureStore(store_path(cache, dataset, "teacher", "oracle"), {"preset": "oracle"}, dataset,
                          capacity=n) as st:
            st.write(ids, {"logits": logits.astype(np.float32)})
    return {"s_img": s_img, "s_txt": s_txt, "label": label, "split": split}


@pytest.fixture
def make_cache(tmp_path: Path) -> Callable[..., Path]:
    """Factory: build a synthetic cache under tmp_path and return the cache folder."""

    def make(**kw: object) -> Path:
        cache = tmp_path / "cache"
        build_cache(cache, **kw)  # type: ignore[arg-type]
        return cache

    return make


@pytest.fixture
def toy_cache(make_cache: Callable[..., Path]) -> Path:
    """The default synthetic cache (dataset `toy`, stores image/feat and text/feat)."""
    return make_cache()


def run_heads(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the `heads` console script in-process on `argv`; returns its exit code."""
    import sys

    from mmcache.heads.cli import main

    monkeypatch.setattr(sys, "argv", ["heads", *argv])
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def unlabel_split(cache: Path, split: str, dataset: str = "toy") -> None:
    """Drop every label of `split`'s rows from the manifest of `dataset` under `cache` (a hidden split)."""
    import json

    path = cache / dataset / "manifest.json"
    manifest = json.loads(path.read_text())
    for s in manifest["samples"]:
        if s["split"] == split:
            s["labels"] = {}
    path.write_text(json.dumps(manifest))
