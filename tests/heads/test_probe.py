"""The lbfgs probe is scikit-learn's LogisticRegression at the C it reports, on binary and multi-class tasks."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn import datasets
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from mmcache.cache.store import FeatureStore, store_path
from mmcache.data.base import Dataset, LabelSpace, Sample
from mmcache.errors import MMCacheError
from mmcache.heads import build_head
from mmcache.heads.data import IGNORE, CachedData, load_cached
from mmcache.heads.linear import LinearHead
from mmcache.heads.losses import build_criterion
from mmcache.heads.probe import LBFGS_GRID, GridResult, LogisticProbe, _moments_blocked, fit_l2_grid, sklearn_C

LOADERS = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine, "digits": datasets.load_digits}


def split_data(name: str, scaled: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A bundled scikit-learn dataset (no download), split 60/20/20 stratified; optionally standardised on train."""
    x, y = LOADERS[name](return_X_y=True)
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=0)
    va, te = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=0)
    if scaled:
        x = StandardScaler().fit(x[tr]).transform(x)
    # The store holds float32; scikit-learn gets exactly the same numbers, in float64 as its lbfgs uses.
    return x.astype(np.float32).astype(np.float64), y, {"train": tr, "val": va, "test": te}


def write_cache(cache: Path, x: np.ndarray, y: np.ndarray, splits: dict[str, np.ndarray],
                unlabelled: np.ndarray | None = None) -> CachedData:
    """One `pooled` store (modality image) and a manifest; rows in `unlabelled` get no label."""
    split = np.empty(len(y), dtype=object)
    for s, idx in splits.items():
        split[idx] = s
    ids = [f"r{i:04d}" for i in range(len(y))]
    hidden = set() if unlabelled is None else set(unlabelled.tolist())
    samples = [Sample(id=ids[i], split=str(split[i]), labels={} if i in hidden else {"label": int(y[i])})
               for i in range(len(y))]
    classes = [str(c) for c in range(int(y.max()) + 1)]
    Dataset(name="sk", samples=samples, labels=LabelSpace(tasks={"label": classes}), root=cache).write_manifest(
        cache / "sk" / "manifest.json")
    with FeatureStore(store_path(cache, "sk", "image", "feat"), {"preset": "sk", "d": x.shape[1]}, "sk",
                      capacity=len(y)) as st:
        st.write(ids, {"pooled": x.astype(np.float32)})
    return load_cached("sk", {"image": "feat"}, cache)


def val_accuracy(data: CachedData) -> object:
    y = data.targets["label"][data.split_index["val"]]

    def score(logits: dict[str, torch.Tensor]) -> dict[str, float]:
        keep = y != IGNORE
        return {"accuracy": float((logits["label"][keep].argmax(1) == y[keep]).double().mean())}

    return score


def probe_fit(data: CachedData, **kw: object) -> tuple[LinearHead, GridResult]:
    head = build_head("linear", data.inputs, data.tasks, {"D": 0, "dropout": 0.0})
    assert isinstance(head, LinearHead)
    crit = build_criterion("ce", data.tasks)
    return head, fit_l2_grid(head, crit, data, "label", "accuracy", val_accuracy(data), quiet=True, **kw)  # type: ignore[arg-type]


def sklearn_grid(x: np.ndarray, y: np.ndarray, sp: dict[str, np.ndarray], Cs: list[float], tol: float,
                 max_iter: int) -> tuple[int, LogisticRegression]:
    """scikit-learn over the same Cs, warm-started in the same order, best val accuracy (first on ties)."""
    clf = LogisticRegression(tol=tol, max_iter=max_iter, warm_start=True)
    best: tuple[float, int, LogisticRegression] | None = None
    for i, C in enumerate(Cs):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)  # scikit-learn itself must converge here
            clf.set_params(C=C).fit(x[sp["train"]], y[sp["train"]])
        v = clf.score(x[sp["val"]], y[sp["val"]])
        if best is None or v > best[0]:
            best = (v, i, copy.deepcopy(clf))
    assert best is not None
    return best[1], best[2]


def test_sklearn_C_mapping() -> None:
    assert sklearn_C(1e-2, 400, 2) == pytest.approx(2 / (1e-2 * 400))
    assert sklearn_C(1e-2, 400, 3) == pytest.approx(1 / (1e-2 * 400))
    assert sklearn_C(1e-2, 400, 10) == pytest.approx(1 / (1e-2 * 400))


