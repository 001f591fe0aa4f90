"""Fine-tuning throughput and peak memory: full fine-tuning vs LoRA, each with and without gradient checkpointing.

Usage: .venv/bin/python bench/bench_finetune.py [--preset clip] [--random-init] [--device cuda] [--batch-size 64]
                                                [--steps 40] [--modes full,lora,full+gc,lora+gc] [--json PATH]

On a GPU: `--random-init` with the default preset (CLIP ViT-B-32) at batch 64. On a CPU the default is
clip-tiny for a few steps: a check that every mode runs, not a figure to report.

Each mode is one real `finetune run` (image and text towers of the same CLIP preset, the default linear
head) for one epoch of `--steps` optimizer steps over the demo dataset at the model's input size
(generated JPEGs and texts, written to a temporary folder and deleted at the end). The figures are the
run's own `metrics.json` `train` block: samples/s over the training steps (decoding included: loader
workers feed the model as in a real run), peak memory (CUDA: `max_memory_allocated`; CPU: the process's
resident set, which only grows), trainable and total parameters. `--random-init` saves a random-init
model of the preset's architecture to a local file first (same compute as the pretrained weights,
nothing downloaded). Ratios between modes come from one run on one machine; absolute figures only mean
something on a GPU, with the device named (printed and written with them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from mmcache.data.demo import generate_demo  # noqa: E402
from mmcache.finetune.run import FinetuneConfig, finetune  # noqa: E402

MODES = {"full": {}, "lora": {"lora": True}, "full+gc": {"grad_checkpointing": True},
         "lora+gc": {"lora": True, "grad_checkpointing": True}}


def random_weights(preset: str, folder: Path) -> str:
    """The preset with its architecture's random-init weights saved to a local file (open_clip format)."""
    import open_clip

    from mmcache.extract import resolve_preset

    _, cfg = resolve_preset(preset)
    if cfg.get("family") != "clip" or "arch" not in cfg:
        raise SystemExit("--random-init applies to clip presets with a named architecture (clip, clip-b16, ...)")
    torch.manual_seed(0)
    model = open_clip.create_model(str(cfg["arch"]), pretrained=None)
    path = folder / f"{cfg['arch']}-random.pt"
    torch.save(model.state_dict(), path)
    return f"{preset}[weights={path}]"


def measure(mode: str, encoder: str, data: Path, runs: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One `finetune run` of `mode`; its metrics.json `train` block plus wall seconds."""
    cfg = FinetuneConfig(dataset="demo", data_dir=str(data), encoders={"image": encoder, "text": encoder},
                         runs_dir=str(runs), run_name=mode.replace("+", "-"), epochs=1, batch_size=args.batch_size,
                         limit=args.batch_size * args.steps, num_workers=args.num_workers, device=args.device,
                         quiet=True, seed=0, **MODES[mode])
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = finetune(cfg)
    wall = time.perf_counter() - t
    assert res is not None and res.run_dir is not None
    train = json.loads((Path(res.run_dir) / "metrics.json").read_text())["train"]
    return {"mode": mode, "wall_s": wall, **{k: train.get(k) for k in (
        "samples_per_s", "samples", "train_seconds", "peak_memory_bytes", "peak_memory", "trainable_params",
        "total_params", "device")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--preset", default=None,
                    help="CLIP preset for both towers (default: clip, ViT-B-32, on a GPU; clip-tiny on a CPU)")
    ap.add_argument("--random-init", action="store_true", help="random weights of the preset's architecture")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per mode, one epoch (40 GPU, 8 CPU)")
    ap.add_argument("--quick", action="store_true", help="3 steps per mode")
    ap.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.preset = args.preset or ("clip" if gpu else "clip-tiny")
    args.steps = 3 if args.quick else args.steps or (40 if gpu else 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        tmp_path = Path(tmp)
        encoder = random_weights(args.preset, tmp_path) if args.random_init else args.preset
        # train / val / test: the train split holds --steps full batches.
        n = int(args.batch_size * args.steps / 0.8) + 64
        data = generate_demo(tmp_path / "demo", n=n, seed=0, size=224)
        for mode in modes:
            rows.append(measure(mode, encoder, data, tmp_path / "runs", args))
            r = rows[-1]
            print(f"{mode:<8} {r['samples_per_s']:.1f} samples/s, peak {r['peak_memory_bytes'] / 2**30:.2f} GiB "
                  f"({r['peak_memory']}), trainable {r['trainable_params']:,} of {r['total_params']:,}", flush=True)
    info = {"machine": machine(), "preset": args.preset, "random_init": args.random_init, "device": args.device,
            "batch_size": args.batch_size, "steps": args.steps, "rows": rows}
    base = next((r for r in rows if r["mode"] == "full"), None)
    m = info["machine"]
    init = " (random init)" if args.random_init else ""
    print(f"\n{m['gpu'] or m['cpu']} ({m['cores']} CPU cores, torch {m['torch']}); {args.preset}{init}, batch "
          f"{args.batch_size}, {args.steps} steps per mode")
    print(f"{'mode':<8} {'samples/s':>10} {'vs full':>8} {'peak GiB':>9} {'vs full':>8} {'trainable':>12}")
    for r in rows:
        speed = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        mem = r["peak_memory_bytes"] / base["peak_memory_bytes"] if base else float("nan")
        print(f"{r['mode']:<8} {r['samples_per_s']:>10.1f} {speed:>7.2f}x {r['peak_memory_bytes'] / 2**30:>9.2f} "
              f"{mem:>7.2f}x {r['trainable_params']:>12,}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
