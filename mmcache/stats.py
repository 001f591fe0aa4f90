"""Statistics that decide whether a difference between configs is real (numpy and scipy; no torch).

- `interval(values)`: mean, sample standard deviation and the 95% Student-t interval of the mean over seeds or
  folds (`mean ± t(0.975, n-1) * std / sqrt(n)`, as `scipy.stats.t.interval`).
- `paired_ttest(a, b)`: `scipy.stats.ttest_rel` over runs paired by seed (and fold), from at least 3 pairs.
- `paired_bootstrap(a, b, metric)`: resample the test rows with replacement (the same resample for both configs,
  one per distinct set of test rows, e.g. per fold) and recompute the metric of every run; the difference of the
  configs' mean metric over their runs gives a 95% percentile interval and a two-sided p-value
  (`2 * min(P(d <= 0), P(d >= 0))`, at most 1). Metrics are computed on resample counts (a weight per row), so
  1000 resamples cost a few matrix products; their values equal `classification_metrics` on the resampled rows.
- `Predictions`: a run's per-row test predictions (ids, labels, probabilities), read and written as
  `predictions_test.csv` in its run folder (the columns of `heads predict`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcache.errors import MMCacheError

ALPHA = 0.05
BOOTSTRAP = 1000  # resamples of the paired bootstrap
PREDICTIONS_FILE = "predictions_test.csv"
BOOT_METRICS = ("accuracy", "macro_f1", "weighted_f1", "auroc")


def interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """n, mean, std (ddof 1) and the t-interval of the mean (`ci_low`, `ci_high`); std and the interval are None
    for fewer than 2 finite values."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    out: dict[str, Any] = {"n": int(v.size), "mean": float(v.mean()) if v.size else None, "std": None,
                           "ci_low": None, "ci_high": None}
    if v.size >= 2:
        std = float(v.std(ddof=1))
        half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1)) * std / math.sqrt(v.size)
        out.update(std=std, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def paired_ttest(a: Sequence[float], b: Sequence[float], min_pairs: int = 3) -> dict[str, Any] | None:
    """Student's paired t-test of a - b (`scipy.stats.ttest_rel`, two-sided); None for fewer than `min_pairs`
    pairs. Identical pairs give t = 0 and p = 1 (scipy's NaN there says nothing differs)."""
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired_ttest: {x.shape} and {y.shape} values do not pair")
    if x.size < min_pairs:
        return None
    d = x - y
    if np.allclose(d, d[0], rtol=0, atol=1e-12):
        if abs(d[0]) <= 1e-12:
            return {"t": 0.0, "p": 1.0, "n": int(x.size), "mean_diff": 0.0}
        return {"t": math.copysign(math.inf, d[0]), "p": 0.0, "n": int(x.size), "mean_diff": float(d[0])}
    r = stats.ttest_rel(x, y)
    return {"t": float(r.statistic), "p": float(r.pvalue), "n": int(x.size), "mean_diff": float(d.mean())}


@dataclass
class Predictions:
    """One run's predictions on its test rows: ids, labels [N] (class index) and probabilities [N, C]."""

    ids: list[str]
    y: np.ndarray
    prob: np.ndarray
    classes: list[str] | None = None

    def sorted(self) -> Predictions:
        """The rows in id order (runs over the same rows then line up)."""
        order = sorted(range(len(self.ids)), key=self.ids.__getitem__)
        return Predictions([self.ids[i] for i in order], self.y[order], self.prob[order], self.classes)

    def labelled(self) -> Predictions:
        keep = np.flatnonzero(self.y >= 0)
        return Predictions([self.ids[i] for i in keep], self.y[keep], self.prob[keep], self.classes)


def write_predictions(run_dir: Path, preds: Predictions) -> Path:
    """`<run_dir>/predictions_test.csv`: id, label, predicted, p_<class> (as `heads predict` writes them)."""
    classes = preds.classes or [str(c) for c in range(preds.prob.shape[1])]
    path = run_dir / PREDICTIONS_FILE
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "predicted", *(f"p_{c}" for c in classes)])
        for i, sid in enumerate(preds.ids):
            y = int(preds.y[i])
            w.writerow([sid, classes[y] if y >= 0 else "", classes[int(preds.prob[i].argmax())],
                        *(f"{p:.6g}" for p in preds.prob[i])])
    tmp.replace(path)
    return path