@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "raw"])
@pytest.mark.parametrize("name", ["breast_cancer", "wine", "digits"])
def test_grid_matches_sklearn(tmp_path: Path, name: str, scaled: bool) -> None:
    """Same grid, same selection on val: the same C is chosen, and the chosen fits agree on test."""
    x, y, sp = split_data(name, scaled)
    data = write_cache(tmp_path / "cache", x, y, sp)
    # At the default tol 1e-4 both solvers stop in the optimum's flat valley at points whose
    # probabilities differ by up to ~0.05 (raw features: far more); asked for the optimum, they agree.
    # Raw features: the strongest penalties only (scikit-learn needs thousands of iterations there).
    tol, grid = (1e-6, LBFGS_GRID) if scaled else (1e-6, LBFGS_GRID[:3])
    head, r = probe_fit(data, grid=grid, tol=tol, max_iter=20000)
    assert all(c["converged"] for c in r.curves) and not any("converge" in w for w in r.warnings)
    n, K = len(sp["train"]), int(y.max()) + 1
    Cs = [sklearn_C(lam, n, K) for lam in grid]
    assert [c["sklearn_C"] for c in r.curves] == pytest.approx(Cs)
    best, ref = sklearn_grid(x, y, sp, Cs, tol, 100000)
    assert r.best == best and r.sklearn_C == pytest.approx(Cs[best])
    xt = x[sp["test"]]
    with torch.no_grad():
        ours = torch.softmax(head.classifiers["label"](torch.from_numpy(xt).float()).double(), 1).numpy()
    acc, acc_ref = (ours.argmax(1) == y[sp["test"]]).mean(), ref.score(xt, y[sp["test"]])
    assert abs(acc - acc_ref) <= 0.01
    assert np.abs(ours - ref.predict_proba(xt)).max() < 0.02


