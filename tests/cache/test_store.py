"""FeatureStore / StoreReader behaviour: round trips, resume, refusals, clear errors, verify."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mmcache.cache import FeatureStore, StoreReader, store_path, verify_store
from mmcache.cache.store import FORMAT, _layout
from mmcache.errors import MMCacheError

SPEC = {"preset": "toy", "family": "toy", "modality": "image", "model": "toy-net", "weights": "random"}


def rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "pooled": rng.standard_normal((n, 12)).astype(np.float32),
        "tokens": rng.standard_normal((n, 5, 8)).astype(np.float32),
        "mask": rng.random((n, 5)) > 0.3,
    }


def ids_(n: int, start: int = 0) -> list[str]:
    return [f"id{i}" for i in range(start, start + n)]


def write_manifest(cache: Path, ids: list[str], splits: list[str]) -> Path:
    m = cache / "toy" / "manifest.json"
    m.parent.mkdir(parents=True, exist_ok=True)
    samples = [{"id": i, "split": s, "labels": {"y": 0}} for i, s in zip(ids, splits, strict=True)]
    m.write_text(json.dumps({"name": "toy", "labels": {"tasks": {"y": ["a", "b"]}}, "samples": samples}))
    return m


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return store_path(tmp_path, "toy", "image", "toy")


def test_roundtrip_order_dtype_and_attrs(path: Path) -> None:
    data = rows(300)
    ids = ids_(300)
    with FeatureStore(path, SPEC, "toy", capacity=16) as st:  # small capacity: the file grows during the writes
        for b in range(0, 300, 32):
            st.write(ids[b:b + 32], {k: v[b:b + 32] for k, v in data.items()})
        st.fail("bad1", "cannot decode bad1.jpg")
        assert st.done == set(ids) | {"bad1"}
    r = StoreReader(path)
    assert r.ids == ids and r.failed == {"bad1": "cannot decode bad1.jpg"}
    assert r.shapes == {"pooled": (12,), "tokens": (5, 8), "mask": (5,)}
    assert r.dtypes["pooled"] == np.float16 and r.dtypes["mask"] == np.bool_
    assert r.spec == SPEC and r.attrs["dataset"] == "toy" and r.attrs["format"] == FORMAT
    assert len(r.attrs["spec_hash"]) == 16 and r.attrs["created"] and r.attrs["updated"]
    assert "torch" in r.attrs["versions"] or "numpy" in r.attrs["versions"]
    full = r.load()
    np.testing.assert_array_equal(full["pooled"], data["pooled"].astype(np.float16))
    # reversed, contiguous slice, sparse subset: each comes back aligned to the request
    for sel in (ids[::-1], ids[40:90], ids[::37], [ids[5], ids[5], ids[0]]):
        got = r.load(sel)
        idx = [int(i[2:]) for i in sel]
        np.testing.assert_array_equal(got["tokens"], data["tokens"][idx].astype(np.float16))
        np.testing.assert_array_equal(got["mask"], data["mask"][idx])
    assert set(r.load(ids[:3], keys=["mask"])) == {"mask"}


def test_float32_flag_and_float16_overflow(path: Path, tmp_path: Path) -> None:
    data = rows(4)
    with FeatureStore(path, SPEC, "toy", dtype="float32") as st:
        st.write(ids_(4), data)
    r = StoreReader(path)
    assert r.dtypes["pooled"] == np.float32
    np.testing.assert_array_equal(r.load()["pooled"], data["pooled"])
    with pytest.raises(MMCacheError, match="float16"):
        FeatureStore(path, SPEC, "toy")  # resuming with another dtype
    big = rows(2)
    big["pooled"][0, 0] = 1e6
    with FeatureStore(tmp_path / "b.h5", SPEC, "toy") as st:
        with pytest.raises(MMCacheError, match="float32"):
            st.write(ids_(2), big)
        with pytest.raises(MMCacheError, match="float32"):
            st.write(ids_(2), {k: torch.from_numpy(v) for k, v in big.items()})
        # torch tensors (as extractors return them) are cast and stored like numpy arrays
        st.write(ids_(4), {k: torch.from_numpy(v) for k, v in data.items()})
    np.testing.assert_array_equal(StoreReader(tmp_path / "b.h5").load()["tokens"], data["tokens"].astype(np.float16))


def test_resume_skips_committed_and_appends(path: Path) -> None:
    data = rows(20)
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(ids_(10), {k: v[:10] for k, v in data.items()})
        st.fail("id10", "missing file")
    with FeatureStore(path, SPEC, "toy") as st:
        assert st.done == set(ids_(11))
        with pytest.raises(MMCacheError, match="already committed"):
            st.write(["id3"], {k: v[:1] for k, v in data.items()})
        st.write(ids_(9, 11), {k: v[11:] for k, v in data.items()})
    r = StoreReader(path)
    assert r.ids == ids_(10) + ids_(9, 11)
    np.testing.assert_array_equal(r.load(["id19"])["pooled"][0], data["pooled"][19].astype(np.float16))
    with FeatureStore(path, SPEC, "toy") as st:
        # A failed id may be written later (a retry after fixing its file): the row replaces the record.
        assert st.failed == {"id10": "missing file"} and st.committed == set(ids_(10)) | set(ids_(9, 11))
        st.write(["id10"], {k: v[10:11] for k, v in data.items()})
        assert st.failed == {} and "id10" in st.committed
    r = StoreReader(path)
    assert r.failed == {} and r.load(["id10"])["mask"].shape == (1, 5)


def test_spec_mismatch_names_both_specs(path: Path) -> None:
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(ids_(2), rows(2))
    other = {**SPEC, "weights": "laion2b"}
    with pytest.raises(MMCacheError) as e:
        FeatureStore(path, other, "toy")
    msg = str(e.value)
    assert '"weights": "random"' in msg and '"weights": "laion2b"' in msg and "cache rm" in msg
    assert StoreReader(path).ids == ids_(2)  # the refused writer changed nothing


def test_a_store_of_another_dataset_is_not_resumed(path: Path) -> None:
    """A store copied in from another dataset's cache: resuming would take its ids as done; it is refused."""
    with FeatureStore(path, SPEC, "other") as st:
        st.write(ids_(2), rows(2))
    with pytest.raises(MMCacheError, match=r"holds rows of dataset 'other', not 'toy'.*cache rm"):
        FeatureStore(path, SPEC, "toy")
    assert StoreReader(path).ids == ids_(2)
    with FeatureStore(path, SPEC, "other") as st:  # its own dataset resumes as before
        st.write(ids_(1, 2), rows(1))
    assert StoreReader(path).ids == ids_(3)


