"""Metrics against hand-computed values; prediction checks fire on broken predictions."""

from __future__ import annotations

import numpy as np
import pytest

from mmcache.heads.metrics import auroc, better, classification_metrics, failed_checks, prediction_checks, softmax


def logits_for(pred: list[int], n_classes: int = 3) -> np.ndarray:
    """Logits whose argmax is `pred` (confident, finite)."""
    return np.eye(n_classes)[pred] * 5.0


def test_values_match_hand_computation() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y, logits_for(pred), ["a", "b", "c"])
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Per class: P/R/F1: a 1/1 2/3 -> 0.8; b 1/2 1/2 -> 0.5; c 1/2 1/1 -> 2/3.
    f1 = np.array([0.8, 0.5, 2 / 3])
    assert m["macro_f1"] == pytest.approx(f1.mean())
    assert m["weighted_f1"] == pytest.approx((f1 * [3, 2, 1]).sum() / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["classes"] == ["a", "b", "c"]
    assert all(c["ok"] for c in m["checks"].values()), failed_checks(m)


def test_binary_auroc_and_top_k() -> None:
    y = np.array([0, 0, 1, 1])
    # Positive-class scores 0.1, 0.4, 0.35, 0.8: 3 of the 4 (pos, neg) pairs are ordered right.
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    logits = np.log(np.stack([1 - p1, p1], 1))
    m = classification_metrics(y, logits)
    assert m["auroc"] == pytest.approx(0.75)
    assert "top2_accuracy" not in m  # top-2 of two classes is always 1
    y3 = np.array([0, 1, 2, 2])
    l3 = np.array([[3.0, 2, 1], [3, 2, 1], [3, 2, 1], [1, 2, 3]])
    m3 = classification_metrics(y3, l3)
    # Top-2 hits: row0 yes (0), row1 yes (1), row2 no (2 is last), row3 yes.
    assert m3["top2_accuracy"] == pytest.approx(3 / 4)
    assert m3["accuracy"] == pytest.approx(2 / 4)


def test_unlabeled_rows_are_ignored() -> None:
    y = np.array([0, -100, 1, -100])
    m = classification_metrics(y, logits_for([0, 1, 1, 0], 2))
    assert m["n"] == 2 and m["accuracy"] == 1.0
    assert classification_metrics(np.array([-100]), np.zeros((1, 2))) == {"n": 0}


def test_auroc_undefined_is_none() -> None:
    assert auroc(np.array([1, 1, 1]), softmax(np.zeros((3, 2)))) is None
    assert auroc(np.array([0, 1, 1]), softmax(np.zeros((3, 3)))) is None  # OvR needs every class present
    y = np.array([0, 1, 2, 0, 1, 2])
    assert auroc(y, softmax(np.eye(3)[y] * 3)) == pytest.approx(1.0)


def test_checks_fire_on_nan() -> None:
    y = np.array([0, 1, 2, 1])
    logits = logits_for([0, 1, 2, 1])
    logits[2, 1] = np.nan
    checks = prediction_checks(y, logits)
    assert not checks["no_nan"]["ok"] and "1 rows" in checks["no_nan"]["detail"]
    assert not checks["probabilities"]["ok"]
    m = classification_metrics(y, logits)
    assert any(f.startswith("no_nan") for f in failed_checks(m))


def test_checks_fire_on_collapse_and_majority() -> None:
    y = np.array([0, 0, 0, 1, 2])
    checks = prediction_checks(y, logits_for([0, 0, 0, 0, 0]))
    assert not checks["not_collapsed"]["ok"]
    assert "predicts 1 of 3 classes" in checks["not_collapsed"]["detail"]
    # Always predicting the majority class only ties the majority baseline: not better than chance.
    assert not checks["beats_majority"]["ok"]
    assert checks["no_nan"]["ok"] and checks["probabilities"]["ok"]
    good = prediction_checks(y, logits_for([0, 0, 0, 1, 2]))
    assert all(c["ok"] for c in good.values())


def test_better() -> None:
    assert better("accuracy", 0.6, 0.5) and not better("accuracy", 0.5, 0.5)
    assert better("loss", 0.4, 0.5) and not better("loss", 0.6, 0.5)
    assert better("auroc", 0.1, None)


def test_counts_and_rank_metrics_equal_scikit_learn() -> None:
    """Accuracy, F1, confusion matrix and AUROC are computed from counts and ranks: the same values as
    scikit-learn's functions, with ties in the scores, absent classes and binary / multi-class tasks."""
    import numpy as np
    from sklearn import metrics as skm

    from mmcache.heads.metrics import classification_metrics, softmax

    rng = np.random.default_rng(0)
    checked_auroc = 0
    for _ in range(200):
        c, n = int(rng.integers(2, 6)), int(rng.integers(3, 60))
        y = rng.integers(0, c, n)
        logits = rng.normal(size=(n, c)).round(int(rng.integers(0, 3)))  # rounding makes ties
        m = classification_metrics(y, logits)
        prob = softmax(logits)
        pred, labels = prob.argmax(1), list(range(c))
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
        assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0),
                                              abs=1e-12)
        assert m["weighted_f1"] == pytest.approx(
            skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0), abs=1e-12)
        assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
        if c > 2:
            assert m["top2_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, prob, k=2, labels=labels), abs=1e-12)
        if np.unique(y).size >= 2 and (c == 2 or np.unique(y).size == c):
            ref = skm.roc_auc_score(y, prob[:, 1]) if c == 2 else skm.roc_auc_score(y, prob, multi_class="ovr")
            assert m["auroc"] == pytest.approx(ref, abs=1e-9)
            checked_auroc += 1
        else:
            assert m["auroc"] is None
    assert checked_auroc > 50


@pytest.mark.parametrize("metric", ["accuracy", "top2_accuracy", "auroc"])
def test_stacked_validation_metrics_equal_each_config_alone(metric: str) -> None:
    """A stacked sweep counts the per-epoch confusion matrices of all its configs at once
    (`val_metrics_many`): each config's values are scikit-learn's for that config alone, unlabelled rows
    ignored, the rank metric included."""
    import torch
    from sklearn import metrics as skm

    from mmcache.engine import IGNORE, val_metrics_many

    rng = np.random.default_rng(1)
    for c in (2, 3, 5):
        n, k = 80, 6
        y = rng.integers(0, c, n)
        y[:7] = IGNORE
        logits = rng.normal(size=(n, k, c)).astype(np.float32)
        logits[:, 0] = 0.0  # a collapsed config: every row predicts class 0
        got = val_metrics_many(torch.from_numpy(y), torch.from_numpy(logits), metric)
        assert len(got) == k
        keep, labels = y != IGNORE, list(range(c))
        yk = y[keep]
        for j in range(k):
            pred = logits[keep, j].argmax(1)
            assert got[j]["accuracy"] == pytest.approx(skm.accuracy_score(yk, pred), abs=1e-12)
            assert got[j]["macro_f1"] == pytest.approx(
                skm.f1_score(yk, pred, labels=labels, average="macro", zero_division=0), abs=1e-12)
            assert got[j]["weighted_f1"] == pytest.approx(
                skm.f1_score(yk, pred, labels=labels, average="weighted", zero_division=0), abs=1e-12)
            prob = softmax(logits[keep, j])
            if metric == "top2_accuracy" and c > 2:
                assert got[j][metric] == pytest.approx(skm.top_k_accuracy_score(yk, prob, k=2, labels=labels),
                                                       abs=1e-12)
            if metric == "auroc":
                ref = skm.roc_auc_score(yk, prob[:, 1]) if c == 2 else skm.roc_auc_score(yk, prob, multi_class="ovr")
                assert got[j][metric] == pytest.approx(ref, abs=1e-9)
        extra = {metric} if metric == "auroc" or (metric == "top2_accuracy" and c > 2) else set()
        assert all(set(g) == {"accuracy", "macro_f1", "weighted_f1"} | extra for g in got)
    assert val_metrics_many(torch.full((4,), IGNORE), torch.zeros(4, 3, 2), "accuracy") == [{}, {}, {}]
