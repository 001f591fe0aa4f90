"""The fast trainer: learns the demo-like task, is reproducible, writes a complete run folder."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import f1_score, roc_auc_score, top_k_accuracy_score

from mmcache.errors import MMCacheError
from mmcache.heads.data import IGNORE, load_cached
from mmcache.heads.metrics import softmax
from mmcache.heads.train import TrainConfig, load_run, predict, predict_logits, quick_metrics, train
from tests.heads.conftest import unlabel_split

MODS = {"image": "feat", "text": "feat"}


def cfg(cache: Path, **kw: object) -> TrainConfig:
    """A small, fast config on the synthetic cache."""
    base: dict[str, object] = dict(dataset="toy", modalities=dict(MODS), cache_dir=str(cache),
                                   runs_dir=str(cache.parent / "runs"), epochs=25, batch_size=64, quiet=True)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_fusion_beats_each_single_modality(toy_cache: Path) -> None:
    accs = {}
    for name, hp in (("both", {}), ("text", {"ablation": 1}), ("image", {"ablation": 2})):
        r = train(cfg(toy_cache, head_hparams={"D": 32, **hp}, save=False))
        accs[name] = r.metrics["test"]["label"]["accuracy"]
    # Either modality alone caps accuracy near 5/9; both together determine the label.
    assert accs["both"] > 0.9
    assert accs["text"] < 0.7 and accs["image"] < 0.7
    assert accs["both"] > max(accs["text"], accs["image"]) + 0.2


def test_ablation_drops_the_branch_not_zeroes_it(toy_cache: Path) -> None:
    r = train(cfg(toy_cache, head_hparams={"D": 8, "ablation": 1}, epochs=1, save=False))
    names = [k for k, _ in r.head.named_parameters()]
    assert any(k.startswith("branches.text") for k in names)
    assert not any(k.startswith("branches.image") for k in names)
    assert r.head.classifiers["label"].in_features == 8


def test_same_seed_same_result_other_seed_differs(toy_cache: Path) -> None:
    a = train(cfg(toy_cache, epochs=3, save=False, seed=1))
    b = train(cfg(toy_cache, epochs=3, save=False, seed=1))
    c = train(cfg(toy_cache, epochs=3, save=False, seed=2))
    sa, sb, sc = a.head.state_dict(), b.head.state_dict(), c.head.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["train_loss"] for r in a.curves] == [r["train_loss"] for r in b.curves]
    assert not torch.equal(sa["classifiers.label.weight"], sc["classifiers.label.weight"])


def test_run_folder_contents_and_reload(toy_cache: Path) -> None:
    r = train(cfg(toy_cache, run_name="r1"))
    d = r.run_dir
    assert d == toy_cache.parent / "runs" / "toy" / "r1"
    for name in ("model.safetensors", "head.json", "config.json", "metrics.json", "versions.json", "curves.json",
                 "curves.csv", "confusion_label.png"):
        assert (d / name).is_file(), name
    assert (d / "confusion_label.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["best_epoch"] == r.best_epoch
    assert metrics["splits"]["test"]["label"]["accuracy"] == pytest.approx(r.metrics["test"]["label"]["accuracy"])
    assert set(metrics["splits"]["test"]["label"]["checks"]) == {"no_nan", "probabilities", "not_collapsed",
                                                                 "beats_majority"}
    curves = json.loads((d / "curves.json").read_text())
    assert [c["epoch"] for c in curves] == list(range(1, 26))
    with (d / "curves.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 25
    # The best epoch is the one with the best val accuracy in the curves (first one on ties).
    accs = [c["val_accuracy"] for c in curves]
    assert r.best_epoch == int(np.argmax(accs)) + 1
    config = json.loads((d / "config.json").read_text())
    assert config["modalities"] == MODS and config["resolved"]["labels"]["tasks"]["label"][0] == "negative"
    assert "torch" in json.loads((d / "versions.json").read_text())
    # The checkpoint rebuilds without pickle and gives the same predictions.
    head, _ = load_run(d)
    state = load_file(str(d / "model.safetensors"))
    assert set(state) == set(head.state_dict())
    data = load_cached("toy", MODS, toy_cache)
    idx = data.split_index["test"]
    a = predict_logits(head, data, idx)["label"]
    b = predict_logits(r.head.cpu(), data, idx)["label"]
    torch.testing.assert_close(a, b)
    # A named run is never overwritten silently.
    with pytest.raises(MMCacheError, match="already exists"):
        train(cfg(toy_cache, run_name="r1"))


def test_default_run_names_never_collide(toy_cache: Path) -> None:
    a = train(cfg(toy_cache, epochs=1))
    b = train(cfg(toy_cache, epochs=1))
    assert a.run_dir != b.run_dir and a.run_dir.exists() and b.run_dir.exists()


def test_predict_csv(toy_cache: Path) -> None:
    r = train(cfg(toy_cache, run_name="p"))
    out = predict(r.run_dir, split="test", out=toy_cache.parent / "pred.csv")
    rows = list(csv.DictReader(out.open()))
    data = load_cached("toy", MODS, toy_cache)
    test_ids = [data.ids[i] for i in data.split_index["test"].tolist()]
    assert [row["id"] for row in rows] == test_ids
    assert list(rows[0]) == ["id", "label", "predicted", "p_negative", "p_neutral", "p_positive"]
    probs = np.array([[float(row[f"p_{c}"]) for c in ("negative", "neutral", "positive")] for row in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    names = ["negative", "neutral", "positive"]
    assert [row["predicted"] for row in rows] == [names[i] for i in probs.argmax(1)]
    acc = np.mean([row["label"] == row["predicted"] for row in rows])
    assert acc == pytest.approx(r.metrics["test"]["label"]["accuracy"])


def test_predict_refuses_a_store_rebuilt_with_another_spec(toy_cache: Path) -> None:
    """A store rebuilt under the same name by another extractor holds features the head never saw: `heads
    predict` refuses it (as `mmcache predict` does) instead of writing predictions from them."""
    from mmcache.cache.store import FeatureStore, StoreReader, store_path

    r = train(cfg(toy_cache, run_name="spec", epochs=2))
    path = store_path(toy_cache, "toy", "image", "feat")
    old = StoreReader(path)
    ids, arrays = list(old.ids), {"pooled": old.load()["pooled"]}
    path.unlink()
    with FeatureStore(path, {"preset": "toy-image-v2", "d": 24}, "toy", capacity=len(ids)) as st:
        st.write(ids, arrays)
    out = toy_cache.parent / "pred.csv"
    with pytest.raises(MMCacheError, match=r"store image/feat of 'toy' was rebuilt with another spec .* train the "
                                           r"head again on this store"):
        predict(r.run_dir, split="test", out=out)
    assert not out.exists()


def test_missing_rows_dropped_from_all_modalities_with_warning(make_cache: Callable[..., Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cache = make_cache(fail_ids=("r0001", "r0002"), skip_text=("r0003",))
    data = load_cached("toy", MODS, cache)
    err = capsys.readouterr().err
    assert "2 of 600 rows are missing from" in err and "(2 failed, 0 not extracted)" in err
    assert "1 of 600 rows are missing from" in err and "(0 failed, 1 not extracted)" in err
    assert len(data.ids) == 597 and not {"r0001", "r0002", "r0003"} & set(data.ids)
    assert data.features["image"]["pooled"].shape[0] == data.features["text"]["pooled"].shape[0] == 597
    assert sum(len(v) for v in data.split_index.values()) == 597


def test_features_aligned_by_id(make_cache: Callable[..., Path], tmp_path: Path) -> None:
    from mmcache.cache.store import StoreReader, store_path

    cache = make_cache(fail_ids=("r0005",))
    data = load_cached("toy", MODS, cache)
    ref = StoreReader(store_path(cache, "toy", "text", "feat"))
    i = data.ids.index("r0010")
    want = ref.load(["r0010"], keys=["pooled"])["pooled"][0]
    np.testing.assert_allclose(data.features["text"]["pooled"][i].numpy(), want.astype(np.float32))


def test_multitask_and_selection_metric(make_cache: Callable[..., Path]) -> None:
    cache = make_cache(second_task=True)
    r = train(cfg(cache, select_metric="image_score:macro_f1", save=False))
    assert set(r.metrics["test"]) == {"label", "image_score"}
    assert r.select == {"task": "image_score", "metric": "macro_f1", "value": r.select["value"]}
    assert r.metrics["test"]["image_score"]["accuracy"] > 0.9
    assert set(r.head.classifiers) == {"label", "image_score"}
    only = train(cfg(cache, tasks=["image_score"], epochs=2, save=False))
    assert set(only.metrics["test"]) == {"image_score"}


def test_training_options_run_and_learn(toy_cache: Path) -> None:
    for kw in (dict(optimizer="adamw", weight_decay=1e-2, schedule="plateau"),
               dict(optimizer="sgd", lr=0.05, schedule="none", class_weights=True, label_smoothing=0.1),
               dict(oversample=True, select_metric="loss"),
               dict(select_metric="auroc", early_stopping=8),
               dict(head_hparams={"l2norm": True, "D": 16, "dropout": 0.1}, lr=1e-2)):
        r = train(cfg(toy_cache, save=False, **kw))
        assert r.metrics["test"]["label"]["accuracy"] > 0.85, kw


def test_early_stopping(toy_cache: Path) -> None:
    r = train(cfg(toy_cache, epochs=200, early_stopping=3, save=False))
    assert len(r.curves) < 200
    assert len(r.curves) - r.best_epoch == 3


def test_teacher_store_is_loaded_and_passed(make_cache: Callable[..., Path]) -> None:
    cache = make_cache(teacher=True)
    data = load_cached("toy", MODS, cache, teacher="oracle")
    assert data.teacher is not None and data.teacher.shape == (600, 3)
    assert torch.equal(data.teacher.argmax(1), data.targets["label"])
    r = train(cfg(cache, teacher="oracle", epochs=2, save=False))
    assert r.config["teacher"] == "oracle"


def test_no_val_split_carves_one_from_train(make_cache: Callable[..., Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cache = make_cache(splits=("train", "test"))
    data = load_cached("toy", MODS, cache, val_fraction=0.2)
    n_train = len(data.split_index["train"]) + len(data.split_index["val"])
    assert len(data.split_index["val"]) == pytest.approx(0.2 * n_train, abs=1)
    assert not set(data.split_index["val"].tolist()) & set(data.split_index["train"].tolist())
    assert "no `val` split" in capsys.readouterr().err


def test_user_errors(toy_cache: Path) -> None:
    with pytest.raises(MMCacheError, match="unknown optimizer"):
        train(cfg(toy_cache, optimizer="rmsprop"))
    with pytest.raises(MMCacheError, match="unknown metric"):
        train(cfg(toy_cache, select_metric="precision", save=False))
    with pytest.raises(MMCacheError, match="unknown task"):
        train(cfg(toy_cache, tasks=["nope"], save=False))
    with pytest.raises(MMCacheError, match="not found"):
        train(cfg(toy_cache, modalities={"image": "missing"}, save=False))
    with pytest.raises(MMCacheError, match="only"):
        train(cfg(toy_cache, modalities={"image": "feat"}, head_hparams={"ablation": 1}, save=False))


def test_quick_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y]
    y[:7] = IGNORE
    q = quick_metrics(torch.from_numpy(y), torch.from_numpy(logits), "accuracy")
    keep = y >= 0
    pred = logits[keep].argmax(1)
    assert q["accuracy"] == pytest.approx((pred == y[keep]).mean())
    assert q["macro_f1"] == pytest.approx(f1_score(y[keep], pred, average="macro"))
    assert q["weighted_f1"] == pytest.approx(f1_score(y[keep], pred, average="weighted"))
    t2 = quick_metrics(torch.from_numpy(y), torch.from_numpy(logits), "top2_accuracy")
    assert t2["top2_accuracy"] == pytest.approx(top_k_accuracy_score(y[keep], logits[keep], k=2))
    au = quick_metrics(torch.from_numpy(y), torch.from_numpy(logits), "auroc")
    assert au["auroc"] == pytest.approx(roc_auc_score(y[keep], softmax(logits[keep]), multi_class="ovr"))


def test_failed_prediction_checks_are_reported(make_cache: Callable[..., Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cache = make_cache(majority=0.5)
    # An enormous L2 penalty leaves only the biases: every row gets the majority class.
    r = train(cfg(cache, solver="lbfgs", lbfgs_grid=[1e4], save=False, quiet=False))
    err = capsys.readouterr().err
    checks = r.metrics["test"]["label"]["checks"]
    assert not checks["not_collapsed"]["ok"] and not checks["beats_majority"]["ok"]
    assert "warning: test label: check failed: not_collapsed" in err
    assert "warning: test label: check failed: beats_majority" in err


def test_predict_multitask_columns(make_cache: Callable[..., Path]) -> None:
    cache = make_cache(second_task=True)
    r = train(cfg(cache, epochs=3, run_name="mt"))
    out = predict(r.run_dir, split="all")
    rows = list(csv.DictReader(out.open()))
    assert out.name == "predictions_toy_all.csv" and len(rows) == 600
    assert list(rows[0])[:4] == ["id", "label_label", "label_predicted", "label_p_negative"]
    assert "image_score_p_positive" in rows[0]


def test_unlabeled_test_split(toy_cache: Path) -> None:
    # A hidden test split (no labels): metrics skip it, the confusion matrix falls back to val, predict leaves
    # the label column empty.
    unlabel_split(toy_cache, "test")
    r = train(cfg(toy_cache, epochs=2, run_name="hidden"))
    assert "test" not in r.metrics and set(r.metrics) == {"train", "val"}
    assert (r.run_dir / "confusion_label.png").exists()
    rows = list(csv.DictReader(predict(r.run_dir, split="test").open()))
    assert rows and all(row["label"] == "" and row["predicted"] for row in rows)
