"""The headline ratios with their floors: sweeps, the trainer and the store, each against a named baseline.

Usage: .venv/bin/python bench/run.py [--quick] [--check] [--out bench/results]

Every figure is a ratio within one run on the same data (a busy machine slows both sides alike):

- sweep_probe_32   32 linear-probe configs trained by `heads sweep` (stores loaded once, configs stacked)
                   vs the same 32 configs trained one after another by `train()` in one process (today's
                   single run takes the same closed-form step: the ratio is what batching alone buys)
- sweep_probe_32_loop  the same sweep vs the 32 configs trained one after another by the per-config
                   training loop (autograd and a torch optimizer per config): the sweep before batching
- sweep_fusion_32  the same for 32 configs of the D=256 fusion head (lockstep groups)
- trainer_probe    `heads train` of the D=0 probe vs a plain DataLoader(TensorDataset) loop with the same
                   head, optimizer, schedule, epochs, batch size and per-epoch validation (fit time)
- trainer_fusion   the same for the D=256 fusion head
- store_read       numpy `fromfile` of a split's bytes vs `StoreReader.load(split=)` of the same rows
                   (ratio = numpy time / store time: 1.0 is raw-file speed)
- lbfgs_sklearn_binary, lbfgs_sklearn_3class  `--solver lbfgs`'s L2 grid (fits + validation) vs scikit-learn's
                   LogisticRegression(lbfgs) over the same Cs, warm-started, one thread each, on synthetic float32
                   features (bench_probe.py: 20,000 x 1024; --quick 5,000 x 512); records both chosen Cs and accuracies
- stream_vs_memory `heads train --load stream` vs `--load memory` epoch time of the gated head on the same pooled
                   rows, each in a child process (bench_scale.py), two of each alternating (medians): the
                   throughput streaming keeps

`--check` fails (exit 1) when a ratio is under its floor (`--quick` floors: sizes are small, the machine is
shared). Writes `<out>.json` and `<out>.md`, each row naming its baseline and the machine. Everything the
benchmarks write lives in temporary folders that are deleted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_heads  # noqa: E402
import bench_probe  # noqa: E402
import bench_scale  # noqa: E402
import bench_store  # noqa: E402
import bench_sweep  # noqa: E402
from common import machine  # noqa: E402

from mmcache.heads.data import load_cached  # noqa: E402
from mmcache.heads.train import TrainConfig, train  # noqa: E402

# name -> (floor with --quick, floor of the full run, baseline, what is timed)
FLOORS: dict[str, tuple[float, float, str, str]] = {
    "sweep_probe_32": (4.0, 5.0, "32 sequential train() calls", "heads sweep, 32 linear probes (D=0)"),
    "sweep_probe_32_loop": (10.0, 10.0, "32 configs one after another in the per-config training loop",
                            "heads sweep, 32 linear probes (D=0)"),
    "sweep_fusion_32": (0.9, 0.9, "32 sequential train() calls", "heads sweep, 32 fusion heads (D=256)"),
    "trainer_probe": (2.5, 2.5, "DataLoader(TensorDataset) loop", "heads train fit, probe (D=0)"),
    "trainer_fusion": (0.9, 0.9, "DataLoader(TensorDataset) loop", "heads train fit, fusion head (D=256)"),
    # a read of milliseconds: the quick floor leaves room for a busy machine
    "store_read": (0.25, 0.4, "numpy fromfile of the same bytes", "StoreReader.load(split=)"),
    # one thread each; the quick sizes are small enough for fixed costs to weigh
    "lbfgs_sklearn_binary": (0.7, 1.0, "sklearn LogisticRegression(lbfgs), same Cs", "--solver lbfgs grid, 2 classes"),
    "lbfgs_sklearn_3class": (0.7, 1.0, "sklearn LogisticRegression(lbfgs), same Cs", "--solver lbfgs grid, 3 classes"),
    "stream_vs_memory": (0.7, 0.8, "heads train --load memory (rows as tensors)",
                         "heads train --load stream (rows read from the stores per batch), gated head"),
}


def trainer(cache: Path, hp: dict[str, Any], epochs: int, repeat: int) -> dict[str, Any]:
    """`train()` fit time vs the DataLoader loop (medians of interleaved repeats)."""
    data = load_cached("bench", bench_heads.MODS, cache, quiet=True)
    tensors: dict[str, torch.Tensor] = {}
    for split, idx in data.split_index.items():
        for m in bench_heads.MODS:
            tensors[f"{m}_{split}"] = data.features[m]["pooled"][idx].float()
        tensors[f"y_{split}"] = data.targets["label"][idx]
    cfg = TrainConfig(dataset="bench", modalities=dict(bench_heads.MODS), cache_dir=str(cache), head_hparams=hp,
                      epochs=epochs, batch_size=512, lr=1e-3, save=False, quiet=True)
    fit: list[float] = []

    def ours() -> float:
        r = train(cfg)
        fit.append(r.fit_seconds)
        return float(r.metrics["test"]["label"]["accuracy"])

    def base() -> float:
        return bench_heads.dataloader_loop(tensors, data.inputs, hp, epochs, 512, 1e-3)

    (_, t_base), (acc_ours, acc_base) = bench_heads.timeit([ours, base], repeat)
    t_fit = statistics.median(fit)
    return {"ours_s": t_fit, "baseline_s": t_base, "ratio": t_base / t_fit, "acc_ours": acc_ours,
            "acc_baseline": acc_base, "epochs_per_s": epochs / t_fit}


def run(quick: bool) -> dict[str, dict[str, Any]]:
    """Every measurement; name -> figures with `ratio` (higher is better for us)."""
    out: dict[str, dict[str, Any]] = {}
    sweep = bench_sweep.run(quick)
    for name, r in sweep.items():
        out[name] = {"ours_s": r["batched_s"], "baseline_s": r["sequential_s"], "ratio": r["speedup"],
                     "acc_ours": r["acc_batched"], "acc_baseline": r["acc_sequential"],
                     "configs_per_s": r["configs"] / r["batched_s"]}
        if "loop_s" in r:
            out[f"{name}_loop"] = {"ours_s": r["batched_s"], "baseline_s": r["loop_s"], "ratio": r["loop_speedup"],
                                   "acc_ours": r["acc_batched"], "acc_baseline": r["acc_loop"],
                                   "configs_per_s": r["configs"] / r["batched_s"]}
    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        cache = Path(tmp) / "cache"
        bench_heads.make_cache(cache)
        epochs, repeat = (10, 3) if quick else (40, 5)
        out["trainer_probe"] = trainer(cache, {"D": 0}, epochs, repeat)
        out["trainer_fusion"] = trainer(cache, {"D": 256, "dropout": 0.3}, epochs, repeat)
        rows = bench_store.bench_read(Path(tmp), 50_000 if quick else 100_000, 768, 9)
        t_raw, t_store = rows[0][1], rows[1][1]
        out["store_read"] = {"ours_s": t_store, "baseline_s": t_raw, "ratio": t_raw / t_store}
    out.update(bench_probe.run(quick))
    out["stream_vs_memory"] = stream_vs_memory(20_000 if quick else 100_000)
    return out


def stream_vs_memory(n: int) -> dict[str, Any]:
    """Epoch time per row of the gated head on `n` pooled rows, streamed vs in memory (bench_scale's children,
    alternating, two of each: medians)."""
    rows = bench_scale.run({"pooled": [n]}, None, epochs=4, heads=["gated"], repeat=2, loads=False)
    by = {r["mode"]: r for r in rows if r["table"] == "train"}
    if any("error" in r for r in rows):
        raise SystemExit(f"stream_vs_memory: {[r.get('error') for r in rows]}")
    return {"ours_s": by["stream"]["epoch_s"], "baseline_s": by["memory"]["epoch_s"],
            "ratio": by["memory"]["epoch_s"] / by["stream"]["epoch_s"],
            "peak_rss_stream": by["stream"]["peak_rss"], "peak_rss_memory": by["memory"]["peak_rss"]}


def markdown(res: dict[str, dict[str, Any]], info: dict[str, Any], quick: bool) -> str:
    """The results as a markdown table naming each baseline and the machine."""
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} "
             f"thread(s), GPU: {info['gpu'] or 'none'}; {'--quick sizes' if quick else 'full sizes'}; "
             f"{time.strftime('%Y-%m-%d')}", "",
             "| measurement | ours | baseline | ours s | baseline s | ratio | floor |", "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        fq, ff, baseline, what = FLOORS[name]
        lines.append(f"| {name} | {what} | {baseline} | {r['ours_s']:.3f} | {r['baseline_s']:.3f} | "
                     f"{r['ratio']:.2f}x | {fq if quick else ff:g}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run, print, write results, and check the floors when asked."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a couple of minutes)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a ratio is below its floor")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="results stem: writes <out>.json and <out>.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = run(args.quick)
    info = machine()
    md = markdown(res, info, args.quick)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "quick": args.quick, "results": res,
                                                         "floors": {k: v[0 if args.quick else 1]
                                                                    for k, v in FLOORS.items()}}, indent=2))
    args.out.with_suffix(".md").write_text(md)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')} in {time.perf_counter() - t0:.0f} s")
    if args.check:
        low = [f"{k}: {r['ratio']:.2f}x < floor {FLOORS[k][0 if args.quick else 1]:g}x" for k, r in res.items()
               if r["ratio"] < FLOORS[k][0 if args.quick else 1]]
        if low:
            print("below floor: " + "; ".join(low), file=sys.stderr)
            sys.exit(1)
        print("every ratio is at or above its floor")


if __name__ == "__main__":
    main()