def test_second_writer_refused_readers_never_block(path: Path) -> None:
    data = rows(8)
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(ids_(4), {k: v[:4] for k, v in data.items()})
        with pytest.raises(MMCacheError, match="another process"):
            FeatureStore(path, SPEC, "toy")
        assert StoreReader(path).ids == ids_(4)  # a reader opens while the writer holds the lock
        st.write(ids_(4, 4), {k: v[4:] for k, v in data.items()})
        assert len(StoreReader(path)) == 8  # and sees each commit at once
    with FeatureStore(path, SPEC, "toy") as st:  # the lock is released on close
        assert len(st.done) == 8


def test_batch_mismatch_refused(path: Path) -> None:
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(ids_(2), rows(2))
        bad = rows(2)
        bad["tokens"] = bad["tokens"][:, :3]
        with pytest.raises(MMCacheError, match="do not match"):
            st.write(ids_(2, 2), bad)
        with pytest.raises(MMCacheError, match="duplicate"):
            st.write(["x", "x"], rows(2))
        with pytest.raises(MMCacheError, match="rows for"):
            st.write(["y"], rows(2))


def test_missing_ids_clear_error(path: Path) -> None:
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(ids_(3), rows(3))
        st.fail("gone", "corrupt jpeg")
    r = StoreReader(path)
    with pytest.raises(MMCacheError, match=r"2 of 3 requested ids.*'nope'.*corrupt jpeg"):
        r.load(["id0", "nope", "gone"])
    with pytest.raises(MMCacheError, match="not found"):
        StoreReader(path.with_name("absent.h5"))


