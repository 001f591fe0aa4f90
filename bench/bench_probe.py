"""The lbfgs probe vs scikit-learn's LogisticRegression(solver="lbfgs"), one thread each.

Usage: .venv/bin/python bench/bench_probe.py [--quick]

Data: synthetic, generated here: N train + N/10 val rows of d float32 features (a 64-dim latent mixed into d
dims plus noise), a binary and a 3-class label from a linear score of the latent plus noise (full: 20,000 x 1024;
`--quick`: 5,000 x 512). Both sides get the same float32 matrix and fit the same L2 grid (`LBFGS_GRID` as
scikit-learn Cs, `sklearn_C`), strongest first, each warm-started from the previous fit (scikit-learn's
`warm_start=True`), tol 1e-4, and keep the best validation accuracy. Timed: the probe's whole grid
(`LogisticProbe` on the tensor, its fits, the validation of each) vs scikit-learn's grid with its validation;
median of interleaved repeats (5; `--quick` 3); torch at 1 thread, BLAS at 1 thread (threadpoolctl).
ratio = scikit-learn s / ours s of the medians; ratio_range = the lowest and highest ratio of one repeat's pair.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from mmcache.heads.losses import build_criterion
from mmcache.heads.probe import LBFGS_GRID, LogisticProbe, sklearn_C


def make(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n rows of d float32 features and k-class labels that a linear model separates imperfectly."""
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((n, 64)).astype(np.float32)
    mix = (rng.standard_normal((64, d)) / 8).astype(np.float32)
    x = lat @ mix + np.float32(0.5) * rng.standard_normal((n, d), dtype=np.float32)
    y = (lat @ rng.standard_normal((64, k)) + rng.standard_normal((n, k))).argmax(1)
    return np.ascontiguousarray(x, dtype=np.float32), y


def compare(n: int, d: int, k: int, repeat: int) -> dict[str, Any]:
    """Median fit-and-select time of the probe and of scikit-learn over the same grid, with their choices."""
    from sklearn.linear_model import LogisticRegression

    x, y = make(n + n // 10, d, k)
    xt, yt, xv, yv = x[:n], y[:n], x[n:], y[n:]
    grid = list(LBFGS_GRID)
    Cs = [sklearn_C(lam, n, k) for lam in grid]
    crit = build_criterion("ce", {"label": k})
    zt, ytt, zv = torch.from_numpy(xt), torch.from_numpy(yt), torch.from_numpy(xv).double()

    def ours() -> tuple[float, float]:
        probe = LogisticProbe(zt, {"label": ytt}, {"label": k}, crit)
        best = (-1.0, 0.0)
        for i, fit in enumerate(probe.fit_grid(grid)):
            w, b = probe.weights(fit.x)["label"]
            acc = float(((zv @ w.T + b).argmax(1).numpy() == yv).mean())
            if acc > best[0]:
                best = (acc, Cs[i])
        return best

    def sk() -> tuple[float, float]:
        clf = LogisticRegression(tol=1e-4, max_iter=500, warm_start=True)
        best = (-1.0, 0.0)
        for C in Cs:
            acc = float(clf.set_params(C=C).fit(xt, yt).score(xv, yv))
            if acc > best[0]:
                best = (acc, C)
        return best

    times: dict[str, list[float]] = {"ours": [], "sk": []}
    out: dict[str, tuple[float, float]] = {}
    for _ in range(repeat):
        for name, fn in (("ours", ours), ("sk", sk)):
            t = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t)
    t_ours, t_sk = statistics.median(times["ours"]), statistics.median(times["sk"])
    pairs = [b / a for a, b in zip(times["ours"], times["sk"], strict=True)]
    return {"ours_s": t_ours, "baseline_s": t_sk, "ratio": t_sk / t_ours, "ratio_range": [min(pairs), max(pairs)],
            "repeats": repeat, "acc_ours": out["ours"][0],
            "acc_baseline": out["sk"][0], "C_ours": out["ours"][1], "C_baseline": out["sk"][1],
            "same_C": out["ours"][1] == out["sk"][1], "rows": n, "features": d}


def run(quick: bool) -> dict[str, dict[str, Any]]:
    """Binary and 3-class rows for bench/run.py, at one thread for torch and for BLAS."""
    n, d, repeat = (5000, 512, 3) if quick else (20000, 1024, 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            return {"lbfgs_sklearn_binary": compare(n, d, 2, repeat), "lbfgs_sklearn_3class": compare(n, d, 3, repeat)}
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5,000 x 512 instead of 20,000 x 1024")
    args = ap.parse_args()
    for name, r in run(args.quick).items():
        lo, hi = r["ratio_range"]
        print(f"{name}: ours {r['ours_s']:.2f} s, scikit-learn {r['baseline_s']:.2f} s, {r['ratio']:.2f}x "
              f"({lo:.2f}-{hi:.2f}x over {r['repeats']} repeats); "
              f"val accuracy {r['acc_ours']:.4f} / {r['acc_baseline']:.4f}; C {r['C_ours']:.4g} / "
              f"{r['C_baseline']:.4g}")


if __name__ == "__main__":
    main()
