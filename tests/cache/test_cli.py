"""`mmcache cache ls|info|verify|rm` through the real command tree."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from mmcache.cache import FeatureStore, store_path
from mmcache.cli import app

SPEC = {"preset": "clip-tiny", "family": "open_clip", "modality": "image", "model": "ViT-T", "weights": "random"}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for modality, dim in (("image", 16), ("text", 24)):
        with FeatureStore(store_path(tmp_path, "demo", modality, "clip"), {**SPEC, "modality": modality}, "demo") as st:
            st.write([f"s{i}" for i in range(30)], {"pooled": rng.standard_normal((30, dim)),
                                                   "tokens": rng.standard_normal((30, 7, dim)),
                                                   "mask": np.ones((30, 7), bool)})
            st.fail("s30", "empty text")
    m = tmp_path / "demo" / "manifest.json"
    m.write_text(json.dumps({"name": "demo", "samples": [{"id": f"s{i}", "split": "train", "labels": {}}
                                                         for i in range(31)]}))
    return tmp_path


def invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["cache", *args])
    return res.exit_code, res.output


def test_ls_table(cache: Path) -> None:
    code, out = invoke("ls", "--cache-dir", str(cache))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["store", "rows", "failed", "arrays", "dtype", "size", "spec"]
    img = next(ln for ln in lines if ln.startswith("demo/image/clip.h5"))
    assert " 30 " in img and "pooled 16, tokens 7x16, mask 7" in img and "float16" in img
    assert "clip-tiny ViT-T random #" in img
    txt = next(ln for ln in lines if ln.startswith("demo/text/clip.h5"))
    assert "tokens 7x24" in txt
    (cache / "demo" / "image" / "broken.h5").write_bytes(b"xx")
    code, out = invoke("ls", "--cache-dir", str(cache))
    assert code == 0 and "unreadable" in next(ln for ln in out.splitlines() if "broken.h5" in ln)


def test_info(cache: Path) -> None:
    p = cache / "demo" / "image" / "clip.h5"
    code, out = invoke("info", str(p))
    assert code == 0, out
    assert "30 committed, 1 failed" in out and "failed    s30: empty text" in out and '"weights": "random"' in out
    p.with_name("clip.failed.csv").write_text("id,kind,reason\ns30,empty text,empty text\n")
    code, out = invoke("info", str(p), "--failed", "0")
    assert code == 0 and f"1 more (--failed N, all of them in {p.with_name('clip.failed.csv')})" in out
    code, out = invoke("info", str(p), "--json")
    obj = json.loads(out)
    assert obj["rows"] == 30 and obj["arrays"]["tokens"] == {"shape": [30, 7, 16], "dtype": "float16"}
    assert obj["failed"] == {"s30": "empty text"} and obj["spec"] == SPEC


def test_verify_exit_codes(cache: Path) -> None:
    p = cache / "demo" / "image" / "clip.h5"
    code, out = invoke("verify", str(cache))
    assert code == 0 and out.count(": ok (30 rows, 1 failed)") == 2, out
    code, out = invoke("verify", str(p), "--strict")
    assert code == 1 and "problem: 1 ids failed extraction" in out
    with h5py.File(p, "r+") as f:
        f["pooled"][5, :] = np.nan
    code, out = invoke("verify", str(p))
    assert code == 1 and "NaN/inf in 'pooled' ('s5')" in out


def test_rm(cache: Path) -> None:
    p = cache / "demo" / "image" / "clip.h5"
    listed = p.with_name("clip.failed.csv")
    listed.write_text("id,kind,reason\ns30,empty text,empty text\n")
    with FeatureStore(p, {**SPEC, "modality": "image"}, "demo"):
        code, out = invoke("rm", str(p))
        assert code != 0 and p.exists()  # a store being written is not removed
    code, out = invoke("rm", str(p))
    assert code == 0 and "removed" in out and not p.exists() and not Path(f"{p}.lock").exists()
    assert not listed.exists()  # the list of its failed ids goes with the store
    code, out = invoke("rm", str(p))
    assert code != 0
    code, out = invoke("ls", "--cache-dir", str(cache))
    assert "demo/image/clip.h5" not in out and "demo/text/clip.h5" in out


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from mmcache.cli import main

    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    for argv, want in ((["info", str(tmp_path / "none.h5")], "error: feature store"),
                       (["verify", str(tmp_path / "none.h5"), str(tmp_path)],
                        f"error: {tmp_path / 'none.h5'}: no such file or folder"),
                       (["info", str(bad)], f"error: {bad} is not a readable feature store")):
        monkeypatch.setattr("sys.argv", ["mmcache", "cache", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(want) and len(err.splitlines()) == 1, err