def test_load_split_via_manifest(path: Path, tmp_path: Path) -> None:
    data = rows(6)
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(ids_(6), data)
    write_manifest(tmp_path, ["id5", "id1", "id2", "id0", "id3", "id4"],
                   ["test", "train", "train", "test", "val", "val"])
    r = StoreReader(path)
    got = r.load(split="test")
    np.testing.assert_array_equal(got["pooled"], data["pooled"][[5, 0]].astype(np.float16))
    with pytest.raises(MMCacheError, match="no split 'dev'"):
        r.load(split="dev")


@pytest.mark.parametrize("damage", ["garbage", "truncate", "foreign"])
def test_corrupt_file_message(path: Path, damage: str) -> None:
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(ids_(50), rows(50))
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        path.unlink()
        with h5py.File(path, "w") as f:
            f["pooled"] = np.zeros((3, 4))
    with pytest.raises(MMCacheError) as e:
        StoreReader(path)
    assert str(path) in str(e.value) and "cache rm" in str(e.value)
    with pytest.raises(MMCacheError, match="cache rm"):
        FeatureStore(path, SPEC, "toy")


def test_batch_writes_touch_no_hdf5_structure(path: Path) -> None:
    """After the file is built, a batch changes only its own row bytes and the counters."""
    data = rows(8)
    with FeatureStore(path, SPEC, "toy", capacity=8) as st:
        st.write(ids_(4), {k: v[:4] for k, v in data.items()})
        before = path.read_bytes()
        st.write(ids_(4, 4), {k: v[4:] for k, v in data.items()})
        after = path.read_bytes()
    with h5py.File(path, "r") as f:
        lay = _layout(f)
    allowed = np.zeros(len(after), dtype=bool)
    for k, a in lay.items():
        lo, hi = (a.offset, a.offset + 32) if k == "_state" else (a.offset + 4 * a.row_bytes,
                                                                   a.offset + 8 * a.row_bytes)
        allowed[lo:hi] = True
    diff = np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))
    assert len(before) == len(after) and len(diff) > 0
    assert allowed[diff].all(), "a batch write changed bytes outside its rows and the counters"


def test_verify_catches_nan_duplicates_and_manifest_drift(path: Path, tmp_path: Path) -> None:
    data = rows(10)
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(ids_(10), data)
        st.fail("id10", "truncated jpeg")
    write_manifest(tmp_path, ids_(11), ["train"] * 11)
    rep = verify_store(path)
    assert rep.ok and rep.rows == 10 and any("1 ids failed" in w for w in rep.warnings)
    assert not verify_store(path, strict=True).ok
    # a NaN row and a duplicated id, forged behind the writer's back
    with h5py.File(path, "r+") as f:
        f["pooled"][3, 0] = np.nan
        f["tokens"][4, 1, 1] = np.inf
        f["ids"][7] = b"id2"
    rep = verify_store(path)
    text = " | ".join(rep.problems)
    assert "NaN/inf in 'pooled' ('id3')" in text and "NaN/inf in 'tokens' ('id4')" in text
    assert "1 duplicate ids ('id2')" in text
    assert "manifest ids are neither stored nor failed ('id7')" in text
    # rows of ids the dataset no longer has
    write_manifest(tmp_path, ids_(5), ["train"] * 5)
    assert any("not in manifest" in p for p in verify_store(path).problems)


def test_verify_all_zero_rows_and_unreadable(path: Path, tmp_path: Path) -> None:
    data = rows(4)
    data["pooled"][2] = 0
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(ids_(4), data)
    assert any("all-zero `pooled` rows ('id2')" in p for p in verify_store(path).problems)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"nope")
    rep = verify_store(junk)
    assert not rep.ok and "junk.h5" in rep.problems[0]


