"""Caches bigger than memory: load time, epoch time per row and peak memory of `heads train` as rows grow.

Usage: .venv/bin/python bench/bench_scale.py [--quick] [--sizes pooled=10000,100000 tokens=20000]
       [--limit-gb 6] [--repeat 2] [--out bench/results-scale]

Synthetic float16 stores are written through the public import path (`mmcache cache import`: `.npy` arrays, an
ids file and an `id,split,label` CSV for the manifest) into a temporary folder that is deleted afterwards:

- pooled: two modalities of 512-d pooled vectors, N = 10k, 100k, 1M rows; the linear probe and the gated head
- tokens: two modalities of [50, 512] tokens + masks (about 102 KB a row), N = 20k, 100k, 200k; the xattn head

Each training runs in a child process (`heads train` through `mmcache.heads.train.train`, one thread). The parent
samples the child's resident memory every 20 ms and keeps the peaks of its anonymous memory (`RssAnon` in
/proc/PID/status) and of its mapped file pages (`RssFile`: the page cache pages of the stores it maps, which the
kernel may drop and read again; in memory mode they hold the rows). The child reports the load seconds
(`config.json`'s resolved `load_seconds`: manifest, id alignment and, in memory, the rows) and the median epoch
seconds of its curves (the first epoch left out). Memory and streamed trainings alternate, `--repeat` times each;
a row gives the medians over its repeats. With `--limit-gb` (root and a cgroup v1 memory controller) the token
runs above the limit run under a memory cgroup of that size, as a container would, each after the stores' pages
were dropped from this machine's page cache (the rows come from the disk). Ratios within one run: per-row
epoch time against the smallest size in memory, and streamed / in-memory throughput where both fit.

Load seconds are also measured alone (a child that only loads), per size and mode: cold (the stores' pages
dropped from this machine's page cache first, so the rows come from the disk; a virtual disk's host may still
cache them) and warm (right after, the rows in the page cache). The disk's sequential read rate (O_DIRECT, one
store's rows, read after the cold loads) is recorded beside them. Before the trainings of a size that fits, the
stores are read once, so their load column is the page cache's (warm) in every repeat.
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
    """Write `n` rows of two modalities through the public import path (`mmcache cache import`'s
    `import_features`: `.npy` arrays with an ids file, the manifest from an `id,split,label` CSV), one modality at
    a time so that only one modality's arrays lie beside the stores; returns the stores' bytes on disk."""
    from mmcache.cache.importer import import_features
    from mmcache.cache.store import disk_bytes, store_path

    rng = np.random.default_rng(seed)
    ids = [f"r{i:08d}" for i in range(n)]
    y = rng.integers(0, 3, n)
    split = np.where(np.arange(n) % 10 == 0, "val", np.where(np.arange(n) % 10 == 1, "test", "train"))
    src = cache.parent / f"{dataset}-arrays"
    src.mkdir(parents=True, exist_ok=True)
    (src / "ids.txt").write_text("\n".join(ids) + "\n")
    with open(src / "manifest.csv", "w") as fh:
        fh.write("id,split,label\n")
        fh.writelines(f"{i},{s},c{c}\n" for i, s, c in zip(ids, split.tolist(), y.tolist(), strict=True))
    protos = rng.standard_normal((3, DIM)).astype(np.float32)
    pool = rng.standard_normal((512, DIM)).astype(np.float32)  # rows tiled from a pool: writing is disk-bound
    step = 1024 if tokens else 65536
    total = 0
    for k, mod in enumerate(("image", "text")):
        files = {"pooled": np.lib.format.open_memmap(src / "pooled.npy", "w+", np.float16, (n, DIM))}
        if tokens:
            files["tokens"] = np.lib.format.open_memmap(src / "tokens.npy", "w+", np.float16, (n, TOKENS, DIM))
            files["mask"] = np.lib.format.open_memmap(src / "mask.npy", "w+", np.bool_, (n, TOKENS))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            base = protos[y[lo:hi]] + pool[(np.arange(lo, hi) * (7 + k)) % len(pool)]
            files["pooled"][lo:hi] = base
            if tokens:
                files["tokens"][lo:hi] = base[:, None, :]
                files["mask"][lo:hi] = True
        for a in files.values():
            a.flush()
        del files, a
        import_features(dataset, mod, "synth", [f"{key}={src / f'{key}.npy'}" for key in
                                                (("pooled", "tokens", "mask") if tokens else ("pooled",))],
                        ids_file=src / "ids.txt", manifest=src / "manifest.csv" if k == 0 else None,
                        cache_dir=cache, dtype="float16", progress=False)
        for f in src.glob("*.npy"):
            f.unlink()
        total += disk_bytes(store_path(cache, dataset, mod, "synth"))
    for f in src.iterdir():
        f.unlink()
    src.rmdir()
    return total


def _rss(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of process `pid` in bytes; zeros once it is gone."""
    out = {"RssAnon:": 0, "RssFile:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line else ""
            if key in out:
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out["RssAnon:"], out["RssFile:"]


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


def train_child(cfg: dict[str, Any], limit: int | None = None, child: str = CHILD) -> dict[str, Any]:
    """Run one training (or `child`'s code) in a child process (under a memory cgroup of `limit` bytes when given
    and possible), sampling its peak memory."""
    group = _cgroup(limit)
    cmd = [sys.executable, "-c", child, json.dumps(cfg)]
    if group is not None:  # the child joins the group before python starts
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    peak = peak_file = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_file
        while not done.is_set():
            anon, file = _rss(proc.pid)
            peak, peak_file = max(peak, anon), max(peak_file, file)
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
                "peak_rss_file": peak_file, "returncode": proc.returncode, "limit": limit}
    res = json.loads(line[len("RESULT "):])
    res.update(peak_rss=peak, peak_rss_file=peak_file, wall_s=wall, limit=limit)
    if "epoch_seconds" in res:
        sec = res["epoch_seconds"][1:] or res["epoch_seconds"]  # the first epoch warms caches and allocators
        res.update(epoch_s=statistics.median(sec), us_per_row=1e6 * statistics.median(sec) / res["train_rows"])
    return res


