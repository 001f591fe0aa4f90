"""The statistics of multi-seed tables, against scipy and by-hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from mmcache.errors import MMCacheError
from mmcache.heads.metrics import classification_metrics
from mmcache.stats import (
    Predictions,
    compare_to_best,
    interval,
    paired_bootstrap,
    paired_ttest,
    read_predictions,
    weighted_metric,
    write_predictions,
)


def test_interval_is_the_student_t_interval_of_the_mean() -> None:
    v = [0.61, 0.64, 0.59, 0.66, 0.62]
    out = interval(v)
    lo, hi = sps.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=sps.sem(v))
    assert out["n"] == 5 and out["mean"] == pytest.approx(np.mean(v))
    assert out["std"] == pytest.approx(np.std(v, ddof=1))
    assert out["ci_low"] == pytest.approx(lo) and out["ci_high"] == pytest.approx(hi)
    # By hand for two values: t(0.975, 1) = 12.706...
    two = interval([1.0, 3.0])
    assert two["ci_high"] - 2.0 == pytest.approx(12.7062047, rel=1e-6)  # std sqrt(2), n 2
    assert interval([0.5]) == {"n": 1, "mean": 0.5, "std": None, "ci_low": None, "ci_high": None}
    assert interval([0.5, float("nan"), None])["n"] == 1  # type: ignore[list-item]


def test_paired_ttest_matches_scipy_ttest_rel() -> None:
    a, b = [0.70, 0.72, 0.69, 0.75], [0.68, 0.71, 0.66, 0.70]
    out = paired_ttest(a, b)
    ref = sps.ttest_rel(a, b)
    assert out is not None
    assert out["t"] == pytest.approx(ref.statistic) and out["p"] == pytest.approx(ref.pvalue)
    assert out["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert paired_ttest(a[:2], b[:2]) is None  # fewer than 3 pairs
    assert paired_ttest(a, a) == {"t": 0.0, "p": 1.0, "n": 4, "mean_diff": 0.0}
    with pytest.raises(ValueError):
        paired_ttest(a, b[:3])


def toy(n: int = 60, c: int = 2, seed: int = 0, skill: float = 1.0) -> Predictions:
    g = np.random.default_rng(seed)
    y = g.integers(0, c, n)
    logits = g.normal(size=(n, c))
    logits[np.arange(n), y] += skill
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return Predictions([f"r{i:03d}" for i in range(n)], y, prob, [f"c{k}" for k in range(c)])


@pytest.mark.parametrize("c", [2, 3])
@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "weighted_f1", "auroc"])
def test_weighted_metrics_equal_classification_metrics_on_resampled_rows(metric: str, c: int) -> None:
    p = toy(40, c, seed=c)
    g = np.random.default_rng(1)
    idx = g.integers(0, 40, (5, 40))
    w = np.stack([np.bincount(i, minlength=40) for i in idx])
    got = weighted_metric(metric, p.y, p.prob, w)
    for b in range(5):
        ref = classification_metrics(p.y[idx[b]], np.log(p.prob[idx[b]]))[metric]
        if ref is None:
            assert math.isnan(got[b])
        else:
            assert got[b] == pytest.approx(ref, abs=1e-9)


def test_paired_bootstrap_equals_a_by_hand_bootstrap() -> None:
    runs_a = [toy(50, seed=s, skill=1.5) for s in range(2)]
    runs_b = [toy(50, seed=s + 10, skill=0.5) for s in range(2)]
    for r in runs_b:  # the same rows, another model
        r.y[:] = runs_a[0].y
    for r in runs_a:
        r.y[:] = runs_a[0].y
    out = paired_bootstrap(runs_a, runs_b, "accuracy", n_boot=300, seed=7)
    # By hand: one resample of the 50 rows per draw, each run's accuracy on it, means, difference.
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 50, size=(300, 50))
    def acc(r: Predictions, i: np.ndarray) -> float:
        return float((r.prob[i].argmax(1) == r.y[i]).mean())
    d = np.array([np.mean([acc(r, i) for r in runs_a]) - np.mean([acc(r, i) for r in runs_b]) for i in idx])
    full = np.arange(50)
    assert out["diff"] == pytest.approx(np.mean([acc(r, full) for r in runs_a]) - np.mean([acc(r, full) for r in runs_b]))
    assert out["ci_low"] == pytest.approx(np.percentile(d, 2.5))
    assert out["ci_high"] == pytest.approx(np.percentile(d, 97.5))
    assert out["p"] == pytest.approx(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
    assert out["resamples"] == 300
    # Row order does not matter: runs are aligned by id.
    shuffled = [Predictions(r.ids[::-1], r.y[::-1], r.prob[::-1], r.classes) for r in runs_a]
    assert paired_bootstrap(shuffled, runs_b, "accuracy", n_boot=300, seed=7)["p"] == out["p"]


def test_paired_bootstrap_of_identical_predictions_is_not_significant_and_of_different_rows_refused() -> None:
    a = toy(30)
    out = paired_bootstrap([a], [a], "macro_f1", n_boot=200)
    assert out["diff"] == 0.0 and out["p"] == 1.0
    other = Predictions([f"x{i}" for i in range(30)], a.y, a.prob)
    with pytest.raises(MMCacheError, match="different rows"):
        paired_bootstrap([a], [other], "accuracy")


def test_compare_to_best_reports_both_tests() -> None:
    groups = {"good": [{"seed": s, "test_accuracy": v} for s, v in enumerate([0.80, 0.82, 0.81])],
              "bad": [{"seed": s, "test_accuracy": v} for s, v in enumerate([0.70, 0.73, 0.69])]}
    good = [toy(80, seed=s, skill=3.0) for s in range(3)]
    bad = [toy(80, seed=s + 5, skill=0.0) for s in range(3)]
    for r in (*good, *bad):
        r.y[:] = good[0].y
    out = compare_to_best(groups, "good", "test_accuracy", {"good": good, "bad": bad}, "accuracy", n_boot=200)
    ref = sps.ttest_rel([0.70, 0.73, 0.69], [0.80, 0.82, 0.81])
    assert set(out) == {"bad"}
    assert out["bad"]["t_p"] == pytest.approx(ref.pvalue)
    assert out["bad"]["diff"] == pytest.approx(-0.1033333, abs=1e-6)
    assert out["bad"]["boot_p"] < 0.05 and out["bad"]["significant"] is True and out["bad"]["boot_high"] < 0


def test_predictions_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = toy(12, 3)
    p.y[4] = -1  # an unlabelled row
    write_predictions(tmp_path, p)
    q = read_predictions(tmp_path)
    assert q is not None and q.ids == p.ids and q.classes == p.classes
    np.testing.assert_array_equal(q.y, p.y)
    np.testing.assert_allclose(q.prob, p.prob, rtol=1e-5)
    assert read_predictions(tmp_path / "nothing") is None
    (tmp_path / "predictions_test.csv").write_text("id,label,predicted,p_a\nx,zzz,a,1\n")
    with pytest.raises(MMCacheError, match="unreadable predictions"):
        read_predictions(tmp_path)