def test_verify_accepts_teacher_stores_and_refuses_featureless(tmp_path: Path) -> None:
    teacher = store_path(tmp_path, "toy", "teacher", "nli")
    with FeatureStore(teacher, {**SPEC, "modality": "teacher"}, "toy") as st:
        st.write(ids_(3), {"logits": np.arange(9, dtype=np.float32).reshape(3, 3)})
    rep = verify_store(teacher)
    assert rep.ok and rep.rows == 3, rep.problems
    bare = store_path(tmp_path, "toy", "image", "bare")
    with FeatureStore(bare, SPEC, "toy") as st:
        st.write(ids_(2), {"tokens": np.ones((2, 3, 4), dtype=np.float32)})
    assert any("no `pooled` (or teacher `logits`)" in p for p in verify_store(bare).problems)


def _manifest_ok(path: Path, tmp_path: Path, ids: list[str]) -> None:
    write_manifest(tmp_path, ids, ["train"] * len(ids))
    rep = verify_store(path)
    assert rep.ok, rep.problems


def test_failure_record_kept_until_its_row_is_written(path: Path, tmp_path: Path) -> None:
    data = rows(6)
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(ids_(2), {k: v[:2] for k, v in data.items()})
        for i in range(2, 6):
            st.fail(f"id{i}", f"cannot decode /data/id{i}.jpg")
    assert StoreReader(path).failed_slots == 4
    # A retry: id2 is fixed and written, id3 fails with another reason, id4 the same; id5 is not retried.
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(["id2"], {k: v[2:3] for k, v in data.items()})
        st.fail("id3", "image file /data/id3.jpg is empty (0 bytes)")
        st.fail("id4", "cannot decode /data/id4.jpg")
        assert st.failed == {"id3": "image file /data/id3.jpg is empty (0 bytes)",
                             "id4": "cannot decode /data/id4.jpg", "id5": "cannot decode /data/id5.jpg"}
        with pytest.raises(MMCacheError, match="already committed"):
            st.fail("id2", "again")
    r = StoreReader(path)
    assert r.ids == ids_(3) and r.failed == {"id3": "image file /data/id3.jpg is empty (0 bytes)",
                                             "id4": "cannot decode /data/id4.jpg",
                                             "id5": "cannot decode /data/id5.jpg"}
    assert r.failed_slots == 5  # the new reason was appended; the unchanged one wrote nothing
    _manifest_ok(path, tmp_path, ids_(6))
    # A rebuild (growth) keeps only the live records.
    with FeatureStore(path, SPEC, "toy", capacity=4096) as st:
        assert st.failed == r.failed
    r2 = StoreReader(path)
    assert r2.failed == r.failed and r2.failed_slots == 3 and r2.ids == r.ids


