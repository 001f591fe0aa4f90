"""Feature-store benchmark: split reads vs raw numpy, and per-batch write overhead vs a model forward.

Usage: .venv/bin/python bench/bench_store.py [--quick]

All numbers are ratios within one run on the same data (timings are medians of repeats):
  read  -- `StoreReader.load(split=...)` of N x 768 float16 vs `np.fromfile` of the same bytes
           from a raw file (+ the same in-memory indexing for a scattered split);
  write -- `FeatureStore.write` of one batch (cast, row writes, counter commit) vs the forward
           pass of a small MLP encoder that produced it; also with `durable=True` (fdatasync per
           batch) and vs the h5py chunked append + flush pattern.
Everything it writes lives in a temporary folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from mmcache.cache import FeatureStore, StoreReader, store_path

SPEC = {"preset": "bench", "family": "bench", "modality": "image"}


def timeit(fns: list[Callable[[], object]], repeat: int) -> list[float]:
    """Median wall time of each of `fns`, run interleaved (so a busy machine slows all alike)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def bench_read(root: Path, n: int, d: int, repeat: int) -> list[tuple[str, float, float]]:
    """Split reads through the store vs numpy from a raw file of the same bytes."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, d)).astype(np.float16)
    ids = [f"s{i:07d}" for i in range(n)]
    path = store_path(root, "bench", "image", "feat")
    with FeatureStore(path, SPEC, "bench", capacity=n) as st:
        for b in range(0, n, 8192):
            st.write(ids[b:b + 8192], {"pooled": data[b:b + 8192]})
    raw = root / "raw.bin"
    data.tofile(raw)
    # Two datasets over the same rows: one whose split is every row, and a realistic one whose
    # train split is 80% of rows picked at random, listed in dataset order.
    splits = np.where(rng.random(n) < 0.8, "train", "test")
    m_all, m_80 = root / "all.json", root / "scattered.json"
    m_all.write_text(json.dumps({"name": "bench", "samples": [{"id": i, "split": "train"} for i in ids]}))
    m_80.write_text(json.dumps({"name": "bench", "samples": [
        {"id": i, "split": str(s)} for i, s in zip(ids, splits, strict=True)]}))
    train_rows = np.flatnonzero(splits == "train")
    ids_80 = [ids[i] for i in train_rows]
    reader = StoreReader(path)
    assert np.array_equal(reader.load(split="train", manifest=m_80)["pooled"], data[train_rows])
    # The store's side also parses the manifest JSON (numpy's does not), so the ratios are conservative.

    def raw_all() -> np.ndarray:
        return np.fromfile(raw, dtype=np.float16).reshape(n, d)

    def raw_train() -> np.ndarray:
        return np.fromfile(raw, dtype=np.float16).reshape(n, d)[train_rows]

    t_raw, t_store, t_raw_tr, t_store_tr, t_ids = timeit([
        raw_all,
        lambda: reader.load(split="train", manifest=m_all),
        raw_train,
        lambda: reader.load(split="train", manifest=m_80),
        lambda: reader.load(ids_80),
    ], repeat)
    # For information: a fresh reader and a manifest not parsed before (what a training run's first load pays).
    t0 = time.perf_counter()
    m_80.touch()
    StoreReader(path).load(split="train", manifest=m_80)
    t_cold = time.perf_counter() - t0
    mb = data.nbytes / 2**20
    return [
        (f"whole split ({n}x{d}, {mb:.0f} MB): numpy fromfile", t_raw, 1.0),
        ("whole split: StoreReader.load(split=)", t_store, t_store / t_raw),
        ("80% scattered split: numpy fromfile + index", t_raw_tr, 1.0),
        ("80% scattered split: StoreReader.load(split=)", t_store_tr, t_store_tr / t_raw_tr),
        ("80% scattered split: StoreReader.load(ids)", t_ids, t_ids / t_raw_tr),
        ("80% scattered split: open + parse manifest + load, first time", t_cold, t_cold / t_raw_tr),
    ]


def bench_write(root: Path, batches: int, batch: int, d: int, repeat: int) -> list[tuple[str, float, float]]:
    """Per-batch cost of committing rows vs the forward pass that produced them."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, d)).eval()
    x = torch.randn(batch, 512)
    with torch.no_grad():
        out = model(x)  # a float32 tensor, as an extractor returns it

    def forward() -> None:
        with torch.no_grad():
            model(x)

    (t_fwd,) = timeit([forward], repeat * 10)

    def store_run(durable: bool, capacity: int | None) -> float:
        path = root / f"w{durable}{capacity}.h5"
        path.unlink(missing_ok=True)
        with FeatureStore(path, SPEC, "bench", capacity=capacity, durable=durable) as st:
            t = time.perf_counter()
            for b in range(batches):
                st.write([f"{b}-{i}" for i in range(batch)], {"pooled": out})
            return (time.perf_counter() - t) / batches

    def h5py_flush() -> float:
        path = root / "chunked.h5"
        path.unlink(missing_ok=True)
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("pooled", shape=(0, d), maxshape=(None, d), dtype="f2", chunks=(256, d))
            ids = f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(1024,))
            t = time.perf_counter()
            for b in range(batches):
                n0 = b * batch
                ds.resize(n0 + batch, axis=0)
                ds[n0:] = out.numpy().astype(np.float16)
                ids.resize(n0 + batch, axis=0)
                ids[n0:] = [f"{b}-{i}" for i in range(batch)]
                f.flush()
            return (time.perf_counter() - t) / batches

    t_w = statistics.median(store_run(False, batches * batch) for _ in range(repeat))
    t_grow = statistics.median(store_run(False, None) for _ in range(repeat))
    t_dur = statistics.median(store_run(True, batches * batch) for _ in range(repeat))
    t_h5 = statistics.median(h5py_flush() for _ in range(repeat))
    return [
        (f"model forward (MLP 512-1024-{d}, batch {batch}, 1 thread)", t_fwd, 1.0),
        ("FeatureStore.write, capacity given", t_w, t_w / t_fwd),
        ("FeatureStore.write, no capacity (file grows)", t_grow, t_grow / t_fwd),
        ("FeatureStore.write, durable=True (fdatasync)", t_dur, t_dur / t_fwd),
        ("h5py chunked append + flush per batch", t_h5, t_h5 / t_fwd),
    ]


def table(title: str, rows: list[tuple[str, float, float]]) -> None:
    """Print one result table."""
    w = max(len(r[0]) for r in rows)
    print(f"\n{title}\n{'case'.ljust(w)}  {'median ms':>10}  {'ratio':>7}")
    for name, t, ratio in rows:
        print(f"{name.ljust(w)}  {t * 1e3:10.3f}  {ratio:7.2f}")


def main() -> None:
    """Run both benchmarks and print their tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k rows and fewer repeats")
    a = ap.parse_args()
    n, repeat, batches = (20_000, 9, 50) if a.quick else (100_000, 9, 200)
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        root = Path(tmp)
        table("read: store vs raw numpy (ratio = store / numpy, 1.00 = raw-file speed)",
              bench_read(root, n, 768, repeat))
        table("write: per-batch commit vs the forward pass it follows (ratio = write / forward)",
              bench_write(root, batches, 64, 768, repeat))


if __name__ == "__main__":
    main()
