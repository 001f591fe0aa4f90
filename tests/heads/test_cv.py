"""Cross-validation on the cache: folds recomputed from the dataset's definition, one head per fold, mean ± std."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmcache.cache.store import FeatureStore, store_path
from mmcache.data.base import load_dataset
from mmcache.errors import MMCacheError
from mmcache.heads.cv import train_folds
from mmcache.heads.data import load_cached
from mmcache.heads.sweep import run_sweep
from mmcache.heads.train import TrainConfig
from tests.data.layouts import write_mvsa
from tests.heads.conftest import build_cache

CELLS = ["positive,positive", "negative,neutral", "neutral,neutral", "positive,negative", "neutral,positive"]
LABEL_OF = {"positive": 2, "neutral": 1, "negative": 0}


def mvsa_cache(tmp_path: Path, n: int = 130, failed: tuple[str, ...] = ("7",), fold: int | None = None) -> Path:
    """An MVSA-Single folder, its manifest as `mmcache extract` writes it, and two stores keyed by the ids
    (features carry the label, so heads learn); `failed` ids are recorded as failed in the image store."""
    rows = [(str(i), [CELLS[i % len(CELLS)]]) for i in range(1, n + 1)]
    root = write_mvsa(tmp_path / "mvsa", rows)
    ds = load_dataset("mvsa-single", root, **({} if fold is None else {"fold": fold}))
    cache = tmp_path / "cache"
    ds.write_manifest(cache / "mvsa-single" / "manifest.json")
    rng = np.random.default_rng(0)
    y = np.array([s.labels["sentiment"] for s in ds.samples])
    protos = rng.normal(size=(3, 8))
    for mod in ("image", "text"):
        keep = [k for k, s in enumerate(ds.samples) if not (mod == "image" and s.id in failed)]
        feats = (protos[y] + 0.3 * rng.normal(size=(len(y), 8))).astype(np.float32)
        with FeatureStore(store_path(cache, "mvsa-single", mod, "feat"), {"preset": f"toy-{mod}"}, "mvsa-single",
                          capacity=len(y)) as st:
            st.write([ds.samples[k].id for k in keep], {"pooled": feats[keep]})
            if mod == "image":
                for fid in failed:
                    st.fail(fid, "corrupt image")
    return cache


def test_folds_are_the_adapters_folds_without_re_extracting(tmp_path: Path) -> None:
    cache = mvsa_cache(tmp_path)
    data = load_cached("mvsa-single", {"image": "feat", "text": "feat"}, cache, quiet=True)
    assert "7" not in data.ids  # the failed row is dropped from every fold, the others keep their fold
    tests = []
    for k in range(10):
        fk = data.for_fold(k)
        want = {s.id: s.split for s in load_dataset("mvsa-single", tmp_path / "mvsa", fold=k).samples}
        got = {data.ids[int(i)]: s for s, idx in fk.split_index.items() for i in idx}
        assert got == {i: want[i] for i in data.ids}, k
        assert fk.fold == k and fk.features is data.features  # the same tensors, only the splits differ
        tests += [data.ids[int(i)] for i in fk.split_index["test"]]
    assert sorted(tests) == sorted(data.ids)  # the test folds are disjoint and cover every row


def test_a_manifest_holding_a_fold_gives_every_fold(tmp_path: Path) -> None:
    cache = mvsa_cache(tmp_path, failed=(), fold=4)
    data = load_cached("mvsa-single", {"image": "feat", "text": "feat"}, cache, quiet=True)
    same = data.for_fold(4)
    assert {s: i.tolist() for s, i in same.split_index.items()} == \
        {s: data.split_index[s].tolist() for s in ("train", "val", "test")}
    other = data.for_fold(5)
    assert other.split_index["test"].tolist() != data.split_index["test"].tolist()


def test_folds_are_refused_for_official_or_partial_splits(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_cache(cache, n=60)  # the toy dataset has its own splits
    data = load_cached("toy", {"image": "feat"}, cache, quiet=True)
    with pytest.raises(MMCacheError, match="has its own splits"):
        data.for_fold(0)
    cache = mvsa_cache(tmp_path / "part", failed=())
    man = cache / "mvsa-single" / "manifest.json"
    obj = json.loads(man.read_text())
    obj["samples"] = obj["samples"][:100]  # an extraction with --limit lists part of the dataset
    man.write_text(json.dumps(obj))
    data = load_cached("mvsa-single", {"image": "feat"}, cache, quiet=True)
    with pytest.raises(MMCacheError, match="part of the dataset"):
        data.for_fold(0)


def test_train_folds_writes_each_fold_and_the_summary(tmp_path: Path) -> None:
    cache = mvsa_cache(tmp_path)
    cfg = TrainConfig(dataset="mvsa-single", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                      runs_dir=str(tmp_path / "runs"), epochs=8, batch_size=32, lr=1e-2, head_hparams={"D": 8},
                      seed=3, quiet=True, run_name="cv")
    cv = train_folds(cfg, 5)
    assert cv.folder == tmp_path / "runs" / "mvsa-single" / "cv"
    assert [r["fold"] for r in cv.rows] == [0, 1, 2, 3, 4] and all(r["seed"] == 3 for r in cv.rows)
    n_test = 0
    for k, res in enumerate(cv.results):
        d = cv.folder / f"fold{k}"
        assert res.run_dir == d
        conf = json.loads((d / "config.json").read_text())
        assert (conf["fold"], conf["folds"], conf["seed"], conf["resolved"]["fold"]) == (k, 5, 3, k)
        n_test += json.loads((d / "metrics.json").read_text())["splits"]["test"]["sentiment"]["n"]
    assert n_test == 103  # every row with features (104 kept by the label rule, one failed) is tested once
    accs = [r["test_accuracy"] for r in cv.rows]
    assert cv.summary["runs"] == 5
    assert cv.summary["test_accuracy"] == pytest.approx(np.mean(accs))
    assert cv.summary["test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert cv.summary["test_accuracy"] > 0.6  # the features carry the label
    saved = json.loads((cv.folder / "cv.json").read_text())
    assert [r["fold"] for r in saved["rows"]] == [0, 1, 2, 3, 4]
    for suffix in ("csv", "md", "png"):
        assert (cv.folder / f"cv.{suffix}").stat().st_size > 0
    with pytest.raises(MMCacheError, match="already exists"):  # a named CV folder is never overwritten silently
        train_folds(cfg, 5)


def test_train_folds_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from mmcache.heads.cli import main

    cache = mvsa_cache(tmp_path)
    argv = ["heads", "train", "--dataset", "mvsa-single", "--vtype", "feat", "--ttype", "feat", "--cache-dir",
            str(cache), "--runs-dir", str(tmp_path / "runs"), "--epochs", "3", "--folds", "4", "--D", "8"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["fold", "seed", "val_accuracy"]
    assert [ln.split()[0] for ln in lines[2:6]] == ["0", "1", "2", "3"] and lines[6].startswith("mean ± std")
    assert "run folders:" in out
    folder = next((tmp_path / "runs" / "mvsa-single").glob("cv_linear_image-feat+text-feat_k4_*"))
    assert sorted(p.name for p in folder.glob("fold*")) == ["fold0", "fold1", "fold2", "fold3"]
    for bad, msg in ((["--folds", "1"], "--folds must be"), (["--folds", "3", "--fold", "1"], "exclude each other")):
        monkeypatch.setattr(sys, "argv", [*argv[:-4], *bad])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_sweep_over_folds(tmp_path: Path) -> None:
    cache = mvsa_cache(tmp_path)
    base = TrainConfig(dataset="mvsa-single", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                       runs_dir=str(tmp_path / "runs"), epochs=3, batch_size=32, head_hparams={"D": 8})
    rows = run_sweep(base, [("lr=0.01", {"lr": 0.01}), ("lr=0.001", {"lr": 0.001})], seeds=[0, 1], folds=3,
                     out=tmp_path / "sw")
    assert len(rows) == 12 and all("error" not in r for r in rows)
    assert Counter((r["config"], r["fold"]) for r in rows) == {(c, f): 2 for c in ("lr=0.01", "lr=0.001")
                                                              for f in range(3)}
    summary = json.loads((tmp_path / "sw.json").read_text())["summary"]
    assert all(s["runs"] == 6 for s in summary)


def test_more_folds_than_rows_is_refused_with_what_to_use(tmp_path: Path) -> None:
    cache = mvsa_cache(tmp_path, failed=())
    data = load_cached("mvsa-single", {"image": "feat"}, cache, quiet=True)
    with pytest.raises(MMCacheError, match=r"--folds 500: 'mvsa-single' has \d+ rows, fewer than the folds; use at "
                                           r"most --folds \d+"):
        data.for_fold(0, 500)