LOAD_CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from mmcache.heads.data import load_cached
a = json.loads(sys.argv[1])
d = load_cached(a["dataset"], a["modalities"], a["cache_dir"], quiet=True, load=a["load"])
print("RESULT " + json.dumps({"load_seconds": d.load_seconds, "load": d.load}))
"""


def _store_files(cache: Path, dataset: str) -> list[Path]:
    return sorted((cache / dataset).rglob("*.h5"))


def drop_cached(paths: list[Path]) -> bool:
    """Drop the files' pages from this machine's page cache (written back first); False where the system cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def disk_read_rate(path: Path) -> float | None:
    """GB/s of one sequential O_DIRECT read (past the page cache) of the rows of the store at `path`; None where
    O_DIRECT is not supported."""
    import mmap

    from mmcache.cache.store import StoreReader

    r = StoreReader(path)
    a = r._layout[r.keys[0]]
    lo = a.offset - a.offset % 4096
    end = a.offset + len(r) * a.row_bytes
    buf = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        return None
    try:
        t, pos = time.perf_counter(), lo
        while pos < end:
            n = os.preadv(fd, [buf], pos)
            if n <= 0:
                break
            pos += n
        return (pos - lo) / (time.perf_counter() - t) / 1e9
    except OSError:
        return None
    finally:
        os.close(fd)
        buf.close()


def load_times(cache: Path, kind: str, ds: str, n: int, disk: int, modes: list[str]) -> list[dict[str, Any]]:
    """Load seconds alone (children that only load), cold then warm, per mode; one row per mode."""
    paths = _store_files(cache, ds)
    rows = []
    for mode in modes:
        args = {"dataset": ds, "modalities": {"image": "synth", "text": "synth"}, "cache_dir": str(cache), "load": mode}
        cold = train_child(args, child=LOAD_CHILD) if drop_cached(paths) else {"error": "cannot drop the page cache"}
        warm = train_child(args, child=LOAD_CHILD)
        rows.append({"table": "load", "kind": kind, "n": n, "mode": mode, "disk_bytes": disk,
                     "cold_s": cold.get("load_seconds"), "warm_s": warm.get("load_seconds"),
                     "peak_rss": warm.get("peak_rss", 0), "peak_rss_file": warm.get("peak_rss_file", 0),
                     **({"error": cold.get("error") or warm.get("error")} if "error" in cold or "error" in warm else {})})
    # After the cold loads, so that no read of this one precedes them (a virtual disk's host may cache what it read).
    rate = disk_read_rate(paths[0]) if drop_cached(paths) else None
    for r in rows:
        r["disk_gb_s"] = rate
    return rows


