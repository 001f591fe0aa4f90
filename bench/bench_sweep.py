"""Sweep benchmark: a grid trained together (`heads sweep`) vs the same configs trained one after another.

Usage: .venv/bin/python bench/bench_sweep.py [--quick] [--threads N] [--json PATH]

Data: the synthetic MVSA-sized task of bench_heads.py (4,500 rows, 512 + 512 float16 features, written
as real stores + manifest in a temporary folder, deleted at the end).

1. probe  -- 32 linear-probe configs (D=0; lr x weight decay x seed, 4 x 2 x 4) through `train_many`
             (one store load, the configs as one stacked computation) against two baselines in the same
             process, each loading its stores per config:
             - `train(cfg)` for each config in turn: today's single run, which takes the same closed-form
               step (a stack of one), so this ratio is what batching alone buys;
             - the per-config training loop (autograd and a torch optimizer per config, as every other
               head trains; `train()` with the stacked path switched off): the sweep before batching.
2. fusion -- 32 configs of the D=256 fusion head (lr x dropout x seed) the same way (lockstep groups
             sharing batch gathers vs one run after another). Compute-bound on a CPU.
Both sides train the same configs for the same epochs; the table also checks they reach the same
test accuracy (mean over configs). Ratios within one run: a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_heads import MODS, make_cache  # noqa: E402

import mmcache.heads.stacked  # noqa: E402
from mmcache.heads.train import TrainConfig, train, train_many  # noqa: E402


def grid(cache: Path, kind: str, epochs: int, n: int) -> list[TrainConfig]:
    """`n` configs (32 by default) of the probe or the fusion head."""
    base = dict(dataset="bench", modalities=dict(MODS), cache_dir=str(cache), epochs=epochs, batch_size=256,
                quiet=True, save=False)
    if kind == "probe":
        combos = itertools.product((1e-3, 3e-3, 1e-2, 3e-2), (0.0, 1e-4), range(4))
        cfgs = [TrainConfig(**base, head_hparams={"D": 0}, lr=lr, weight_decay=wd, seed=s)  # type: ignore[arg-type]
                for lr, wd, s in combos]
    else:
        combos = itertools.product((1e-3, 3e-3, 1e-2, 3e-2), (0.1, 0.3), range(4))
        cfgs = [TrainConfig(**base, head_hparams={"D": 256, "dropout": p}, lr=lr, seed=s)  # type: ignore[arg-type]
                for lr, p, s in combos]
    return cfgs[:n]


def measure(cfgs: list[TrainConfig], loop: bool = False) -> dict[str, Any]:
    """Seconds and mean test accuracy of the batched sweep and of the sequential `train()` calls; with `loop`
    also of the configs trained one after another by the per-config loop (no stacked path)."""
    t = time.perf_counter()
    batched = train_many(cfgs)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    seq = [train(c) for c in cfgs]
    t_seq = time.perf_counter() - t
    acc_b = statistics.fmean(r.metrics["test"]["label"]["accuracy"] for r in batched)  # type: ignore[union-attr]
    acc_s = statistics.fmean(r.metrics["test"]["label"]["accuracy"] for r in seq)
    out = {"configs": len(cfgs), "sequential_s": t_seq, "batched_s": t_batched, "speedup": t_seq / t_batched,
           "acc_sequential": acc_s, "acc_batched": acc_b}
    if loop:
        with mock.patch.object(mmcache.heads.stacked, "stackable", lambda m: False):
            t = time.perf_counter()
            looped = [train(c) for c in cfgs]
            out["loop_s"] = time.perf_counter() - t
        out["loop_speedup"] = out["loop_s"] / t_batched
        out["acc_loop"] = statistics.fmean(r.metrics["test"]["label"]["accuracy"] for r in looped)
    return out


def run(quick: bool) -> dict[str, dict[str, Any]]:
    """Both measurements on a fresh synthetic cache; returns name -> figures."""
    epochs = 10 if quick else 30
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        cache = Path(tmp) / "cache"
        make_cache(cache)
        train_many(grid(cache, "probe", 1, 2))  # warm-up: imports and first-call costs on neither side
        train(grid(cache, "probe", 1, 1)[0])
        out["sweep_probe_32"] = measure(grid(cache, "probe", epochs, 32), loop=True)
        out["sweep_fusion_32"] = measure(grid(cache, "fusion", max(2, epochs // 5) if quick else epochs, 32))
    return out


def main() -> None:
    """Run the benchmark and print its table (optionally also as JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs (about a minute)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = run(args.quick)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), cpu; 32 configs each")
    print(f"{'sweep':<16} {'sequential s':>13} {'batched s':>10} {'speedup':>8} {'acc seq':>8} {'acc batched':>12}")
    for name, r in res.items():
        print(f"{name:<16} {r['sequential_s']:>13.2f} {r['batched_s']:>10.2f} {r['speedup']:>7.1f}x "
              f"{r['acc_sequential']:>8.4f} {r['acc_batched']:>12.4f}")
        if "loop_s" in r:
            print(f"{'  vs loop':<16} {r['loop_s']:>13.2f} {r['batched_s']:>10.2f} {r['loop_speedup']:>7.1f}x "
                  f"{r['acc_loop']:>8.4f} {r['acc_batched']:>12.4f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
