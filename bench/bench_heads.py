"""Heads benchmark: the `heads train` loop vs a plain DataLoader loop, and the lbfgs probe vs scikit-learn.

Usage: .venv/bin/python bench/bench_heads.py [--quick] [--threads N]

Data: a synthetic MVSA-sized task written as real feature stores + manifest in a temporary folder
(4,500 rows, 3,600 / 450 / 450 train / val / test, image and text `pooled` features of 512 dims
each, float16 as extracted; the 3-way label is the sign of an image score plus a text score, so it
needs both modalities). Everything is deleted at the end. All numbers are ratios within one run on
the same tensors; times are medians of interleaved repeats, so a busy machine slows both alike.

1. trainer  -- `train(TrainConfig)` (stores loaded once, index batching, per-epoch validation,
               best-epoch selection, final metrics) vs the same head, optimiser, schedule, epochs and
               batch size in a plain loop over `DataLoader(TensorDataset(...), shuffle=True)` with
               default collate and the same per-epoch validation and selection. Both get the
               features as float32 tensors in memory; `train` also times its store loading.
2. lbfgs    -- `--solver lbfgs` (full-batch torch L-BFGS) vs `sklearn LogisticRegression(lbfgs)` on
               the same concatenated features: one fit at the same penalty (C=1), and the whole
               validation grid (the same penalties, both warm-started, best on val). Accuracy on test.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmcache.cache.store import FeatureStore, store_path
from mmcache.data.base import Dataset, LabelSpace, Sample
from mmcache.heads import build_head
from mmcache.heads.data import load_cached
from mmcache.heads.train import LBFGS_GRID, TrainConfig, train

MODS = {"image": "clip", "text": "clip"}


def timeit(fns: list[Callable[[], Any]], repeat: int) -> tuple[list[float], list[Any]]:
    """Median wall time of each of `fns` (run interleaved) and each one's last result."""
    times: list[list[float]] = [[] for _ in fns]
    results: list[Any] = [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times], results


def make_cache(root: Path, n: int = 4500, d: int = 512, snr: float = 1.3, seed: int = 0) -> None:
    """Write cache/bench/{image,text}/clip.h5 and the manifest: a demo-like task at MVSA size."""
    rng = np.random.default_rng(seed)
    s_img, s_txt = rng.integers(-1, 2, n), rng.integers(-1, 2, n)
    label = np.sign(s_img + s_txt) + 1
    split = np.array(["train"] * int(0.8 * n) + ["val"] * int(0.1 * n) + ["test"] * (n - int(0.8 * n) - int(0.1 * n)))
    ids = [f"b{i:05d}" for i in range(n)]
    samples = [Sample(id=ids[i], split=str(split[i]), labels={"label": int(label[i])}) for i in range(n)]
    Dataset(name="bench", samples=samples, labels=LabelSpace(tasks={"label": ["negative", "neutral", "positive"]}),
            root=root).write_manifest(root / "bench" / "manifest.json")
    for mod, score in (("image", s_img), ("text", s_txt)):
        direction = rng.normal(size=d)
        direction /= np.linalg.norm(direction)
        x = rng.normal(size=(n, d)) / np.sqrt(d) * 4 + snr * np.outer(score, direction) / 2
        with FeatureStore(store_path(root, "bench", mod, "clip"), {"preset": f"bench-{mod}"}, "bench",
                          capacity=n) as st:
            st.write(ids, {"pooled": x.astype(np.float32)})


