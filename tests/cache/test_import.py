"""`mmcache cache import`: stores from arrays computed elsewhere, through the real command (in-process)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mmcache.cache import StoreReader, store_path
from mmcache.manifest import Manifest

N = 40
SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))  # the sha256 cache of the source files


def run(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The `mmcache` console script in-process: (exit code, stdout, stderr)."""
    from mmcache.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["mmcache", *argv])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def imp(*args: str) -> list[str]:
    return ["cache", "import", "toy", "--no-progress", *args]


def ids_of(n: int = N) -> list[str]:
    return [f"s{i:03d}" for i in range(n)]


def features(n: int = N, d: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def write_labels(path: Path, ids: list[str], labels: list[str] | None = None, extra: str = "") -> Path:
    labels = labels or [["neg", "pos"][i % 2] for i in range(len(ids))]
    rows = ["id,split,label" + (",label_topic" if extra else "")]
    rows += [f"{sid},{SPLITS[i % 3]},{lab}" + (f",{extra}" if extra else "") for i, (sid, lab) in
             enumerate(zip(ids, labels, strict=True))]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_npz_round_trip_with_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    x = features()
    x[7, 2] = np.nan
    x[9, 0] = np.inf
    np.savez(tmp_path / "feats.npz", pooled=x, ids=np.array(ids_of()))
    labels = write_labels(tmp_path / "labels.csv", ids_of())
    code, out, err = run(imp("--modality", "image", "--name", "openface", "--features", "feats.npz",
                             "--manifest", str(labels)), monkeypatch, capsys)
    assert code == 0, err
    assert "imported 38 rows into cache/toy/image/openface.h5" in out and "2 failed (NaN/inf" in out, out
    r = StoreReader(store_path("cache", "toy", "image", "openface"))
    good = [i for i in range(N) if i not in (7, 9)]
    assert r.ids == [ids_of()[i] for i in good]
    assert r.dtypes["pooled"] == np.float16
    np.testing.assert_array_equal(r.load()["pooled"], x[good].astype(np.float16))
    assert set(r.failed) == {"s007", "s009"} and "NaN/inf values in 'pooled' (feats.npz row 7)" in r.failed["s007"]
    spec = r.spec
    assert spec["preset"] == "import" and spec["modality"] == "image"
    (src,) = spec["imported"]
    assert src["file"] == "feats.npz"
    assert src["sha256"] == hashlib.sha256((tmp_path / "feats.npz").read_bytes()).hexdigest()
    assert src["arrays"] == {"pooled": {"shape": [N, 6], "dtype": "float32"}}
    man = Manifest.read(tmp_path / "cache" / "toy" / "manifest.json")
    assert man.ids == ids_of() and man.labels.tasks == {"label": ["neg", "pos"]}
    assert man.splits[:3] == ["train", "val", "test"] and man.targets["label"][:2].tolist() == [0, 1]


def test_safetensors_tokens_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    x = features()
    tok = np.random.default_rng(1).normal(size=(N, 5, 6)).astype(np.float16)
    mask = np.random.default_rng(2).random((N, 5)) < 0.7
    save_file({"pooled": x, "tokens": tok, "mask": mask}, str(tmp_path / "f.safetensors"),
              metadata={"ids": json.dumps(ids_of())})
    code, out, err = run(imp("--modality", "text", "--name", "st", "--features", "f.safetensors", "--dtype",
                             "float32"), monkeypatch, capsys)
    assert code == 0, err
    assert "no manifest at" in out  # a store alone: the manifest comes with a later --manifest
    r = StoreReader(store_path("cache", "toy", "text", "st"))
    got = r.load()
    assert r.ids == ids_of() and got["pooled"].dtype == np.float32 and got["mask"].dtype == np.bool_
    np.testing.assert_array_equal(got["pooled"], x)
    np.testing.assert_array_equal(got["tokens"], tok.astype(np.float32))
    np.testing.assert_array_equal(got["mask"], mask)
    assert r.spec["imported"][0]["arrays"]["tokens"] == {"shape": [N, 5, 6], "dtype": "float16"}


def test_npy_files_with_ids_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    x = features().astype(np.float64)
    tok = np.arange(N * 3 * 2, dtype=np.int32).reshape(N, 3, 2)
    mask = np.ones((N, 3), dtype=np.uint8)
    mask[:, 2] = 0
    np.save(tmp_path / "p.npy", x)
    np.save(tmp_path / "t.npy", tok)
    np.save(tmp_path / "m.npy", mask)
    weird = [*ids_of(N - 2), " spaced id ", "ünï,côdé"]
    (tmp_path / "ids.txt").write_text("\n".join(weird) + "\n", encoding="utf-8")
    code, _, err = run(imp("--modality", "audio", "--name", "smile", "--features", "p.npy", "--features",
                           "tokens=t.npy", "--features", "mask=m.npy", "--ids", "ids.txt"), monkeypatch, capsys)
    assert code == 0, err
    r = StoreReader(store_path("cache", "toy", "audio", "smile"))
    got = r.load()
    assert r.ids == weird
    np.testing.assert_array_equal(got["pooled"], x.astype(np.float16))
    np.testing.assert_array_equal(got["tokens"], tok.astype(np.float16))
    np.testing.assert_array_equal(got["mask"], mask.astype(bool))
    # The same ids from a CSV (quoted where needed) are the same import: it resumes with nothing to do.
    csv_ids = "id\n" + "\n".join(f'"{i}"' for i in weird) + "\n"
    (tmp_path / "ids.csv").write_text(csv_ids, encoding="utf-8")
    code, out, err = run(imp("--modality", "audio", "--name", "smile", "--features", "p.npy", "--features",
                             "tokens=t.npy", "--features", "mask=m.npy", "--ids", "ids.csv"), monkeypatch, capsys)
    assert code == 0 and "imported 0 rows" in out and f"{N} already in the store" in out, err


def test_resume_and_other_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    import mmcache.cache.importer as importer

    x = features(n=200)
    np.savez(tmp_path / "f.npz", pooled=x, ids=np.array(ids_of(200)))
    monkeypatch.setattr(importer, "BLOCK_BYTES", 6 * (4 + 2 + 1) * 50)  # blocks of 50 rows
    real, calls = importer._import_block, []

    def interrupted(*a: object, **k: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(importer, "_import_block", interrupted)
    argv = imp("--modality", "image", "--name", "f", "--features", "f.npz")
    code, _, err = run(argv, monkeypatch, capsys)
    assert code == 130, err
    path = store_path("cache", "toy", "image", "f")
    assert len(StoreReader(path)) == 100  # the committed blocks stay: a stopped import resumes
    monkeypatch.setattr(importer, "_import_block", real)
    code, out, err = run(argv, monkeypatch, capsys)
    assert code == 0 and "imported 100 rows" in out and "100 already in the store" in out, (out, err)
    r = StoreReader(path)
    assert r.ids == ids_of(200)
    np.testing.assert_array_equal(r.load()["pooled"], x.astype(np.float16))
    # Other features under the same store name: refused, the store untouched.
    np.savez(tmp_path / "f.npz", pooled=x + 1, ids=np.array(ids_of(200)))
    code, _, err = run(argv, monkeypatch, capsys)
    assert code == 2 and "was built with a different spec" in err
    assert len(StoreReader(path)) == 200


def test_heads_train_on_imported_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    n = 150
    y = rng.integers(0, 2, n)
    ids = ids_of(n)
    img = (np.eye(2)[y] @ rng.normal(size=(2, 8)) + 0.1 * rng.normal(size=(n, 8))).astype(np.float32)
    txt = rng.normal(size=(n, 4)).astype(np.float32)
    np.savez(tmp_path / "img.npz", pooled=img, ids=np.array(ids))
    np.savez(tmp_path / "txt.npz", pooled=txt, ids=np.array(ids))
    labels = write_labels(tmp_path / "labels.csv", ids, [["neg", "pos"][v] for v in y.tolist()])
    for mod, f in (("image", "img.npz"), ("text", "txt.npz")):
        code, _, err = run(imp("--modality", mod, "--name", "byo", "--features", f, "--manifest", str(labels)),
                           monkeypatch, capsys)
        assert code == 0, err
    code, out, err = run(["heads", "train", "--dataset", "toy", "--vtype", "byo", "--ttype", "byo", "--epochs", "30",
                          "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs" / "toy").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["splits"]["test"]["label"]["accuracy"] > 0.8


def _npz(tmp_path: Path, **arrays: object) -> str:
    np.savez(tmp_path / "f.npz", **arrays)  # type: ignore[arg-type]
    return "f.npz"


def _ids(tmp_path: Path, ids: list[str]) -> str:
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    return "ids.txt"


def _dup_ids(p: Path) -> list[str]:
    ids = ids_of()
    ids[5] = ids[2]
    return ["--features", _npz(p, pooled=features(), ids=np.array(ids))]


def _empty_id(p: Path) -> list[str]:
    ids = ids_of()
    ids[3] = ""
    np.save(p / "p.npy", features())
    return ["--features", "p.npy", "--ids", _ids(p, ids)]


def _long_id(p: Path) -> list[str]:
    ids = ids_of()
    ids[4] = "x" * 2000
    return ["--features", _npz(p, pooled=features(), ids=np.array(ids))]


def _nul_id(p: Path) -> list[str]:
    ids = ids_of()
    ids[6] = "a\0b"
    save_file({"pooled": features()}, str(p / "f.safetensors"), metadata={"ids": json.dumps(ids)})
    return ["--features", "f.safetensors"]


def _strings(p: Path) -> list[str]:
    np.save(p / "p.npy", np.array([["a"] * 3] * N))
    return ["--features", "p.npy", "--ids", _ids(p, ids_of())]


def _complex(p: Path) -> list[str]:
    return ["--features", _npz(p, pooled=features().astype(np.complex64), ids=np.array(ids_of()))]


def _objects(p: Path) -> list[str]:
    np.save(p / "p.npy", np.array([[object()] * 2] * N, dtype=object), allow_pickle=True)
    return ["--features", "p.npy", "--ids", _ids(p, ids_of())]


def _object_ids(p: Path) -> list[str]:
    return ["--features", _npz(p, pooled=features(), ids=np.array(ids_of(), dtype=object))]


def _bf16(p: Path) -> list[str]:
    import torch
    from safetensors.torch import save_file as save_torch

    save_torch({"pooled": torch.zeros(N, 3, dtype=torch.bfloat16)}, str(p / "f.safetensors"),
               metadata={"ids": json.dumps(ids_of())})
    return ["--features", "f.safetensors"]


def _tokens_no_mask(p: Path) -> list[str]:
    return ["--features", _npz(p, pooled=features(), tokens=np.zeros((N, 3, 6), np.float32), ids=np.array(ids_of()))]


def _tokens_rows(p: Path) -> list[str]:
    return ["--features", _npz(p, pooled=features(), tokens=np.zeros((N - 1, 3, 6), np.float32),
                               mask=np.ones((N - 1, 3), bool), ids=np.array(ids_of()))]


def _mask_len(p: Path) -> list[str]:
    return ["--features", _npz(p, pooled=features(), tokens=np.zeros((N, 3, 6), np.float32),
                               mask=np.ones((N, 4), bool), ids=np.array(ids_of()))]


def _fewer_ids(p: Path) -> list[str]:
    np.save(p / "p.npy", features())
    return ["--features", "p.npy", "--ids", _ids(p, ids_of(N - 1))]


def _no_ids(p: Path) -> list[str]:
    np.save(p / "p.npy", features())
    return ["--features", "p.npy"]


def _other_array(p: Path) -> list[str]:
    return ["--features", _npz(p, pooled=features(), labels=np.zeros(N), ids=np.array(ids_of()))]


def _split(p: Path) -> list[str]:
    write_labels(p / "labels.csv", ids_of())
    text = (p / "labels.csv").read_text().replace("s004,val,", "s004,holdout,")
    (p / "labels.csv").write_text(text)
    return ["--features", _npz(p, pooled=features(), ids=np.array(ids_of())), "--manifest", "labels.csv"]


def _no_label(p: Path) -> list[str]:
    write_labels(p / "labels.csv", ids_of())
    text = (p / "labels.csv").read_text().replace("s010,val,neg", "s010,val,")
    (p / "labels.csv").write_text(text)
    return ["--features", _npz(p, pooled=features(), ids=np.array(ids_of())), "--manifest", "labels.csv"]


def _not_in_manifest(p: Path) -> list[str]:
    write_labels(p / "labels.csv", ids_of(N - 1))
    return ["--features", _npz(p, pooled=features(), ids=np.array(ids_of())), "--manifest", "labels.csv"]


def _overflow(p: Path) -> list[str]:  # found part way (rows 0-29 written first): the new store is removed
    x = features()
    x[30, 1] = 1e6
    return ["--features", _npz(p, pooled=x, ids=np.array(ids_of()))]


def _mask_values(p: Path) -> list[str]:
    mask = np.ones((N, 3), np.int8)
    mask[35, 0] = 2
    return ["--features", _npz(p, pooled=features(), tokens=np.zeros((N, 3, 6), np.float32), mask=mask,
                               ids=np.array(ids_of()))]


BAD: dict[str, tuple[Callable[[Path], list[str]], list[str]]] = {
    "duplicate ids": (_dup_ids, ["f.npz array 'ids', row 2", "'s002' is repeated at rows 2, 5"]),
    "empty id": (_empty_id, ["ids.txt, line 4 (row 3)", "is empty"]),
    "long id": (_long_id, ["f.npz array 'ids', row 4", "over the 1024-byte limit"]),
    "NUL in id": (_nul_id, ["f.safetensors metadata 'ids', item 6", "NUL"]),
    "strings": (_strings, ["p.npy has dtype <U1", "does not take"]),
    "complex": (_complex, ["f.npz array 'pooled' has dtype complex64"]),
    "objects": (_objects, ["p.npy has dtype object"]),
    "object ids": (_object_ids, ["f.npz array 'ids' cannot be read without pickle"]),
    "bfloat16": (_bf16, ["f.safetensors tensor 'pooled' has dtype BF16"]),
    "tokens without mask": (_tokens_no_mask, ["f.npz array 'tokens': tokens without mask"]),
    "leading dims": (_tokens_rows, ["f.npz array 'tokens' has 39 rows but f.npz array 'pooled' has 40"]),
    "mask length": (_mask_len, ["f.npz array 'mask' has shape [40, 4] but tokens [40, 3, 6]"]),
    "fewer ids": (_fewer_ids, ["ids.txt has 39 ids but p.npy has 40 rows"]),
    "no ids": (_no_ids, ["p.npy: no ids; pass --ids"]),
    "other array": (_other_array, ["f.npz holds an array 'labels'"]),
    "unknown split": (_split, ["labels.csv, line 6: row 's004' has split 'holdout'"]),
    "missing label": (_no_label, ["labels.csv, line 12: row 's010' has no label"]),
    "id not in manifest": (_not_in_manifest, ["f.npz array 'ids', row 39: id 's039' is not in labels.csv"]),
    "float16 overflow": (_overflow, ["f.npz array 'pooled', row 30 (id 's030')", "--dtype float32"]),
    "mask values": (_mask_values, ["f.npz array 'mask', row 35", "0/1"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import mmcache.cache.importer as importer

    make, expected = BAD[case]
    monkeypatch.setattr(importer, "BLOCK_BYTES", 6 * (4 + 2 + 1) * 10)  # blocks of ~10 rows: errors found part way
    args = make(tmp_path)
    code, out, err = run(imp("--modality", "image", "--name", "x", *args), monkeypatch, capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for want in expected:
        assert want in err, err
    assert not (tmp_path / "cache").exists()  # no store, manifest, lock or folder half-written


def test_existing_manifest_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    labels = write_labels(tmp_path / "labels.csv", ids_of())
    np.savez(tmp_path / "a.npz", pooled=features(), ids=np.array(ids_of()))
    code, _, err = run(imp("--modality", "image", "--name", "a", "--features", "a.npz", "--manifest", str(labels)),
                       monkeypatch, capsys)
    assert code == 0, err
    mpath = tmp_path / "cache" / "toy" / "manifest.json"
    before = mpath.read_bytes()
    # The same CSV again is no conflict; another one is refused; features of ids the manifest lacks are refused.
    np.savez(tmp_path / "b.npz", pooled=features(), ids=np.array(ids_of()))
    code, _, err = run(imp("--modality", "text", "--name", "b", "--features", "b.npz", "--manifest", str(labels)),
                       monkeypatch, capsys)
    assert code == 0, err
    other = write_labels(tmp_path / "other.csv", ids_of(), ["x"] * N)
    code, _, err = run(imp("--modality", "text", "--name", "c", "--features", "b.npz", "--manifest", str(other)),
                       monkeypatch, capsys)
    assert code == 2 and "has a manifest already" in err and err.count("\n") == 1, err
    np.savez(tmp_path / "d.npz", pooled=features(n=N + 1), ids=np.array(ids_of(N + 1)))
    code, _, err = run(imp("--modality", "text", "--name", "d", "--features", "d.npz"), monkeypatch, capsys)
    assert code == 2 and "id 's040' is not in cache/toy/manifest.json" in err, err
    assert mpath.read_bytes() == before
    assert not store_path("cache", "toy", "text", "c").exists() and not store_path("cache", "toy", "text", "d").exists()


def test_manifest_csv_tasks_and_class_order(tmp_path: Path) -> None:
    from mmcache.cache.importer import read_manifest_csv

    p = tmp_path / "m.csv"
    p.write_text("id,split,label,label_topic\na,train,10,sport\nb,dev,2,\nc,test,2,news\n")
    ds = read_manifest_csv(p, "toy")
    assert ds.labels.tasks == {"label": ["2", "10"], "topic": ["news", "sport"]}
    assert [s.split for s in ds.samples] == ["train", "val", "test"]
    assert [s.labels for s in ds.samples] == [{"label": 1, "topic": 1}, {"label": 0}, {"label": 0, "topic": 0}]