def read_in(paths: list[Path]) -> None:
    """Read the files once (into the page cache), so every training starts from the same cache state."""
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def first_touch_s_per_gb() -> float:
    """Seconds a fresh process takes to touch 1 GB of fresh anonymous memory (one write a page): what reading rows
    into new arrays costs beyond the read itself (large on virtual machines that hand memory back to their host)."""
    code = ("import time, numpy as np; a = np.empty(1 << 30, np.uint8); t = time.perf_counter(); a[::4096] = 1; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


HEADS = {"linear": {"head": "linear", "head_hparams": {"D": 0}},
         "gated": {"head": "gated", "head_hparams": {"D": 128}},
         "xattn": {"head": "xattn", "head_hparams": {"D": 64, "heads": 2}}}


def run(sizes: dict[str, list[int]], limit: int | None, epochs: int, heads: list[str] | None = None,
        repeat: int = 1, loads: bool = True) -> list[dict[str, Any]]:
    """Write each size's stores; time their loads alone (`loads`); train each head on them in memory and streamed,
    alternating, `repeat` times each where both fit. One row per (size, head, mode) (`table` "train") and per
    (size, mode) of the load times (`table` "load")."""
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
                # Above the limit, memory cannot fit: refused in one line (tested), nothing to time.
                lim = limit if kind == "tokens" and limit is not None and disk > limit else None
                modes = ["stream"] if lim is not None else ["memory", "stream"]
                if loads:
                    for r in load_times(cache, kind, ds, n, disk, modes):
                        rows.append(r)
                        print(json.dumps(r), flush=True)
                if lim is None:  # the trainings' loads read the page cache (the load table has cold and warm)
                    read_in(_store_files(cache, ds))
                for head in kind_heads:
                    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
                    for _ in range(repeat if len(modes) > 1 else 1):
                        for load in modes:
                            if lim is not None:  # above the limit: the rows come from the disk, in every repeat
                                drop_cached(_store_files(cache, ds))
                            cfg = {"dataset": ds, "modalities": {"image": "synth", "text": "synth"},
                                   "cache_dir": str(cache), "epochs": epochs, "batch_size": 256, "save": False,
                                   "quiet": True, "device": "cpu", "threads": 1, "load": load, **HEADS[head]}
                            runs[load].append(train_child(cfg, lim))
                    for load in modes:
                        r = _merge(runs[load])
                        r.update(table="train", kind=kind, n=n, head=head, mode=load, disk_bytes=disk)
                        rows.append(r)
                        print(json.dumps({k: v for k, v in r.items() if k != "epoch_seconds"}), flush=True)
                for p in (cache / ds).rglob("*"):
                    if p.is_file():
                        p.unlink()
    return rows


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated trainings of one (size, head, mode): medians of load and epoch seconds, peaks of
    memory; the first failure when one failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return {**failed[0], "repeats": len(runs)}
    out = dict(runs[0])
    epoch_s = statistics.median(r["epoch_s"] for r in runs)
    out.update(repeats=len(runs), epoch_s=epoch_s, us_per_row=1e6 * epoch_s / out["train_rows"],
               epoch_s_each=[r["epoch_s"] for r in runs], epoch_seconds=[r["epoch_seconds"] for r in runs],
               load_seconds=statistics.median(r["load_seconds"] for r in runs),
               load_seconds_each=[r["load_seconds"] for r in runs],
               peak_rss=max(r["peak_rss"] for r in runs), peak_rss_file=max(r["peak_rss_file"] for r in runs),
               wall_s=sum(r["wall_s"] for r in runs))
    return out


def summarize(rows: list[dict[str, Any]]) -> None:
    """Add the ratios to the training rows: per-row epoch time against the smallest in-memory size of the same
    head, and streamed / in-memory throughput at each size where both ran."""
    ok = [r for r in rows if r.get("table", "train") == "train" and "error" not in r]
    for head in dict.fromkeys(r["head"] for r in ok):
        mine = [r for r in ok if r["head"] == head]
        base = min((r for r in mine if r["mode"] == "memory"), key=lambda r: r["n"], default=None)
        for r in mine:
            if base is not None:
                r["per_row_vs_smallest"] = r["us_per_row"] / base["us_per_row"]
            twin = next((x for x in mine if x["n"] == r["n"] and x["mode"] == "memory"), None)
            if r["mode"] == "stream" and twin is not None:
                r["stream_throughput_ratio"] = twin["us_per_row"] / r["us_per_row"]


def _gb(b: float | None) -> str:
    return f"{b / 1e9:.2f} GB" if b is not None else "-"


def _s(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "-"


def markdown(rows: list[dict[str, Any]], info: dict[str, Any] | None = None) -> str:
    """The training table, the load table and the machine they ran on."""
    lines = []
    if info:
        lines += [f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with one thread per "
                  f"training, GPU: {info['gpu'] or 'none'}; {info['date']}. Fresh anonymous memory: "
                  f"{info['first_touch_s_per_gb']:.2f} s per GB to touch first.", ""]
    lines += ["| head | rows | on disk | load | mode | load s | epoch s | us/row | vs smallest | stream/memory | "
              "peak RssAnon | peak RssFile | limit | repeats |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (x for x in rows if x.get("table", "train") == "train"):
        if "error" in r:
            lines.append(f"| {r['head']} | {r['n']:,} | {_gb(r['disk_bytes'])} | {r['mode']} | - | failed: "
                         f"{r['error'][:60]} | | | | | {_gb(r['peak_rss'])} | {_gb(r.get('peak_rss_file'))} | | |")
            continue
        lim = f"{r['limit'] / 1e9:.0f} GB" if r.get("limit") else "-"
        ratio = f"{r['stream_throughput_ratio']:.2f}x" if "stream_throughput_ratio" in r else "-"
        lines.append(f"| {r['head']} | {r['n']:,} | {_gb(r['disk_bytes'])} | {r['mode']} | {r['load']} | "
                     f"{r['load_seconds']:.2f} | {r['epoch_s']:.2f} | {r['us_per_row']:.1f} | "
                     f"{r.get('per_row_vs_smallest', float('nan')):.2f}x | {ratio} | {_gb(r['peak_rss'])} | "
                     f"{_gb(r.get('peak_rss_file'))} | {lim} | {r.get('repeats', 1)} |")
    loads = [r for r in rows if r.get("table") == "load"]
    if loads:
        lines += ["", "| rows | on disk | mode | load s cold | load s warm | disk read (O_DIRECT) |", "|---|---|---|---|---|---|"]
        for r in loads:
            rate = f"{r['disk_gb_s']:.2f} GB/s" if r.get("disk_gb_s") else "-"
            lines.append(f"| {r['kind']} {r['n']:,} | {_gb(r['disk_bytes'])} | {r['mode']} | {_s(r.get('cold_s'))} | "
                         f"{_s(r.get('warm_s'))} | {rate} |")
        lines += ["", "Load seconds alone (a child that only loads): cold with the stores' pages dropped from this "
                  "machine's page cache first (a virtual disk's host may still cache them), warm right after; the "
                  "O_DIRECT read after them. The training table's load column is warm where the rows fit (the "
                  "stores are read once before the trainings)."]
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
    ap.add_argument("--repeat", type=int, default=2, help="trainings per mode where both modes run (alternating)")
    ap.add_argument("--no-loads", action="store_true", help="skip the cold/warm load times")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results-scale")
    args = ap.parse_args()
    sizes = parse_sizes(args.sizes) if args.sizes else (QUICK if args.quick else FULL)
    from common import machine

    info = {**machine(), "date": time.strftime("%Y-%m-%d"), "first_touch_s_per_gb": first_touch_s_per_gb()}
    rows = run(sizes, int(args.limit_gb * 1e9) if args.limit_gb else None, args.epochs or (3 if args.quick else 2),
               repeat=args.repeat, loads=not args.no_loads)
    summarize(rows)
    md = markdown(rows, info)
    print(md)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