def test_retry_killed_at_any_store_write_loses_no_record(path: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut a retry pass at each of its store I/O steps (half-written bytes included): every id stays either
    committed or recorded as failed, and a rerun completes it."""
    import shutil

    import mmcache.cache.store as store_mod

    data = rows(8)
    everything = ids_(8)
    with FeatureStore(path, SPEC, "toy", capacity=8) as st:  # full: the retry has to grow the file
        st.write(ids_(4), {k: v[:4] for k, v in data.items()})
        for i in range(4, 8):
            st.fail(f"id{i}", "missing file")
    pristine = tmp_path / "pristine.h5"
    shutil.copy(path, pristine)

    def retry() -> None:
        with FeatureStore(path, SPEC, "toy") as st:
            st.write(["id4", "id5"], {k: v[4:6] for k, v in data.items()})
            st.fail("id6", "corrupt jpeg")
            st.fail("id7", "missing file")

    class Killed(Exception):
        pass

    pwrite = store_mod._pwrite
    steps = [0]

    def counting(fd: int, buf: np.ndarray, offset: int) -> None:
        steps[0] += 1
        pwrite(fd, buf, offset)

    monkeypatch.setattr(store_mod, "_pwrite", counting)
    retry()
    n_steps = steps[0]
    assert n_steps > 5
    want_failed = {"id6": "corrupt jpeg", "id7": "missing file"}
    assert StoreReader(path).failed == want_failed
    for k in range(1, n_steps + 1):
        shutil.copy(pristine, path)
        seen = [0]

        def cut(fd: int, buf: np.ndarray, offset: int, _k: int = k, seen: list[int] = seen) -> None:
            seen[0] += 1
            if seen[0] == _k:
                raw = np.ascontiguousarray(buf).view(np.uint8).reshape(-1)
                pwrite(fd, raw[: max(1, len(raw) // 2)], offset)
                raise Killed
            pwrite(fd, buf, offset)

        monkeypatch.setattr(store_mod, "_pwrite", cut)
        with pytest.raises(Killed):
            retry()
        monkeypatch.setattr(store_mod, "_pwrite", pwrite)
        r = StoreReader(path)
        assert set(r.ids) | set(r.failed) == set(everything), f"step {k}: a record was lost"
        assert not set(r.ids) & set(r.failed) and len(r.ids) == len(set(r.ids))
        _manifest_ok(path, tmp_path, everything)
        # Rerun: what the killed pass did not do is done now.
        with FeatureStore(path, SPEC, "toy") as st:
            todo = [i for i in ("id4", "id5") if i not in st.committed]
            st.write(todo, {kk: v[[int(i[2:]) for i in todo]] for kk, v in data.items()})
            st.fail("id6", "corrupt jpeg")
            st.fail("id7", "missing file")
        r = StoreReader(path)
        assert sorted(r.ids) == ids_(6) and r.failed == want_failed
        np.testing.assert_array_equal(r.load(ids_(6))["pooled"], data["pooled"][:6].astype(np.float16))


@pytest.mark.parametrize("sid", ["a\x00", "a\x00b", "\x00", "x\udcffy", "\ud800", "é" * 600])
def test_ids_that_cannot_round_trip_are_refused(path: Path, sid: str) -> None:
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(["ok"], rows(1))
        with pytest.raises(MMCacheError) as e:
            st.write(["fine", sid], rows(2))
        assert repr(sid)[:40] in str(e.value) and str(path) in str(e.value)
        with pytest.raises(MMCacheError):
            st.fail(sid, "corrupt")
    r = StoreReader(path)
    assert r.ids == ["ok"] and r.failed == {}


def test_unusual_ids_round_trip_exactly(path: Path) -> None:
    odd = ["a ", " a", "tab\tid", "new\nline", "é", "日本語", "😀", "a" * 1024, "ε" * 512, "0", "a/b\\c"]
    data = rows(len(odd))
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(odd[:5], {k: v[:5] for k, v in data.items()})
        st.fail(odd[5], "corrupt")
    with FeatureStore(path, SPEC, "toy") as st:
        assert st.committed == set(odd[:5]) and st.failed == {odd[5]: "corrupt"}
        st.write(odd[5:], {k: v[5:] for k, v in data.items()})  # the failed one is written now
    r = StoreReader(path)
    assert r.ids == odd and r.failed == {}
    np.testing.assert_array_equal(r.load(odd[::-1])["pooled"], data["pooled"][::-1].astype(np.float16))


def test_reasons_are_kept_whatever_their_text(path: Path) -> None:
    long = "décodage impossible " * 40  # over the reason size, cut inside a 2-byte character
    with FeatureStore(path, SPEC, "toy") as st:
        st.fail("a", "file /data/\udcff.jpg not found")  # an undecodable file name
        st.fail("b", long)
        st.fail("b", long)  # the same reason again writes nothing
        st.fail("c", "bad\x00byte")
    r = StoreReader(path)
    assert r.failed["a"] == "file /data/\\udcff.jpg not found"
    assert long.startswith(r.failed["b"]) and len(r.failed["b"].encode()) <= 512 and "\ufffd" not in r.failed["b"]
    assert r.failed["c"] == "bad\\x00byte"
    assert r.failed_slots == 3


def test_verify_groups_failures_by_the_listed_kind(path: Path, tmp_path: Path) -> None:
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(ids_(2), rows(2))
        for i in range(2, 5):
            st.fail(f"id{i}", f"cannot decode /data/id{i}.jpg")
    write_manifest(tmp_path, ids_(5), ["train"] * 5)
    rep = verify_store(path)
    assert rep.ok and "1x cannot decode /data/id2.jpg" in rep.warnings[0]
    # The list extraction writes next to the store gives each failure its kind; a stale line is ignored.
    listed = path.with_name("toy.failed.csv")
    listed.write_text("id,kind,reason\n" + "".join(f"id{i},cannot decode <image>,cannot decode /data/id{i}.jpg\n"
                                                     for i in (2, 3)) + "id4,old kind,an older reason\n")
    rep = verify_store(path)
    assert rep.ok and "2x cannot decode <image>; 1x cannot decode /data/id4.jpg" in rep.warnings[0]
    assert str(listed) in rep.warnings[0]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_memmap_equals_the_hdf5_read_and_writes_never_reach_the_file(path: Path, dtype: str) -> None:
    data = rows(300, seed=3)
    with FeatureStore(path, SPEC, "toy", capacity=16, dtype=dtype) as st:  # grows: the arrays move in the file
        for b in range(0, 300, 64):
            st.write(ids_(64, b)[: 300 - b], {k: v[b:b + 64] for k, v in data.items()})
        st.fail("bad", "cannot decode")
    r = StoreReader(path)
    with h5py.File(path, "r", locking=False) as f:  # what HDF5 itself reads for the committed rows
        want = {k: f[k][:300] for k in r.keys}
    for k in r.keys:
        for populate in (False, True):
            mm = r.memmap(k, populate=populate)
            assert mm.dtype == want[k].dtype and mm.shape == want[k].shape
            np.testing.assert_array_equal(mm, want[k])
        np.testing.assert_array_equal(r.memmap(k, (17, 251), populate=True), want[k][17:251])
        assert r.memmap(k, (40, 40)).shape == (0, *r.shapes[k])
    assert not r.memmap("pooled").flags.writeable  # read-only unless asked
    mm = r.memmap("pooled", populate=True, copy_on_write=True)
    mm[:5] = 7  # copy-on-write: this process's copy changes, the file does not
    assert (mm[:5] == 7).all()
    np.testing.assert_array_equal(StoreReader(path).load()["pooled"], want["pooled"])
    with pytest.raises(ValueError, match="outside"):
        r.memmap("pooled", (0, 301))
    with pytest.raises(MMCacheError, match="no array"):
        r.memmap("nope")


def _resident(path: Path, offset: int, length: int) -> np.ndarray:
    """Per page of bytes offset..offset+length of `path`: whether it is in the page cache (mincore)."""
    import ctypes
    import mmap

    start = offset - offset % mmap.PAGESIZE
    size = offset + length - start
    with open(path, "rb") as fh:
        m = mmap.mmap(fh.fileno(), size, offset=start, access=mmap.ACCESS_COPY)
    buf = (ctypes.c_char * size).from_buffer(m)
    vec = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        assert libc.mincore(ctypes.addressof(buf), size, vec) == 0, os.strerror(ctypes.get_errno())
        return np.frombuffer(vec, dtype=np.uint8).copy() & 1
    finally:
        del buf
        m.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and the page cache advice are Linux's")
def test_read_ahead_brings_the_rows_asked_into_the_page_cache(path: Path) -> None:
    import mmap

    n, lo, hi = 8192, 4096, 6144  # 8 MB of float16 rows
    x = np.random.default_rng(0).standard_normal((n, 512)).astype(np.float32)
    with FeatureStore(path, SPEC, "toy", capacity=n) as st:
        st.write(ids_(n), {"pooled": x})
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    r = StoreReader(path)
    with h5py.File(path, "r", locking=False) as f:
        where = _layout(f)["pooled"]
    a, rb = where.offset, where.row_bytes
    # Rows lo/2..lo, a page in from each end: the reads that open the store may make the kernel read ahead a
    # megabyte or so past them, into the first rows.
    before = (a + lo // 2 * rb + mmap.PAGESIZE, lo // 2 * rb - 2 * mmap.PAGESIZE)
    dropped = not _resident(path, *before).any()  # a file system that keeps every page (tmpfs) cannot tell
    r.read_ahead(["pooled"], (lo, hi))
    deadline = time.monotonic() + 10
    while not _resident(path, a + lo * rb, (hi - lo) * rb).all() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _resident(path, a + lo * rb, (hi - lo) * rb).all()
    if dropped:  # rows before lo were not asked for
        assert not _resident(path, *before).any()
    np.testing.assert_array_equal(r.memmap("pooled"), x.astype(np.float16))  # the store's dtype
    r.read_ahead(["pooled"])  # every committed row; nothing where there are none
    r.read_ahead(["pooled"], (7, 7))
    r.read_ahead(["pooled"], np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        r.read_ahead(["pooled"], np.array([3, n]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and the page cache advice are Linux's")
def test_read_ahead_reads_ranges_longer_than_the_readahead_window_and_scattered_rows(path: Path) -> None:
    n = 12_288  # 24 MB of float16 rows: one advice reads at most the device's readahead window (8 MB on some)
    x = np.random.default_rng(0).standard_normal((n, 1024)).astype(np.float32)
    with FeatureStore(path, SPEC, "toy", capacity=n) as st:
        st.write(ids_(n), {"pooled": x})
    r = StoreReader(path)
    a = r._layout["pooled"]
    rb = a.row_bytes

    def drop() -> bool:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return not _resident(path, a.offset + 8 * rb, (n - 16) * rb).any()

    def wait(offset: int, length: int) -> np.ndarray:
        deadline = time.monotonic() + 10
        while (res := _resident(path, offset, length)).mean() < 0.99 and time.monotonic() < deadline:
            time.sleep(0.02)
        return res

    if not drop():
        pytest.skip("this file system keeps every page cached (tmpfs)")
    r.read_ahead(["pooled"], (1000, n))  # 22 MB in one call
    # The advice is a hint: a busy system may skip a page or two (its allocations do not wait), never most of them.
    res = wait(a.offset + 1000 * rb, (n - 1000) * rb)
    assert res.mean() > 0.9 and res[-len(res) // 3:].mean() > 0.9  # far past the first readahead window too
    drop()
    scattered = np.array([9000, 17, 4096, 17, 12_000, 4097])  # any order, repeats; neighbours merged
    assert r._spans(["pooled"], scattered) == [(a.offset + k * rb, a.offset + (k + m) * rb)
                                               for k, m in ((17, 1), (4096, 2), (9000, 1), (12_000, 1))]
    r.read_ahead(["pooled"], scattered)
    assert sum(wait(a.offset + k * rb, rb).all() for k in set(scattered.tolist())) >= 4  # of 5
    assert not _resident(path, a.offset + 6000 * rb, 1000 * rb).any()  # rows not asked for


def test_a_mapped_store_keeps_its_rows_when_the_file_is_replaced_or_removed(path: Path) -> None:
    data = rows(50)
    with FeatureStore(path, SPEC, "toy", capacity=50) as st:
        st.write(ids_(50), data)
    mm = StoreReader(path).memmap("pooled", populate=True)
    with FeatureStore(path, SPEC, "toy", capacity=400) as st:  # a rebuild: a new file renamed over the old one
        st.write(ids_(10, 50), rows(10, seed=1))
    np.testing.assert_array_equal(mm, data["pooled"].astype(np.float16))
    path.unlink()
    np.testing.assert_array_equal(mm, data["pooled"].astype(np.float16))


def test_load_rows_reads_rows_in_the_order_asked(path: Path) -> None:
    data = rows(80)
    with FeatureStore(path, SPEC, "toy", capacity=80) as st:
        st.write(ids_(80), data)
    r = StoreReader(path)
    order = np.array([79, 0, 5, 5, 40])
    got = r.load_rows(order, ["pooled", "mask"])
    np.testing.assert_array_equal(got["pooled"], data["pooled"][order].astype(np.float16))
    np.testing.assert_array_equal(got["mask"], data["mask"][order])
