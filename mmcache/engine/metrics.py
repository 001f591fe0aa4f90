"""Classification metrics (scikit-learn) and sanity checks on predictions, reported rather than hidden."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Metrics where lower is better (selection minimises them).
LOWER_IS_BETTER = {"loss"}
SELECT_METRICS = ("accuracy", "macro_f1", "weighted_f1", "auroc", "top2_accuracy", "loss")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _average_ranks(score: np.ndarray) -> np.ndarray:
    """1-based ranks of `score` with ties given their average rank (scipy's `rankdata(method="average")`)."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first sorted position of each run of ties
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _binary_auroc(pos: np.ndarray, score: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic with average ranks for ties (equal to scikit-learn's roc_auc_score)."""
    ranks = _average_ranks(score)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(y: np.ndarray, prob: np.ndarray) -> float | None:
    """Binary AUROC of the positive class; macro one-vs-rest for multi-class; None when undefined.
    The same values as scikit-learn's `roc_auc_score` (multi_class="ovr", average="macro"), computed from ranks."""
    n_classes = prob.shape[1]
    present = np.unique(y)
    if present.size < 2 or not np.isfinite(prob).all():
        return None
    if n_classes == 2:
        return _binary_auroc(y == 1, prob[:, 1])
    if present.size < n_classes:
        return None  # OvR needs every class in the split
    return float(np.mean([_binary_auroc(y == c, prob[:, c]) for c in range(n_classes)]))


def classification_metrics(y: np.ndarray, logits: np.ndarray, class_names: list[str] | None = None,
                           k: int = 2) -> dict[str, Any]:
    """accuracy, macro/weighted F1, AUROC, top-k accuracy, confusion matrix and checks for labeled rows.

    `y`: [N] class indices (rows < 0 are unlabeled and ignored); `logits`: [N, C].
    """
    y = np.asarray(y)
    logits = np.asarray(logits, dtype=np.float64)
    n_classes = logits.shape[1]
    labeled = y >= 0
    y, logits = y[labeled], logits[labeled]
    prob = softmax(logits) if len(y) else np.zeros((0, n_classes))
    pred = prob.argmax(axis=1) if len(y) else np.zeros(0, dtype=int)
    out: dict[str, Any] = {"n": int(len(y))}
    if not len(y):
        return out
    # Confusion matrix, accuracy and F1 from counts: scikit-learn's definitions (F1 of a class never
    # predicted nor present counts as 0), without its per-call input validation, which dominates on small splits.
    cm = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)
    support = cm.sum(1)
    out["accuracy"] = float(tp.sum() / len(y))
    out["macro_f1"] = float(f1.mean())
    out["weighted_f1"] = float((f1 * support).sum() / support.sum())
    out["auroc"] = auroc(y, prob)
    if n_classes > k:
        # NaN scores have no ranking (the no_nan check reports them). The ranking is scikit-learn's
        # top_k_accuracy_score's: a stable sort of the scores, ties broken by class order.
        if np.isfinite(prob).all():
            top = np.argsort(prob, axis=1, kind="mergesort")[:, ::-1][:, :k]
            out[f"top{k}_accuracy"] = float((top == y[:, None]).any(axis=1).mean())
        else:
            out[f"top{k}_accuracy"] = None
    out["confusion_matrix"] = cm.tolist()
    if class_names:
        out["classes"] = list(class_names)
    out["checks"] = prediction_checks(y, logits, prob, pred)
    return out


def split_metrics(targets: dict[str, np.ndarray], logits: dict[str, np.ndarray], labels: dict[str, list[str]],
                  sources: Sequence[str | None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics of one split's rows: task -> `classification_metrics` (tasks without a labelled row left out),
    and with `sources` (each row's source dataset, a run over several) source -> task -> those of its rows alone
    (rows of no source are in the first only). `targets[t]`: [N] class indices (< 0: unlabelled); `logits[t]`:
    [N, C], in the same row order."""

    def per_task(rows: np.ndarray | slice) -> dict[str, Any]:
        out = {}
        for t, lg in logits.items():
            m = classification_metrics(np.asarray(targets[t])[rows], np.asarray(lg)[rows], labels[t])
            if m["n"]:
                out[t] = m
        return out

    by_source: dict[str, Any] = {}
    if sources is not None:
        src = np.array(list(sources), dtype=object)
        for name in dict.fromkeys(src.tolist()):
            if name is not None and (m := per_task(np.flatnonzero(src == name))):
                by_source[name] = m
    return per_task(slice(None)), by_source


def prediction_checks(y: np.ndarray, logits: np.ndarray, prob: np.ndarray | None = None,
                      pred: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Sanity checks: finite logits, valid probabilities, predictions not collapsed, better than majority.

    Each check is `{"ok": bool, "detail": str}`; callers print the failures.
    """
    n_classes = logits.shape[1]
    prob = softmax(logits) if prob is None else prob
    pred = prob.argmax(axis=1) if pred is None else pred
    finite = bool(np.isfinite(logits).all())
    out: dict[str, dict[str, Any]] = {}
    n_bad = int((~np.isfinite(logits)).any(axis=1).sum())
    out["no_nan"] = {"ok": finite, "detail": "all logits finite" if finite else f"{n_bad} rows with NaN/inf logits"}
    in_range = bool(np.all((prob >= 0) & (prob <= 1))) if finite else False
    sums = prob.sum(axis=1)
    sums_ok = bool(np.allclose(sums, 1.0, atol=1e-4)) if finite else False
    out["probabilities"] = {"ok": in_range and sums_ok,
                            "detail": "in [0,1], rows sum to 1" if in_range and sums_ok
                            else f"out of range or rows not summing to 1 (sum range {np.nanmin(sums):.4g}-"
                                 f"{np.nanmax(sums):.4g})"}
    counts = np.bincount(pred, minlength=n_classes)
    true_classes = int((np.bincount(y, minlength=n_classes) > 0).sum())
    n_pred_classes = int((counts > 0).sum())
    collapsed = true_classes > 1 and n_pred_classes <= 1
    out["not_collapsed"] = {"ok": not collapsed,
                            "detail": f"predicts {n_pred_classes} of {n_classes} classes "
                                      f"(labels use {true_classes}); predicted counts {counts.tolist()}"}
    majority = float(np.bincount(y, minlength=n_classes).max() / max(1, len(y)))
    acc = float((pred == y).mean()) if len(y) else 0.0
    out["beats_majority"] = {"ok": acc > majority,
                             "detail": f"accuracy {acc:.4f} vs majority-class baseline {majority:.4f}"}
    return out


def failed_checks(metrics: dict[str, Any]) -> list[str]:
    """Names and details of the checks that failed in a `classification_metrics` result."""
    return [f"{name}: {c['detail']}" for name, c in metrics.get("checks", {}).items() if not c["ok"]]


def better(metric: str, new: float, best: float | None) -> bool:
    """Whether `new` improves on `best` for `metric` (loss decreases, everything else increases)."""
    if best is None:
        return True
    return new < best if metric in LOWER_IS_BETTER else new > best