def dataloader_loop(tensors: dict[str, torch.Tensor], inputs: dict[str, Any], hp: dict[str, Any],
                    epochs: int, batch_size: int, lr: float, seed: int = 0) -> float:
    """The plain PyTorch baseline: TensorDataset + DataLoader (default collate), same head and schedule.

    Returns test accuracy at the epoch with the best validation accuracy.
    """
    torch.manual_seed(seed)
    head = build_head("linear", inputs, {"label": 3}, hp)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()

    def ds(split: str) -> TensorDataset:
        return TensorDataset(tensors[f"image_{split}"], tensors[f"text_{split}"], tensors[f"y_{split}"])

    train_dl = DataLoader(ds("train"), batch_size=batch_size, shuffle=True)
    val_dl = DataLoader(ds("val"), batch_size=batch_size)
    test_dl = DataLoader(ds("test"), batch_size=batch_size)

    def accuracy(dl: DataLoader) -> float:
        head.eval()
        correct = total = 0
        with torch.no_grad():
            for a, b, y in dl:
                pred = head({"image": {"pooled": a}, "text": {"pooled": b}})["label"].argmax(1)
                correct += int((pred == y).sum())
                total += len(y)
        return correct / total

    best, state = -1.0, None
    for _ in range(epochs):
        head.train()
        for a, b, y in train_dl:
            loss = loss_fn(head({"image": {"pooled": a}, "text": {"pooled": b}})["label"], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = accuracy(val_dl)
        if acc > best:
            best, state = acc, copy.deepcopy(head.state_dict())
        sched.step()
    head.load_state_dict(state)
    return accuracy(test_dl)


def bench_trainer(cache: Path, epochs: int, repeat: int) -> list[list[str]]:
    """`train()` vs the DataLoader loop for the D=256 fusion head and the D=0 probe (Adam)."""
    data = load_cached("bench", MODS, cache)
    tensors: dict[str, torch.Tensor] = {}
    for split, idx in data.split_index.items():
        for m in MODS:
            tensors[f"{m}_{split}"] = data.features[m]["pooled"][idx].float()
        tensors[f"y_{split}"] = data.targets["label"][idx]
    rows = []
    for name, hp in (("fusion D=256", {"D": 256, "dropout": 0.3}), ("probe D=0", {"D": 0})):
        cfg = TrainConfig(dataset="bench", modalities=dict(MODS), cache_dir=str(cache), head_hparams=hp,
                          epochs=epochs, batch_size=512, lr=1e-3, schedule="cosine", save=False, quiet=True)
        fit: list[float] = []

        def ours(cfg: TrainConfig = cfg, fit: list[float] = fit) -> float:
            r = train(cfg)
            fit.append(r.fit_seconds)
            return float(r.metrics["test"]["label"]["accuracy"])

        def base(hp: dict[str, Any] = hp) -> float:
            return dataloader_loop(tensors, data.inputs, hp, epochs, 512, 1e-3)

        (t_ours, t_base), (acc_ours, acc_base) = timeit([ours, base], repeat)
        t_fit = statistics.median(fit)
        rows.append([name, f"{epochs} ep", f"{t_base:.2f}", f"{t_fit:.2f}", f"{t_ours:.2f}",
                     f"{t_base / t_fit:.2f}x", f"{t_base / t_ours:.2f}x", f"{acc_base:.3f}", f"{acc_ours:.3f}"])
    return rows


def bench_lbfgs(cache: Path, repeat: int) -> list[list[str]]:
    """The torch L-BFGS probe vs scikit-learn LogisticRegression(lbfgs) on the same features."""
    from sklearn.linear_model import LogisticRegression

    data = load_cached("bench", MODS, cache)
    x = torch.cat([data.features[m]["pooled"] for m in MODS], 1).float().numpy()
    y = data.targets["label"].numpy()
    tr, va, te = (data.split_index[s].numpy() for s in ("train", "val", "test"))
    n = len(tr)
    rows = []

    def sk_single() -> float:
        return float(LogisticRegression(C=1.0, max_iter=1000).fit(x[tr], y[tr]).score(x[te], y[te]))

    def sk_grid() -> float:
        # The same penalties, strongest first, warm-started, best on validation: the same procedure as ours.
        clf = LogisticRegression(max_iter=1000, warm_start=True)
        best, best_acc = -1.0, 0.0
        for lam in LBFGS_GRID:
            clf.set_params(C=1.0 / (lam * n)).fit(x[tr], y[tr])
            v = clf.score(x[va], y[va])
            if v > best:
                best, best_acc = v, clf.score(x[te], y[te])
        return best_acc

    for name, grid, sk in (("one fit, C=1", [1.0 / n], sk_single), (f"grid of {len(LBFGS_GRID)}", None, sk_grid)):
        cfg = TrainConfig(dataset="bench", modalities=dict(MODS), cache_dir=str(cache), solver="lbfgs",
                          lbfgs_grid=grid, save=False, quiet=True)
        fit: list[float] = []

        def ours(cfg: TrainConfig = cfg, fit: list[float] = fit) -> float:
            r = train(cfg)
            fit.append(r.fit_seconds)
            return float(r.metrics["test"]["label"]["accuracy"])

        (t_ours, t_sk), (acc_ours, acc_sk) = timeit([ours, sk], repeat)
        t_fit = statistics.median(fit)
        rows.append([name, f"{t_sk:.3f}", f"{t_fit:.3f}", f"{t_ours:.3f}", f"{t_sk / t_fit:.2f}x",
                     f"{acc_sk:.3f}", f"{acc_ours:.3f}"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    """Format rows as a fixed-width text table."""
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(header)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    """Run both benchmarks and print their tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 epochs and fewer repeats (about a minute)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch and for BLAS (default: each library's own choice)")
    args = ap.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        # The same thread budget for both sides: torch's intra-op pool and numpy/scipy's BLAS (scikit-learn).
        torch.set_num_threads(args.threads)
        threadpool_limits(limits=args.threads)
    epochs, repeat = (20, 3) if args.quick else (100, 5)
    with tempfile.TemporaryDirectory(prefix="bench_heads_") as tmp:
        cache = Path(tmp) / "cache"
        make_cache(cache)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, BLAS threads "
              f"{args.threads or 'default'}, device cpu; 4,500 x (512 + 512) "
              f"features; median of {repeat}")
        print("\n1. heads train vs a DataLoader loop (same head, Adam 1e-3, cosine, batch 512, val each epoch)")
        print(table(["head", "epochs", "DataLoader s", "train fit s", "train total s", "speedup fit",
                     "speedup total", "acc DataLoader", "acc train"], bench_trainer(cache, epochs, repeat)))
        print("\n2. lbfgs probe vs scikit-learn LogisticRegression(lbfgs) on the same features")
        print(table(["fit", "sklearn s", "ours fit s", "ours total s", "speedup", "acc sklearn", "acc ours"],
                    bench_lbfgs(cache, repeat)))
        print("\n'total' includes loading the stores from disk and the final metrics; 'fit' is the training "
              "loop with its per-epoch validation (or the lbfgs fits).")


if __name__ == "__main__":
    main()