def read_predictions(run_dir: Path) -> Predictions | None:
    """A run folder's `predictions_test.csv` (None when it has none); unreadable is an MMCacheError."""
    path = run_dir / PREDICTIONS_FILE
    if not path.is_file():
        return None
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        header = rows[0]
        classes = [h[2:] for h in header[3:]]
        index = {c: k for k, c in enumerate(classes)}
        ids = [r[0] for r in rows[1:]]
        y = np.array([index[r[1]] if r[1] else -1 for r in rows[1:]], dtype=np.int64)
        prob = np.array([[float(x) for x in r[3:]] for r in rows[1:]], dtype=np.float64).reshape(len(ids), len(classes))
    except (OSError, IndexError, KeyError, ValueError) as e:
        raise MMCacheError(f"{path}: unreadable predictions ({type(e).__name__}: {e}); delete it or train the run "
                           "again") from None
    return Predictions(ids, y, prob, classes)


# ------------------------------------------------------------------ metrics of weighted rows


def weighted_metric(metric: str, y: np.ndarray, prob: np.ndarray, w: np.ndarray) -> np.ndarray:
    """`metric` of each weighting: `w` [B, N] counts of each row (a bootstrap resample), y [N], prob [N, C].
    Returns [B] values, NaN where undefined (AUROC of a resample with one class). The same values as
    `classification_metrics` on the rows repeated by their counts."""
    n_classes = prob.shape[1]
    w = np.asarray(w, dtype=np.float64)
    total = w.sum(1)
    pred = prob.argmax(1)
    if metric == "accuracy":
        return (w @ (pred == y).astype(np.float64)) / total
    if metric in ("macro_f1", "weighted_f1"):
        pair = y * n_classes + pred
        onehot = np.zeros((len(y), n_classes * n_classes))
        onehot[np.arange(len(y)), pair] = 1.0
        cm = (w @ onehot).reshape(-1, n_classes, n_classes)
        tp = np.diagonal(cm, axis1=1, axis2=2)
        denom = cm.sum(1) + cm.sum(2)
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
        if metric == "macro_f1":
            return f1.mean(1)
        support = cm.sum(2)
        return (f1 * support).sum(1) / support.sum(1)
    if metric == "auroc":
        if n_classes == 2:
            return _weighted_auroc(y == 1, prob[:, 1], w)
        per = np.stack([_weighted_auroc(y == c, prob[:, c], w) for c in range(n_classes)], 1)
        return per.mean(1)  # NaN when a class is absent (as classification_metrics: OvR needs every class)
    raise MMCacheError(f"paired bootstrap: no metric {metric!r}; choose one of {', '.join(BOOT_METRICS)}")


