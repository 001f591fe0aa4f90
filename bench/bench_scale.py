"""Caches bigger than memory: load time, epoch time per row and peak memory of `heads train` as rows grow.

Usage: .venv/bin/python bench/bench_scale.py [--quick] [--sizes pooled=10000,100000 tokens=20000]
       [--limit-gb 6] [--out bench/results-scale]

Synthetic float16 stores are written with the project's own `FeatureStore` and `Manifest` into a temporary
folder that is deleted afterwards:

- pooled: two modalities of 512-d pooled vectors, N = 10k, 100k, 1M rows; the linear probe and the gated head
- tokens: two modalities of [50, 512] tokens + masks (about 102 KB a row), N = 20k, 100k, 200k; the xattn head

Each training runs in a child process (`heads train` through `mmcache.heads.train.train`, one thread). The parent
samples the child's anonymous resident memory (`RssAnon` in /proc/PID/status: the mapped pages of a streamed store
are the kernel's page cache, not the process's memory) every 20 ms and keeps the peak. The child reports the load
seconds (`config.json`'s resolved `load_seconds`: manifest, id alignment and, in memory, the rows) and the median
epoch seconds of its curves. With `--limit-gb` (root and a cgroup v1 memory controller) the token runs above the
limit run under a memory cgroup of that size, as a container would. Ratios within one run: per-row epoch time
against the smallest size in memory, and streamed / in-memory throughput where both fit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
DIM, TOKENS = 512, 50
CGROUP = Path("/sys/fs/cgroup/memory")


def write_cache(cache: Path, dataset: str, n: int, tokens: bool, seed: int = 0) -> int:
    """Write `n` rows of two modalities and the manifest; returns the stores' bytes on disk."""
    from mmcache.cache.store import FeatureStore, store_path
    from mmcache.data.base import LabelSpace
    from mmcache.manifest import Manifest, manifest_path

    rng = np.random.default_rng(seed)
    ids = [f"r{i:08d}" for i in range(n)]
    y = rng.integers(0, 3, n)
    split = np.where(np.arange(n) % 10 == 0, "val", np.where(np.arange(n) % 10 == 1, "test", "train"))
    Manifest(name=dataset, labels=LabelSpace(tasks={"label": ["c0", "c1", "c2"]}), ids=ids, splits=split.tolist(),
             label_columns={"label": y.astype(np.int64)}).write(manifest_path(cache, dataset))
    protos = rng.standard_normal((3, DIM)).astype(np.float32)
    pool = rng.standard_normal((512, DIM)).astype(np.float32)  # rows tiled from a pool: writing is disk-bound
    total = 0
    step = 1024 if tokens else 65536
    for k, mod in enumerate(("image", "text")):
        path = store_path(cache, dataset, mod, "synth")
        with FeatureStore(path, {"preset": "synthetic", "modality": mod}, dataset, capacity=n) as st:
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                base = protos[y[lo:hi]] + pool[(np.arange(lo, hi) * (7 + k)) % len(pool)]
                arrays = {"pooled": base.astype(np.float16)}
                if tokens:
                    arrays["tokens"] = np.repeat(base[:, None, :], TOKENS, 1).astype(np.float16)
                    arrays["mask"] = np.ones((hi - lo, TOKENS), dtype=bool)
                st.write(ids[lo:hi], arrays)
        total += os.path.getsize(path)
    return total


def _rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cgroup(limit: int | None) -> Path | None:
    if limit is None or os.geteuid() != 0 or not (CGROUP / "cgroup.procs").exists():
        return None
    group = CGROUP / f"mmcache-bench-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit))
    return group


CHILD = """
import json, statistics, sys, torch
torch.set_num_threads(1)
from mmcache.heads.train import TrainConfig, train
cfg = TrainConfig(**json.loads(sys.argv[1]))
r = train(cfg)
sec = [c["seconds"] for c in r.curves]
print("RESULT " + json.dumps({"load_seconds": r.config["resolved"]["load_seconds"], "epoch_seconds": sec,
      "load": r.config["resolved"]["load"], "train_rows": r.config["resolved"]["rows"]["train"]}))
"""


def train_child(cfg: dict[str, Any], limit: int | None = None) -> dict[str, Any]:
    """Run one training in a child process (under a memory cgroup of `limit` bytes when given and possible)."""
    group = _cgroup(limit)
    cmd = [sys.executable, "-c", CHILD, json.dumps(cfg)]
    if group is not None:  # the child joins the group before python starts
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    peak = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_anon(proc.pid))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    if group is not None:
        try:
            group.rmdir()
        except OSError:
            pass
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1], "peak_rss": peak,
                "returncode": proc.returncode, "limit": limit}
    res = json.loads(line[len("RESULT "):])
    sec = res["epoch_seconds"][1:] or res["epoch_seconds"]  # the first epoch warms caches and allocators
    res.update(peak_rss=peak, wall_s=wall, limit=limit, epoch_s=statistics.median(sec),
               us_per_row=1e6 * statistics.median(sec) / res["train_rows"])
    return res