def test_binary_fit_is_sklearn_binary_logistic_regression(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-class task at penalty l2 is scikit-learn's binary model at C = 2/(l2 n): the same weights, from the
    blocked evaluation that binary tasks on the CPU use."""
    x, y, sp = split_data("breast_cancer", scaled=True)
    data = write_cache(tmp_path / "cache", x, y, sp)
    calls = []
    blocked = LogisticProbe._blocked_products

    def counted(self: LogisticProbe, *args: object) -> object:
        calls.append(1)
        return blocked(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(LogisticProbe, "_blocked_products", counted)
    head, r = probe_fit(data, grid=[1e-2], tol=1e-8)
    assert calls
    ref = LogisticRegression(C=2 / (1e-2 * len(sp["train"])), tol=1e-8, max_iter=10000).fit(x[sp["train"]], y[sp["train"]])
    w, b = head.classifiers["label"].weight.detach().double(), head.classifiers["label"].bias.detach().double()
    # Softmax rows -w/2, w/2: their difference is scikit-learn's coef_, and the rows sum to zero.
    np.testing.assert_allclose((w[1] - w[0]).numpy(), ref.coef_[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(float(b[1] - b[0]), ref.intercept_[0], rtol=1e-3, atol=1e-4)
    assert float((w[0] + w[1]).abs().max()) < 1e-6
    # 1/(l2 n) would be a different model: twice the penalty.
    half = LogisticRegression(C=1 / (1e-2 * len(sp["train"])), tol=1e-8, max_iter=10000).fit(x[sp["train"]], y[sp["train"]])
    assert np.abs(half.coef_[0] - ref.coef_[0]).max() > 0.05


def test_sklearn_C_counts_labelled_rows_only(tmp_path: Path) -> None:
    x, y, sp = split_data("wine", scaled=True)
    hidden = sp["train"][::3]  # a third of the train rows carry no label
    data = write_cache(tmp_path / "cache", x, y, sp, unlabelled=hidden)
    head, r = probe_fit(data, grid=[3e-2], tol=1e-8)
    lab = np.setdiff1d(sp["train"], hidden)
    assert r.sklearn_C == pytest.approx(1 / (3e-2 * len(lab)))
    ref = LogisticRegression(C=r.sklearn_C, tol=1e-8, max_iter=10000).fit(x[lab], y[lab])
    with torch.no_grad():
        ours = torch.softmax(head.classifiers["label"](torch.from_numpy(x[sp["test"]]).float()).double(), 1).numpy()
    assert np.abs(ours - ref.predict_proba(x[sp["test"]])).max() < 1e-3


def test_warm_start_reaches_the_cold_optimum_on_raw_features() -> None:
    """Badly scaled features: each warm-started fit converges to the same objective as a cold fit from zero."""
    x, y, sp = split_data("breast_cancer", scaled=False)
    tr = sp["train"]
    probe = LogisticProbe(torch.from_numpy(x[tr]), {"label": torch.from_numpy(y[tr])}, {"label": 2},
                          build_criterion("ce", {"label": 2}), tol=1e-4, max_iter=2000)
    grid = [1e-1, 3e-2, 1e-2, 1e-3]
    for warm in probe.fit_grid(grid):
        cold = probe.fit(warm.l2)
        assert warm.converged and cold.converged and warm.grad_max <= 1e-4
        assert warm.iters > 1
        assert warm.loss == pytest.approx(cold.loss, rel=1e-5, abs=1e-7)


def test_not_converged_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y, sp = split_data("breast_cancer", scaled=False)
    data = write_cache(tmp_path / "cache", x, y, sp)
    _, r = probe_fit(data, grid=[1e-3], max_iter=3)
    assert r.curves[0]["converged"] is False and r.curves[0]["iters"] == 3
    err = capsys.readouterr().err
    assert "did not converge at l2=0.001" in err and "3 of at most 3 iterations" in err
    assert r.warnings and "did not converge" in r.warnings[0]


def test_written_gradient_equals_autograd_through_the_criterion() -> None:
    """The written-out cross-entropy gradient (binary and multi-class, class weights, unlabelled rows)
    is the criterion's own, as autograd gives it."""
    g = torch.Generator().manual_seed(0)
    n, d = 60, 5
    z = torch.randn(n, d, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 0.0]) + 5.0
    targets = {"two": torch.randint(0, 2, (n,), generator=g), "four": torch.randint(0, 4, (n,), generator=g)}
    targets["two"][:7] = IGNORE
    targets["four"][5:12] = IGNORE
    counts = {t: torch.bincount(y[y != IGNORE], minlength=k) for (t, y), k in zip(targets.items(), (2, 4), strict=True)}
    # float64 features: the same numbers either way; float32 ones (the products in float32, as scikit-learn's
    # lbfgs on float32 features): the same up to float32 rounding.
    for feats, rel, atol in ((z.double(), 1e-12, 1e-12), (z, 1e-6, 1e-6)):
        for class_weights in (False, True):
            crit = build_criterion("ce", {"two": 2, "four": 4}, class_counts=counts, class_weights=class_weights)
            probe = LogisticProbe(feats, targets, {"two": 2, "four": 4}, crit)
            assert probe.row_weights is not None and probe.z.dtype == feats.dtype
            x = np.random.default_rng(1).normal(size=probe.size)
            f, grad = probe.loss_grad(x, 0.3)
            xt = torch.from_numpy(x).requires_grad_(True)
            ref = probe.objective(xt, 0.3)
            ref.backward()
            assert f == pytest.approx(float(ref.detach()), rel=rel)
            np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-9 if rel < 1e-9 else rel, atol=atol)


def test_blocked_binary_evaluation_equals_the_whole_matrix_one() -> None:
    """Binary tasks on the CPU are evaluated a block of rows at a time (numpy): the same objective and gradient as
    the whole-matrix torch evaluation and as autograd through the criterion, for two tasks, several parameter
    vectors at once, class weights, unlabelled rows, float32 and float64 features and a short last block."""
    g = torch.Generator().manual_seed(0)
    n, d = 203, 6
    z = torch.randn(n, d, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 0.0, 2.0]) + 5.0
    targets = {"a": torch.randint(0, 2, (n,), generator=g), "b": torch.randint(0, 2, (n,), generator=g)}
    targets["a"][:9] = IGNORE
    targets["b"][50:61] = IGNORE
    counts = {t: torch.bincount(y[y != IGNORE], minlength=2) for t, y in targets.items()}
    rng = np.random.default_rng(1)
    for feats, rtol in ((z.double(), 1e-10), (z, 1e-5)):
        for class_weights in (False, True):
            crit = build_criterion("ce", {"a": 2, "b": 2}, class_counts=counts, class_weights=class_weights)
            probe = LogisticProbe(feats, targets, {"a": 2, "b": 2}, crit)
            assert probe.blocked and probe.z.dtype == feats.dtype
            probe.block_rows = 16  # 13 blocks, the last of 11 rows
            xs, l2s = rng.normal(size=(3, probe.size)), [0.3, 1e-2, 1e-4]
            f, grad = probe.loss_grad_many(xs, l2s)
            probe.blocked = False
            f_ref, g_ref = probe.loss_grad_many(xs, l2s)
            probe.blocked = True
            np.testing.assert_allclose(f, f_ref, rtol=rtol)
            np.testing.assert_allclose(grad, g_ref, rtol=rtol, atol=rtol * float(np.abs(g_ref).max()))
            xt = torch.from_numpy(xs[1]).requires_grad_(True)
            ref = probe.objective(xt, l2s[1])
            ref.backward()
            assert f[1] == pytest.approx(float(ref.detach()), rel=rtol)
            np.testing.assert_allclose(grad[1], xt.grad.numpy(), rtol=rtol, atol=rtol * float(xt.grad.abs().max()))
    # confident rows (logits of hundreds): finite, and the loss of a wrong one is its logit
    probe = LogisticProbe(z.double(), {"a": targets["a"]}, {"a": 2}, build_criterion("ce", {"a": 2}))
    x = np.zeros(probe.size)
    x[d] = 500.0  # the bias: every row predicts class 1
    f, grad = probe.loss_grad(x, 0.0)
    wrong = float(probe.row_weights["a"][targets["a"][targets["a"] != IGNORE] == 0].sum())
    assert np.isfinite(grad).all() and f == pytest.approx(500.0 * wrong, rel=1e-9)
    # more than two classes: the whole-matrix products (bound by arithmetic, not by reading the features)
    three = LogisticProbe(z, {"a": targets["a"] % 3}, {"a": 3}, build_criterion("ce", {"a": 3}))
    assert not three.blocked


