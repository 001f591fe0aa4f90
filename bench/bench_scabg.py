"""SCABG ablation: which parts of the SCABG head and loss earn their place, against simpler heads.

Usage: .venv/bin/python bench/bench_scabg.py [--quick] [--seeds 0,1,2] [--epochs N] [--threads N]

Data: a synthetic entity-level token task written as real feature stores + manifest in a
temporary folder (deleted at the end). Each row has an image (8-16 region tokens), a tweet (4-12
tokens) and a caption (`context`, 3-8 tokens), padded with random values where the mask is False
(so a head that ignores masks sees noise):

- the image holds two aspect tokens at random positions, each an aspect embedding plus a score
  embedding (s_0, s_1 in {-1, 0, +1}); the other tokens are distractors;
- the tweet's `pooled` vector names the target entity e in {0, 1} (plus noise), and one tweet token
  carries the text score s_txt at a random position;
- the caption carries s_e with 60 % probability (else a random score);
- label = sign(s_e + s_txt) (negative / neutral / positive).

Only a head that reads the image token of the entity named by the text (a condition-dependent
choice) and fuses it with the text token can reach high accuracy. This is a task built so that
SCABG's mechanisms can matter; what it says about real data is limited, and the report says so.

Every config runs for each seed; the table gives the mean and standard deviation of val/test
accuracy and macro-F1 and the delta of test macro-F1 to the full model, plus mean seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcache.cache.store import FeatureStore, store_path
from mmcache.data.base import Dataset, LabelSpace, Sample
from mmcache.heads.sweep import SCABG_ABLATION, format_table, run_sweep, summarize
from mmcache.heads.train import TrainConfig

LABELS = ["negative", "neutral", "positive"]


def make_dataset(cache: Path, n: int, seed: int = 0, d_img: int = 32, d_txt: int = 24) -> None:
    """Write cache/scabgtoy/{image,text,context}/tok.h5 and the manifest."""
    rng = np.random.default_rng(seed)
    aspect = rng.normal(size=(2, d_img))
    score_img = rng.normal(size=(3, d_img))
    score_txt = rng.normal(size=(3, d_txt))
    entity = rng.normal(size=(2, d_txt))
    s = rng.integers(-1, 2, (n, 2))
    e = rng.integers(0, 2, n)
    s_e = s[np.arange(n), e]
    s_txt = rng.integers(-1, 2, n)
    y = np.sign(s_e + s_txt) + 1
    split = rng.choice(["train", "val", "test"], n, p=[0.7, 0.15, 0.15])
    ids = [f"s{i:05d}" for i in range(n)]

    def seq(T: int, d: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distractor tokens [n,T,d] with lengths in [lo, hi], padded with loud noise."""
        lens = rng.integers(lo, hi + 1, n)
        mask = np.arange(T)[None] < lens[:, None]
        tok = rng.normal(size=(n, T, d)) * 0.8
        tok[~mask] = rng.normal(size=(int((~mask).sum()), d)) * 5  # loud padding: masks must matter
        return tok, mask, lens

    img, mimg, limg = seq(16, d_img, 8, 16)
    for i in range(n):
        p0, p1 = rng.choice(limg[i], 2, replace=False)
        img[i, p0] = aspect[0] + score_img[s[i, 0] + 1] + 0.3 * rng.normal(size=d_img)
        img[i, p1] = aspect[1] + score_img[s[i, 1] + 1] + 0.3 * rng.normal(size=d_img)
    txt, mtxt, ltxt = seq(12, d_txt, 4, 12)
    txt[np.arange(n), rng.integers(0, ltxt)] = score_txt[s_txt + 1] + 0.3 * rng.normal(size=(n, d_txt))
    txt_pooled = entity[e] + 0.5 * rng.normal(size=(n, d_txt))
    ctx, mctx, lctx = seq(8, d_txt, 3, 8)
    cap = np.where(rng.random(n) < 0.6, s_e, rng.integers(-1, 2, n))
    ctx[np.arange(n), rng.integers(0, lctx)] = score_txt[cap + 1] + 0.3 * rng.normal(size=(n, d_txt))

    def pooled(tok: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Masked mean of the tokens."""
        return (tok * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)

    stores = {"image": {"pooled": pooled(img, mimg), "tokens": img, "mask": mimg},
              "text": {"pooled": txt_pooled, "tokens": txt, "mask": mtxt},
              "context": {"pooled": pooled(ctx, mctx), "tokens": ctx, "mask": mctx}}
    samples = [Sample(id=ids[i], split=str(split[i]), labels={"sentiment": int(y[i])}) for i in range(n)]
    Dataset(name="scabgtoy", samples=samples, labels=LabelSpace(tasks={"sentiment": LABELS}, metric="macro_f1"),
            root=cache).write_manifest(cache / "scabgtoy" / "manifest.json")
    for mod, arrays in stores.items():
        with FeatureStore(store_path(cache, "scabgtoy", mod, "tok"), {"preset": f"scabgtoy-{mod}"}, "scabgtoy",
                          capacity=n) as st:
            st.write(ids, {k: v.astype(np.float32) if v.dtype != bool else v for k, v in arrays.items()})


def main() -> None:
    """Run the ablation and the baseline heads; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows, epochs and seeds")
    ap.add_argument("--seeds", default=None, help="comma list of seeds (default 0,1,2; quick: 0)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=64, help="SCABG hidden size (the reference uses 512)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a busy CPU)")
    ap.add_argument("--only", default=None, help="comma list of config names to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    epochs = args.epochs or (6 if args.quick else 10)
    rows_n = args.rows or (1200 if args.quick else 2000)
    h = args.hidden
    scabg_hp = {"hidden": h, "out_dim": 64, "heads": 4, "branch_heads": 4, "queries": 4, "dropout": 0.1}
    configs: list[tuple[str, dict[str, Any]]] = [
        (name, {"head": "scabg", "loss": "scabg", **{f"hp.{k}": v for k, v in scabg_hp.items()}, **ov})
        for name, ov in SCABG_ABLATION
    ]
    configs += [
        ("base:linear", {"head": "linear", "D": 128, "dropout": 0.3}),
        ("base:gated", {"head": "gated", "D": 128, "dropout": 0.1}),
        ("base:xattn", {"head": "xattn", "D": h, "heads": 4, "dropout": 0.1}),
    ]
    if args.only:
        keep = set(args.only.split(","))
        configs = [c for c in configs if c[0] in keep]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        make_dataset(cache, rows_n)
        base = TrainConfig(dataset="scabgtoy", modalities={"image": "tok", "text": "tok", "context": "tok"},
                           cache_dir=str(cache), runs_dir=str(Path(tmp) / "runs"), epochs=epochs, batch_size=128,
                           lr=2e-3, weight_decay=1e-4, optimizer="adamw", device="cpu", select_metric="macro_f1")
        rows = run_sweep(base, configs, seeds=seeds)
    summary = summarize(rows)
    full = next((s for s in summary if s["config"] == "full"), None)
    print(f"\nSCABG ablation on a synthetic token task: {rows_n} rows, {epochs} epochs, seeds {seeds}, "
          f"hidden {h}, {torch.get_num_threads()} threads")
    print(format_table(summary))
    if full and "test_macro_f1" in full:
        print("\ndelta test macro-F1 vs full (negative: switching the part off hurts):")
        for s in summary:
            if s["config"] != "full" and "test_macro_f1" in s:
                sd = statistics.fmean([full.get("test_macro_f1_std", 0.0), s.get("test_macro_f1_std", 0.0)])
                print(f"  {s['config']:<22} {s['test_macro_f1'] - full['test_macro_f1']:+.4f}  (seed std ~{sd:.3f})")


if __name__ == "__main__":
    main()