HEADS = {"linear": {"head": "linear", "head_hparams": {"D": 0}},
         "gated": {"head": "gated", "head_hparams": {"D": 128}},
         "xattn": {"head": "xattn", "head_hparams": {"D": 64, "heads": 2}}}


def run(sizes: dict[str, list[int]], limit: int | None, epochs: int,
        heads: list[str] | None = None) -> list[dict[str, Any]]:
    """Write each size's stores, train each head on them in memory and streamed; one row per training."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=os.environ.get("MMCACHE_BENCH_DIR")) as tmp:
        cache = Path(tmp) / "cache"
        for kind, ns in sizes.items():
            kind_heads = heads or (["linear", "gated"] if kind == "pooled" else ["xattn"])
            for n in ns:
                ds = f"{kind}{n}"
                t = time.perf_counter()
                disk = write_cache(cache, ds, n, tokens=kind == "tokens")
                print(f"{ds}: wrote {disk / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
                for head in kind_heads:
                    for load in ("memory", "stream"):
                        lim = limit if kind == "tokens" and limit is not None and disk > limit else None
                        if lim is not None and load == "memory":
                            continue  # cannot fit: refused in one line (tested), nothing to time
                        cfg = {"dataset": ds, "modalities": {"image": "synth", "text": "synth"},
                               "cache_dir": str(cache), "epochs": epochs, "batch_size": 256, "save": False,
                               "quiet": True, "device": "cpu", "threads": 1, "load": load, **HEADS[head]}
                        r = train_child(cfg, lim)
                        r.update(kind=kind, n=n, head=head, mode=load, disk_bytes=disk)
                        rows.append(r)
                        print(json.dumps({k: v for k, v in r.items() if k != "epoch_seconds"}), flush=True)
                for p in (cache / ds).rglob("*"):
                    if p.is_file():
                        p.unlink()
    return rows


def summarize(rows: list[dict[str, Any]]) -> None:
    """Add the ratios to `rows`: per-row epoch time against the smallest in-memory size of the same head, and
    streamed / in-memory throughput at each size where both ran."""
    ok = [r for r in rows if "error" not in r]
    for head in dict.fromkeys(r["head"] for r in ok):
        mine = [r for r in ok if r["head"] == head]
        base = min((r for r in mine if r["mode"] == "memory"), key=lambda r: r["n"], default=None)
        for r in mine:
            if base is not None:
                r["per_row_vs_smallest"] = r["us_per_row"] / base["us_per_row"]
            twin = next((x for x in mine if x["n"] == r["n"] and x["mode"] == "memory"), None)
            if r["mode"] == "stream" and twin is not None:
                r["stream_throughput_ratio"] = twin["us_per_row"] / r["us_per_row"]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| head | rows | on disk | load | mode | load s | epoch s | us/row | vs smallest | stream/memory | "
             "peak RssAnon | limit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['head']} | {r['n']:,} | {r['disk_bytes'] / 1e9:.2f} GB | {r['mode']} | - | failed: "
                         f"{r['error'][:60]} | | | | | {r['peak_rss'] / 1e9:.2f} GB | |")
            continue
        lim = f"{r['limit'] / 1e9:.0f} GB" if r.get("limit") else "-"
        ratio = f"{r['stream_throughput_ratio']:.2f}x" if "stream_throughput_ratio" in r else "-"
        lines.append(f"| {r['head']} | {r['n']:,} | {r['disk_bytes'] / 1e9:.2f} GB | {r['mode']} | {r['load']} | "
                     f"{r['load_seconds']:.2f} | {r['epoch_s']:.2f} | {r['us_per_row']:.1f} | "
                     f"{r.get('per_row_vs_smallest', float('nan')):.2f}x | {ratio} | {r['peak_rss'] / 1e9:.2f} GB | "
                     f"{lim} |")
    return "\n".join(lines) + "\n"


QUICK = {"pooled": [20_000], "tokens": [2_000]}
FULL = {"pooled": [10_000, 100_000, 1_000_000], "tokens": [20_000, 100_000, 200_000]}


def parse_sizes(items: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for it in items:
        kind, _, ns = it.partition("=")
        if kind not in ("pooled", "tokens"):
            raise SystemExit(f"--sizes: {kind!r} is not pooled or tokens")
        out[kind] = [int(x) for x in ns.split(",") if x]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    ap.add_argument("--sizes", nargs="*", default=None, help="e.g. pooled=10000,100000 tokens=20000")
    ap.add_argument("--limit-gb", type=float, default=6.0, help="memory cgroup for token runs larger than it")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results-scale")
    args = ap.parse_args()
    sizes = parse_sizes(args.sizes) if args.sizes else (QUICK if args.quick else FULL)
    rows = run(sizes, int(args.limit_gb * 1e9) if args.limit_gb else None, args.epochs or (3 if args.quick else 2))
    summarize(rows)
    md = markdown(rows)
    print(md)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