def test_moments_in_one_pass_are_the_two_pass_ones() -> None:
    """The one-pass block moments (Chan et al.'s merge) equal float64 two-pass moments, also for features far from
    zero relative to their spread, and for row counts that are not a multiple of the block."""
    rng = np.random.default_rng(0)
    for n, offset, spread in ((1, 0.0, 1.0), (1000, 0.0, 1.0), (1037, 1000.0, 0.01), (5000, -3.0, 200.0)):
        z = (offset + spread * rng.standard_normal((n, 5))).astype(np.float32)
        mean, var = _moments_blocked(z, block_bytes=64 * 5 * 4)  # blocks of 64 rows
        ref = z.astype(np.float64)
        np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-6, atol=1e-6 * spread)
        np.testing.assert_allclose(var, ref.var(0), rtol=1e-5, atol=1e-12)


def _counting(fn: Callable[..., Any], calls: list[int]) -> Callable[..., Any]:
    """fn, recording the number of parameter vectors of each call in `calls`."""

    def counted(xs: np.ndarray, l2s: list[float]) -> Any:
        calls.append(len(l2s))
        return fn(xs, l2s)

    return counted


def test_a_warm_start_moves_the_last_evaluation_to_the_new_penalty() -> None:
    """The objective is linear in l2: the last evaluation of a fit, moved to the next penalty with `penalty`, is the
    evaluation there (binary and multi-class); a warm start that already meets tol costs no evaluation."""
    for name, k in (("breast_cancer", 2), ("wine", 3)):
        x, y, sp = split_data(name, scaled=True)
        tr = sp["train"]
        probe = LogisticProbe(torch.from_numpy(x[tr]), {"label": torch.from_numpy(y[tr])}, {"label": k},
                              build_criterion("ce", {"label": k}))
        params = np.random.default_rng(0).normal(size=probe.size)
        (f1, g1), (f2, g2) = probe.loss_grad(params, 0.1), probe.loss_grad(params, 3e-3)
        pen, gpen = probe.penalty(params)
        assert f1 + (3e-3 - 0.1) * pen == pytest.approx(f2, rel=1e-9)
        np.testing.assert_allclose(g1 + (3e-3 - 0.1) * gpen, g2, rtol=1e-9, atol=1e-12)
        evaluations: list[int] = []
        probe.loss_grad_many = _counting(probe.loss_grad_many, evaluations)  # type: ignore[method-assign]
        first, again = probe.fit_grid([1e-2, 1e-2])
        assert first.converged and again.converged and again.iters == 0
        assert again.loss == first.loss and np.array_equal(again.x, first.x)
        both = len(evaluations)
        probe.fit_grid([1e-2])
        assert len(evaluations) == 2 * both  # the first fit alone makes all of them: the second made none


