"""The linear fusion head and the full-batch lbfgs probe (checked against scikit-learn)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mmcache.errors import MMCacheError
from mmcache.heads import build_head
from mmcache.heads.data import load_cached
from mmcache.heads.train import TrainConfig, train

INPUTS = {"image": {"pooled": (12,)}, "text": {"pooled": (8,)}}
TASKS = {"label": 3, "aux": 2}


def feats(b: int = 5, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {m: {"pooled": torch.randn(b, d["pooled"][0], generator=g)} for m, d in INPUTS.items()}


def test_forward_backward_shapes() -> None:
    head = build_head("linear", INPUTS, TASKS, {"D": 16})
    out = head(feats())
    assert {k: tuple(v.shape) for k, v in out.items()} == {"label": (5, 3), "aux": (5, 2)}
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in head.parameters())
    assert head.classifiers["label"].in_features == 32
    assert head.config["hparams"]["D"] == 16 and head.config["name"] == "linear"


def test_missing_modality_contributes_zeros() -> None:
    head = build_head("linear", INPUTS, TASKS, {"D": 4}).eval()
    f = feats()
    only_text = {"text": f["text"]}
    z = head.fused(only_text)
    assert torch.equal(z[:, :4], torch.zeros(5, 4))  # image slot comes first
    torch.testing.assert_close(z[:, 4:], head.fused(f)[:, 4:])
    with pytest.raises(MMCacheError, match="got none of its modalities"):
        head({"audio": {"pooled": torch.zeros(5, 3)}})


def test_ablation_and_explicit_modalities() -> None:
    text_only = build_head("linear", INPUTS, TASKS, {"D": 4, "ablation": 1})
    image_only = build_head("linear", INPUTS, TASKS, {"D": 4, "ablation": 2})
    assert text_only.mods == ["text"] and image_only.mods == ["image"]
    assert "image" not in text_only.branches
    three = {**INPUTS, "audio": {"pooled": (6,)}}
    pick = build_head("linear", three, TASKS, {"D": 4, "modalities": ["audio", "text"]})
    assert pick.mods == ["audio", "text"] and pick.classifiers["label"].in_features == 8
    # The output does not depend on a dropped modality at all.
    f = {**feats(), "audio": {"pooled": torch.randn(5, 6)}}
    pick.eval()
    g = {**f, "image": {"pooled": torch.randn(5, 12) * 100}}
    torch.testing.assert_close(pick(f)["label"], pick(g)["label"])
    with pytest.raises(MMCacheError, match="ablation must be one of"):
        build_head("linear", INPUTS, TASKS, {"ablation": 3})
    with pytest.raises(MMCacheError, match="only"):
        build_head("linear", {"image": {"pooled": (4,)}}, TASKS, {"ablation": 1})
    with pytest.raises(MMCacheError, match="unknown hyperparameters"):
        build_head("linear", INPUTS, TASKS, {"width": 3})


def test_l2norm_makes_the_head_scale_invariant() -> None:
    head = build_head("linear", INPUTS, TASKS, {"D": 8, "l2norm": True}).eval()
    f = feats()
    scaled = {m: {"pooled": v["pooled"] * 7.5} for m, v in f.items()}
    torch.testing.assert_close(head(f)["label"], head(scaled)["label"])
    plain = build_head("linear", INPUTS, TASKS, {"D": 8}).eval()
    assert not torch.allclose(plain(f)["label"], plain(scaled)["label"])


def test_d0_is_logistic_regression_on_concatenated_features() -> None:
    head = build_head("linear", INPUTS, {"label": 3}, {"D": 0})
    assert len(list(head.branches.parameters())) == 0 and head.classifiers["label"].in_features == 20
    f = feats()
    x = torch.cat([f["image"]["pooled"], f["text"]["pooled"]], 1)
    torch.testing.assert_close(head(f)["label"], head.classifiers["label"](x))


def test_token_only_store_is_refused() -> None:
    with pytest.raises(MMCacheError, match="needs a `pooled` vector"):
        build_head("linear", {"image": {"tokens": (3, 4)}}, TASKS)


@pytest.fixture
def probe_cache(make_cache: Callable[..., Path]) -> Path:
    # Noisy enough that the probe is far from perfect (accuracy about 0.8), so a 1-point match means something.
    return make_cache(n=1500, d_img=48, d_txt=48, noise=2.2, seed=3)


def _xy(cache: Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    data = load_cached("toy", {"image": "feat", "text": "feat"}, cache)
    x = torch.cat([data.features["image"]["pooled"], data.features["text"]["pooled"]], 1).float().numpy()
    return x, data.targets["label"].numpy(), {s: i.numpy() for s, i in data.split_index.items()}


def test_lbfgs_probe_matches_sklearn_at_the_same_penalty(probe_cache: Path) -> None:
    x, y, sp = _xy(probe_cache)
    n = len(sp["train"])
    C = 0.5
    ref = LogisticRegression(C=C, max_iter=2000, tol=1e-6).fit(x[sp["train"]], y[sp["train"]])
    r = train(TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(probe_cache),
                          solver="lbfgs", lbfgs_grid=[1.0 / (C * n)], lbfgs_tol=1e-6, save=False, quiet=True))
    acc_ref = ref.score(x[sp["test"]], y[sp["test"]])
    acc = r.metrics["test"]["label"]["accuracy"]
    assert 0.6 < acc_ref < 0.95
    assert abs(acc - acc_ref) <= 0.01
    assert r.select["sklearn_C"] == pytest.approx(C)
    # Same objective, same optimum: the probabilities agree closely, not only the accuracy.
    with torch.no_grad():
        ours = torch.softmax(r.head.classifiers["label"](torch.from_numpy(x[sp["test"]])), 1).numpy()
    assert np.abs(ours - ref.predict_proba(x[sp["test"]])).max() < 0.02


def test_lbfgs_penalty_chosen_on_validation(probe_cache: Path) -> None:
    x, y, sp = _xy(probe_cache)
    n = len(sp["train"])
    grid = [1.0, 1e-1, 1e-2, 1e-3, 1e-4]
    r = train(TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(probe_cache),
                          solver="lbfgs", lbfgs_grid=grid, save=False, quiet=True))
    assert [c["l2"] for c in r.curves] == grid
    vals = [c["val_accuracy"] for c in r.curves]
    assert r.select["value"] == max(vals) and r.select["l2"] == grid[int(np.argmax(vals))]
    # scikit-learn over the same grid, chosen on the same validation rows.
    best = max((LogisticRegression(C=1.0 / (lam * n), max_iter=2000).fit(x[sp["train"]], y[sp["train"]])
                for lam in grid), key=lambda m: m.score(x[sp["val"]], y[sp["val"]]))
    assert abs(r.metrics["test"]["label"]["accuracy"] - best.score(x[sp["test"]], y[sp["test"]])) <= 0.01


def test_lbfgs_warns_when_the_best_penalty_is_at_the_grid_edge(probe_cache: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    train(TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(probe_cache),
                      solver="lbfgs", lbfgs_grid=[1e3, 1e2], save=False, quiet=False))
    assert "is at the end of the grid" in capsys.readouterr().err


def test_lbfgs_needs_the_linear_head(toy_cache: Path) -> None:
    with pytest.raises(MMCacheError, match="linear probe only"):
        train(TrainConfig(dataset="toy", modalities={"image": "feat"}, cache_dir=str(toy_cache), head="gated",
                          solver="lbfgs", save=False, quiet=True))
    with pytest.raises(MMCacheError, match="leave --D unset"):
        train(TrainConfig(dataset="toy", modalities={"image": "feat"}, cache_dir=str(toy_cache),
                          head_hparams={"D": 64}, solver="lbfgs", save=False, quiet=True))


def test_lbfgs_reports_the_sklearn_C_of_a_binary_task(tmp_path: Path) -> None:
    """Two classes: C = 2/(l2 n) with n the labelled train rows, and the run is scikit-learn's model at that C."""
    from tests.heads.test_probe import split_data, write_cache

    x, y, sp = split_data("breast_cancer", scaled=True)
    hidden = sp["train"][::4]  # unlabelled train rows do not count
    write_cache(tmp_path / "cache", x, y, sp, unlabelled=hidden)
    r = train(TrainConfig(dataset="sk", modalities={"image": "feat"}, cache_dir=str(tmp_path / "cache"),
                          solver="lbfgs", lbfgs_grid=[1e-2], lbfgs_tol=1e-8, save=False, quiet=True))
    lab = np.setdiff1d(sp["train"], hidden)
    assert r.select["sklearn_C"] == pytest.approx(2 / (1e-2 * len(lab)))
    assert r.curves[0]["converged"] is True and r.curves[0]["sklearn_C"] == pytest.approx(r.select["sklearn_C"])
    ref = LogisticRegression(C=r.select["sklearn_C"], tol=1e-8, max_iter=10000).fit(x[lab], y[lab])
    with torch.no_grad():
        ours = torch.softmax(r.head.classifiers["label"](torch.from_numpy(x[sp["test"]]).float()).double(), 1)
    assert np.abs(ours.numpy() - ref.predict_proba(x[sp["test"]])).max() < 1e-3