def _weighted_auroc(pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC per weighting (ties count one half), [B]; NaN without positives or negatives."""
    order = np.argsort(score, kind="mergesort")
    s, p = score[order], pos[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ws = w[:, order]
    wpos = np.add.reduceat(ws * p, starts, axis=1)  # [B, G] weight of positives per tie group
    wneg = np.add.reduceat(ws * ~p, starts, axis=1)
    below = np.cumsum(wneg, 1) - wneg  # negatives strictly below each group
    npos, nneg = wpos.sum(1), wneg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (wpos * (below + 0.5 * wneg)).sum(1) / (npos * nneg)
    return np.where((npos > 0) & (nneg > 0), auc, np.nan)


def boot_metric(metric: str) -> str:
    """The metric the bootstrap compares for a selection metric: itself, or accuracy for loss and top-2."""
    return metric if metric in BOOT_METRICS else "accuracy"


def paired_bootstrap(a: Sequence[Predictions], b: Sequence[Predictions], metric: str, n_boot: int = BOOTSTRAP,
                     seed: int = 0, chunk: int = 200) -> dict[str, Any]:
    """Paired bootstrap of mean-metric(a) - mean-metric(b) over resampled test rows.

    `a` and `b` are the runs of two configs (seeds, folds); every run's rows must be the rows of some run of the
    other config (the same ids), so each resample applies to both. Resamples draw row positions with
    `numpy.random.default_rng(seed).integers(0, n, (n_boot, n))`, one draw per distinct row set in order of first
    appearance. Returns the observed difference, its 95% percentile interval, the two-sided p-value and the
    resamples used (those where the metric is defined for every run)."""
    runs_a = [r.labelled().sorted() for r in a]
    runs_b = [r.labelled().sorted() for r in b]
    if not runs_a or not runs_b:
        raise MMCacheError("paired bootstrap: a config has no run with test predictions")
    sets: dict[tuple[str, ...], int] = {}
    for r in (*runs_a, *runs_b):
        sets.setdefault(tuple(r.ids), len(sets))
    keys_a = {tuple(r.ids) for r in runs_a}
    keys_b = {tuple(r.ids) for r in runs_b}
    if keys_a != keys_b:
        raise MMCacheError("paired bootstrap: the two configs were tested on different rows; compare runs over the "
                           "same test split (same dataset, stores and folds)")
    rng = np.random.default_rng(seed)
    draws = {k: rng.integers(0, len(k), size=(n_boot, len(k))) for k in sets}
    diffs = np.empty(n_boot)
    for lo in range(0, n_boot, chunk):
        hi = min(n_boot, lo + chunk)
        weights = {k: np.stack([np.bincount(row, minlength=len(k)) for row in d[lo:hi]]) for k, d in draws.items()}

        def mean_metric(runs: list[Predictions], weights: dict[tuple[str, ...], np.ndarray] = weights) -> np.ndarray:
            return np.mean([weighted_metric(metric, r.y, r.prob, weights[tuple(r.ids)]) for r in runs], 0)

        diffs[lo:hi] = mean_metric(runs_a) - mean_metric(runs_b)

    def observed(runs: list[Predictions]) -> float:
        return float(np.mean([weighted_metric(metric, r.y, r.prob, np.ones((1, len(r.ids))))[0] for r in runs]))

    ok = diffs[np.isfinite(diffs)]
    out: dict[str, Any] = {"metric": metric, "diff": observed(runs_a) - observed(runs_b), "resamples": int(ok.size)}
    if ok.size == 0:
        out.update(ci_low=None, ci_high=None, p=None)
        return out
    lo_ci, hi_ci = np.percentile(ok, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    p = min(1.0, 2 * min(float((ok <= 0).mean()), float((ok >= 0).mean())))
    out.update(ci_low=float(lo_ci), ci_high=float(hi_ci), p=p)
    return out


# ------------------------------------------------------------------ tables


def run_key(row: dict[str, Any]) -> tuple[Any, Any]:
    """What pairs two runs of different configs: their seed and fold."""
    return (row.get("seed"), row.get("fold"))


def comparison_columns(r: dict[str, Any]) -> dict[str, Any]:
    """A config's table columns from its `compare_to_best` entry: `vs_best` (the paired bootstrap's difference,
    with `vs_best_low` / `vs_best_high` and `p_boot`, else the plain difference), `p_ttest`, `significant`."""
    out: dict[str, Any] = {}
    if "boot_diff" in r:
        out.update(vs_best=r["boot_diff"], vs_best_low=r["boot_low"], vs_best_high=r["boot_high"], p_boot=r["boot_p"])
    elif "diff" in r:
        out["vs_best"] = r["diff"]
    if "t_p" in r:
        out["p_ttest"] = r["t_p"]
    if "significant" in r:
        out["significant"] = r["significant"]
    return out


def compare_to_best(groups: dict[str, list[dict[str, Any]]], best: str, column: str,
                    preds: dict[str, list[Predictions | None]] | None = None, metric: str | None = None,
                    n_boot: int = BOOTSTRAP, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per config other than `best`: the paired t-test of `column` across runs paired by seed/fold (at least 3
    pairs) and, with `preds` (config -> per-row predictions of its runs, in the order of its rows), the paired
    bootstrap of `metric` over the test rows. Keys: `diff` (config - best, of the mean column), `t_p`,
    `boot_diff`, `boot_low`, `boot_high`, `boot_p`, `p` (the bootstrap's p when there is one, else the t-test's)
    and `significant` (p < 0.05)."""
    base = {run_key(r): r for r in groups[best] if isinstance(r.get(column), (int, float))}
    out: dict[str, dict[str, Any]] = {}
    for name, rows in groups.items():
        if name == best:
            continue
        mine = {run_key(r): r for r in rows if isinstance(r.get(column), (int, float))}
        common = [k for k in mine if k in base]
        res: dict[str, Any] = {}
        if common:
            res["diff"] = float(np.mean([mine[k][column] for k in common]) - np.mean([base[k][column] for k in common]))
        tt = paired_ttest([mine[k][column] for k in common], [base[k][column] for k in common])
        if tt is not None:
            res["t_p"] = tt["p"]
        if preds is not None and metric is not None:
            pa = [p for p in preds.get(name, []) if p is not None]
            pb = [p for p in preds.get(best, []) if p is not None]
            if pa and pb:
                try:
                    bs = paired_bootstrap(pa, pb, metric, n_boot=n_boot, seed=seed)
                except MMCacheError:
                    bs = None
                if bs is not None and bs["p"] is not None:
                    res.update(boot_diff=bs["diff"], boot_low=bs["ci_low"], boot_high=bs["ci_high"], boot_p=bs["p"],
                               boot_metric=metric)
        p = res.get("boot_p", res.get("t_p"))
        if p is not None:
            res["p"] = p
            res["significant"] = bool(p < ALPHA)
        out[name] = res
    return out