def test_other_criteria_fit_through_autograd() -> None:
    """Label smoothing / focal losses have no written-out gradient: the probe minimises them by autograd."""
    x, y, sp = split_data("wine", scaled=True)
    tr = sp["train"]
    for name, opts in (("ce", {"label_smoothing": 0.1}), ("focal", {"alpha": "none"})):
        crit = build_criterion(name, {"label": 3}, **opts)
        probe = LogisticProbe(torch.from_numpy(x[tr]), {"label": torch.from_numpy(y[tr])}, {"label": 3}, crit,
                              tol=1e-6, max_iter=1000)
        assert probe.row_weights is None
        fit = probe.fit(1e-2)
        assert fit.converged and fit.grad_max <= 1e-6
        w, b = probe.weights(fit.x)["label"]
        logits = torch.from_numpy(x[tr]) @ w.T + b
        loss = crit({"label": logits}, {"label": torch.from_numpy(y[tr])})[0] + 0.5e-2 * (w ** 2).sum()
        assert float(loss) == pytest.approx(fit.loss, rel=1e-9)


def test_probe_builds_no_torch_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first torch optimizer imports torch._dynamo (seconds); the probe's fit time must not include it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the probe built a torch optimizer")

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", refuse)
    x, y, sp = split_data("wine", scaled=True)
    tr = sp["train"]
    probe = LogisticProbe(torch.from_numpy(x[tr]), {"label": torch.from_numpy(y[tr])}, {"label": 3},
                          build_criterion("ce", {"label": 3}))
    assert probe.fit(1e-2).converged


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    x, y, sp = split_data("wine", scaled=True)
    data = write_cache(tmp_path / "cache", x, y, sp)
    with pytest.raises(MMCacheError, match="grid is empty"):
        probe_fit(data, grid=[])
    with pytest.raises(MMCacheError, match="must be > 0"):
        probe_fit(data, grid=[1e-2, 0.0])
    z, t = torch.from_numpy(x[sp["train"]]), {"label": torch.from_numpy(y[sp["train"]])}
    with pytest.raises(MMCacheError, match="uncertainty"):
        LogisticProbe(z, t, {"label": 3}, build_criterion("ce", {"label": 3}, uncertainty=True))
    with pytest.raises(MMCacheError, match="no train row has a label"):
        LogisticProbe(z, {"label": torch.full_like(t["label"], IGNORE)}, {"label": 3}, build_criterion("ce", {"label": 3}))


def test_batched_grid_reaches_the_sequential_optima(tmp_path: Path) -> None:
    """All penalties at once (cold, lockstep, one evaluation for all) give the warm-started fits' optima."""
    x, y, sp = split_data("digits", scaled=True)
    data = write_cache(tmp_path / "cache", x, y, sp)
    grid = [1e-1, 1e-2, 1e-3]
    runs = {b: probe_fit(data, grid=grid, tol=1e-7, max_iter=5000, batched=b) for b in (False, True)}
    (hs, rs), (hb, rb) = runs[False], runs[True]
    assert rb.best == rs.best and [c["val_accuracy"] for c in rb.curves] == [c["val_accuracy"] for c in rs.curves]
    for fs, fb in zip(rs.fits, rb.fits, strict=True):
        assert fb.converged and fb.loss == pytest.approx(fs.loss, rel=1e-7)
    xt = torch.from_numpy(x[sp["test"]]).float()
    with torch.no_grad():
        ps, pb = (torch.softmax(h.classifiers["label"](xt), 1) for h in (hs, hb))
    assert float((ps - pb).abs().max()) < 1e-3


def test_a_class_without_train_rows_is_scikit_learns_fit_of_the_classes_seen(tmp_path: Path) -> None:
    """Wine's 3 classes, class 2 only in val/test: scikit-learn fits a binary model of the two classes it sees,
    so the probe's C is the binary one, 2/(l2 n), and the models agree (class 2 gets probability ~0)."""
    x, y, sp = split_data("wine", scaled=True)
    sp = {**sp, "train": sp["train"][y[sp["train"]] != 2]}
    data = write_cache(tmp_path / "cache", x, y, sp)
    head, r = probe_fit(data, grid=[1e-2], tol=1e-8)
    n = len(sp["train"])
    assert r.sklearn_C == pytest.approx(2 / (1e-2 * n))
    ref = LogisticRegression(C=r.sklearn_C, tol=1e-8, max_iter=10000).fit(x[sp["train"]], y[sp["train"]])
    with torch.no_grad():
        ours = torch.softmax(head.classifiers["label"](torch.from_numpy(x[sp["test"]]).float()).double(), 1).numpy()
    assert np.abs(ours[:, :2] - ref.predict_proba(x[sp["test"]])).max() < 1e-3
    assert ours[:, 2].max() < 1e-4


def test_train_labels_of_one_class_are_refused_as_scikit_learn_does() -> None:
    x, y, sp = split_data("wine", scaled=True)
    tr = sp["train"][y[sp["train"]] == 1]
    with pytest.raises(ValueError):
        LogisticRegression().fit(x[tr], y[tr])
    with pytest.raises(MMCacheError, match="every labelled train row of task 'label' is of class index 1"):
        LogisticProbe(torch.from_numpy(x[tr]), {"label": torch.from_numpy(y[tr])}, {"label": 3},
                      build_criterion("ce", {"label": 3}))


@pytest.mark.parametrize("case", ["constant columns", "duplicate rows", "one feature"])
def test_degenerate_features_match_sklearn(case: str) -> None:
    """Constant columns, duplicated rows and a single feature: the same model as scikit-learn at the reported C."""
    x, y, sp = split_data("wine", scaled=True)
    tr = sp["train"]
    xt, yt = x[tr], y[tr]
    if case == "constant columns":
        xt = np.hstack([xt, np.full((len(xt), 2), 3.0)])
    elif case == "duplicate rows":
        xt, yt = np.vstack([xt, xt[:30]]), np.concatenate([yt, yt[:30]])
    else:
        xt = xt[:, :1].copy()
    probe = LogisticProbe(torch.from_numpy(xt), {"label": torch.from_numpy(yt)}, {"label": 3},
                          build_criterion("ce", {"label": 3}), tol=1e-8, max_iter=10000)
    fit = probe.fit(1e-2)
    assert fit.converged
    w, b = probe.weights(fit.x)["label"]
    ours = torch.softmax(torch.from_numpy(xt) @ w.T + b, 1).numpy()
    ref = LogisticRegression(C=probe.sklearn_C(1e-2, "label"), tol=1e-8, max_iter=10000).fit(xt, yt)
    assert np.abs(ours - ref.predict_proba(xt)).max() < 1e-4


def test_features_read_from_the_stores_give_the_in_memory_fit(tmp_path: Path) -> None:
    """Streamed rows (gathered chunk by chunk from the stores) fit the very same probe as rows in memory."""
    x, y, sp = split_data("wine", scaled=True)
    data = write_cache(tmp_path / "cache", x, y, sp)
    streamed = load_cached("sk", {"image": "feat"}, tmp_path / "cache", load="stream")
    assert streamed.streamed and not data.streamed
    (hm, rm), (hs, rs) = probe_fit(data, grid=[1e-1, 1e-2]), probe_fit(streamed, grid=[1e-1, 1e-2])
    assert rs.best == rm.best and [f.loss for f in rs.fits] == [f.loss for f in rm.fits]
    assert torch.equal(hs.classifiers["label"].weight, hm.classifiers["label"].weight)


def test_features_that_cannot_fit_are_refused_with_the_adam_probe(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, sp = split_data("wine", scaled=True)
    data = write_cache(tmp_path / "cache", x, y, sp)
    monkeypatch.setattr("mmcache.memory.available_bytes", lambda: 1000)
    need = (len(sp["train"]) + len(sp["val"])) * x.shape[1] * 4
    with pytest.raises(MMCacheError, match=rf"in memory, .*\({need} bytes\), but .*\(1000 bytes\) are available; "
                                           r"train the probe with --solver adam"):
        probe_fit(data)


def test_float32_features_at_the_default_tol_choose_scikit_learns_C(tmp_path: Path) -> None:
    """At the default tol the products run in float32 (as scikit-learn's on float32 features): the same chosen C
    and predictions as scikit-learn's LogisticRegression on the same float32 features."""
    x, y, sp = split_data("digits", scaled=True)
    data = write_cache(tmp_path / "cache", x, y, sp)
    head, r = probe_fit(data, grid=[1e-1, 1e-2, 1e-3])
    x32 = x.astype(np.float32)
    Cs = [sklearn_C(lam, len(sp["train"]), 10) for lam in (1e-1, 1e-2, 1e-3)]
    best, ref = sklearn_grid(x32, y, sp, Cs, 1e-4, 1000)
    assert r.best == best
    with torch.no_grad():
        ours = torch.softmax(head.classifiers["label"](torch.from_numpy(x32[sp["test"]])), 1).double().numpy()
    theirs = ref.predict_proba(x32[sp["test"]])
    # tol 1e-4 stops either solver somewhere in the optimum's flat valley: close, not equal
    assert np.abs(ours - theirs).max() < 0.1 and (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.99
