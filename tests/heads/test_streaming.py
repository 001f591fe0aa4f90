"""Features read where they lie (`--load stream`), kept in the stored dtype, and the memory they may take."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcache import memory
from mmcache.cache.store import FeatureStore, StoreReader, store_path
from mmcache.errors import MMCacheError
from mmcache.heads.data import StreamedRows, load_cached, prefetch
from mmcache.heads.train import TrainConfig, train_many
from tests.heads.conftest import build_cache, run_heads

MODS = {"image": "feat", "text": "feat"}


def _cfg(cache: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(dataset="toy", modalities=MODS, cache_dir=str(cache), epochs=3, batch_size=32,
                                   device="cpu", quiet=True, save=False)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_rows_keep_the_stored_dtype_and_streamed_rows_equal_loaded_ones(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_cache(cache, n=120, tokens=True, fail_ids=("r0005",))
    mem = load_cached("toy", MODS, cache, quiet=True, load="memory")
    st = load_cached("toy", MODS, cache, quiet=True, load="stream")
    assert mem.load == "memory" and st.load == "stream" and mem.ids == st.ids and len(mem.ids) == 119
    for m in MODS:
        for k in ("pooled", "tokens", "mask"):
            t, s = mem.features[m][k], st.features[m][k]
            assert isinstance(t, torch.Tensor) and isinstance(s, StreamedRows)
            assert t.dtype == s.dtype and tuple(t.shape) == tuple(s.shape)
        assert mem.features[m]["pooled"].dtype == torch.float16  # float16 stays float16 in memory
    idx = torch.tensor([7, 0, 118, 7, 42])
    a, b = mem.batch(idx), st.batch(idx)
    for m in MODS:
        for k in a[m]:
            assert torch.equal(a[m][k], b[m][k]), (m, k)
        assert a[m]["pooled"].dtype == torch.float32  # cast per batch
    # The rows are the stores' rows for those ids (the image store lacks r0005: positions are not store rows).
    r = StoreReader(store_path(cache, "toy", "image", "feat"))
    want = r.load([st.ids[i] for i in idx.tolist()], keys=["pooled"])["pooled"].astype(np.float32)
    np.testing.assert_array_equal(b["image"]["pooled"].numpy(), want)
    assert torch.equal(st.features["text"]["pooled"][3], mem.features["text"]["pooled"][3])


def test_a_store_in_another_order_than_the_manifest_streams_by_id(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_cache(cache, n=60)
    src = StoreReader(store_path(cache, "toy", "text", "feat"))
    rows = src.load(keys=["pooled"])["pooled"]
    path = store_path(cache, "toy", "text", "rev")
    with FeatureStore(path, {"preset": "rev"}, "toy", capacity=60) as w:
        w.write(src.ids[::-1], {"pooled": rows[::-1]})
    mem = load_cached("toy", {"text": "rev"}, cache, quiet=True, load="memory")
    st = load_cached("toy", {"text": "rev"}, cache, quiet=True, load="stream")
    idx = torch.arange(60)
    assert torch.equal(mem.batch(idx)["text"]["pooled"], st.batch(idx)["text"]["pooled"])
    np.testing.assert_array_equal(st.batch(idx)["text"]["pooled"].numpy(), rows.astype(np.float32))


def test_sweep_groups_stacked_probes_and_lbfgs_give_the_same_runs_streamed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_cache(cache, n=200, tokens=True)
    cfgs = [_cfg(cache, head="linear", lr=lr, seed=seed) for lr in (1e-2, 1e-3) for seed in (0, 1)]  # stacked
    cfgs += [_cfg(cache, head="gated", head_hparams={"D": 8}, seed=1),  # the lockstep loop, two batch orders
             _cfg(cache, head="xattn", head_hparams={"D": 8, "heads": 2}, seed=0),
             _cfg(cache, head="linear", solver="lbfgs", lbfgs_grid=[1e-2, 1e-3])]
    runs = {}
    for load in ("memory", "stream"):
        res = train_many([TrainConfig(**{**c.to_json(), "load": load}) for c in cfgs])
        assert all(not isinstance(r, Exception) for r in res), res
        runs[load] = res
    for a, b in zip(runs["memory"], runs["stream"], strict=True):
        assert a.metrics == b.metrics and a.best_epoch == b.best_epoch  # type: ignore[union-attr]
        for va, vb in zip(a.head.state_dict().values(), b.head.state_dict().values(), strict=True):  # type: ignore[union-attr]
            assert torch.equal(va, vb)


def test_load_memory_on_data_that_cannot_fit_is_one_line_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    build_cache(cache, n=100)
    need = 100 * (24 + 16) * 2  # float16 rows of both stores
    monkeypatch.setattr(memory, "available_bytes", lambda: need - 1)
    read = []
    monkeypatch.setattr(StoreReader, "load", lambda *a, **k: read.append(a) or {})  # nothing is read
    monkeypatch.setattr(StoreReader, "read_ahead", lambda *a, **k: read.append(a))  # nor read ahead
    rc = run_heads(["train", "--dataset", "toy", "--vtype", "feat", "--ttype", "feat", "--cache-dir", str(cache),
                    "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", "--load", "memory"], monkeypatch)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "--load memory" in lines[0] and "--load stream" in lines[0] and "available" in lines[0]
    assert f"{need / 1e9:.2f} GB" in lines[0]
    assert not read and not [f for f in (tmp_path / "runs").rglob("*") if f.is_file()]
    # auto streams the same data instead, and trains
    monkeypatch.undo()
    monkeypatch.setattr(memory, "available_bytes", lambda: need)  # fits, but not with room to spare
    ahead: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(StoreReader, "read_ahead", lambda self, keys, rows=None: ahead.append((self.path.parent.name,
                                                                                               list(keys))))
    data = load_cached("toy", MODS, cache, quiet=True)
    assert data.load == "stream" and not ahead  # a store that may not fit is never read ahead whole
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * need)
    assert load_cached("toy", MODS, cache, quiet=True, keys=["pooled"]).load == "memory"
    assert ahead == [("image", ["pooled"]), ("text", ["pooled"])]  # the disk starts before the manifest is read
    assert load_cached("toy", MODS, cache, quiet=True, load="stream").load == "stream" and len(ahead) == 2


def test_streamed_rows_larger_than_memory_are_read_ahead_per_batch_and_train_as_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    build_cache(cache, n=100)
    need = 100 * (24 + 16) * 2
    cfg = _cfg(cache, head="gated", head_hparams={"D": 8}, batch_size=16)
    want = train_many([TrainConfig(**{**cfg.to_json(), "load": "memory"})])[0]
    asked: list[int] = []
    real = StreamedRows.read_ahead
    monkeypatch.setattr(StreamedRows, "read_ahead", lambda self, idx: asked.append(len(idx)) or real(self, idx))
    data = load_cached("toy", MODS, cache, quiet=True, load="stream")  # fits: left to the kernel's readahead
    assert data.streamed and not any(v.random for d in data.features.values() for v in d.values())
    data.read_ahead(torch.arange(5))
    assert not asked
    monkeypatch.setattr(memory, "available_bytes", lambda: need * 3 // 2)  # would fit, but not with room to spare
    data = load_cached("toy", MODS, cache, quiet=True, load="stream")
    assert all(v.random for d in data.features.values() for v in d.values())
    monkeypatch.setattr(memory, "available_bytes", lambda: need - 1)  # more rows than this process may keep
    data = load_cached("toy", MODS, cache, quiet=True)
    assert data.streamed and all(v.random for d in data.features.values() for v in d.values())
    got = train_many([cfg])[0]
    assert not isinstance(got, Exception) and not isinstance(want, Exception)
    assert got.config["resolved"]["load"] == "stream"
    # every batch of each epoch, validation and test read ahead, one call per streamed array
    assert len(asked) >= 2 * 3 * (80 // 16) and set(asked) <= {16, *range(1, 81)}
    assert got.metrics == want.metrics and got.best_epoch == want.best_epoch
    for va, vb in zip(got.head.state_dict().values(), want.head.state_dict().values(), strict=True):
        assert torch.equal(va, vb)


def test_choose_load_modes() -> None:
    assert memory.choose_load("stream", 10, "x", available=1) == "stream"
    assert memory.choose_load("memory", 10, "x", available=10) == "memory"
    assert memory.choose_load("auto", 50, "x", available=100) == "memory"
    assert memory.choose_load("auto", 51, "x", available=100) == "stream"
    with pytest.raises(MMCacheError, match=r"--load memory: x need .* only .* available .*--load stream"):
        memory.choose_load("memory", 11, "x", available=10)
    with pytest.raises(MMCacheError, match="not a loading mode"):
        memory.choose_load("disk", 1, "x", available=10)


def _fake_cgroup(root: Path, v2: bool, limit: int, usage: int, inactive: int, parent_limit: int | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    proc = root / "proc_cgroup"
    if v2:
        base = root / "sys"
        (base / "cgroup.controllers").parent.mkdir(parents=True)
        (base / "cgroup.controllers").write_text("cpu memory\n")
        leaf = base / "box" / "job"
        files = ("memory.max", "memory.current", "inactive_file")
        proc.write_text("0::/box/job\n")
    else:
        base = root / "sys"
        leaf = base / "memory" / "box" / "job"
        files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        proc.write_text("4:memory:/box/job\n3:cpu:/\n")
    leaf.mkdir(parents=True)
    (leaf / files[0]).write_text(f"{limit}\n")
    (leaf / files[1]).write_text(f"{usage}\n")
    (leaf / "memory.stat").write_text(f"anon 1\n{files[2]} {inactive}\nfile 3\n")
    if parent_limit is not None:
        (leaf.parent / files[0]).write_text(f"{parent_limit}\n")
        (leaf.parent / files[1]).write_text("0\n")
    root_limit = base / ("memory" if not v2 else "") / files[0]
    root_limit.write_text("max\n" if v2 else "9223372036854771712\n")
    return proc


@pytest.mark.parametrize("v2", [False, True], ids=["cgroup-v1", "cgroup-v2"])
def test_container_limits_are_read_at_every_level(tmp_path: Path, v2: bool) -> None:
    proc = _fake_cgroup(tmp_path, v2, limit=1000, usage=700, inactive=200, parent_limit=None)
    assert memory.cgroup_available(proc, tmp_path / "sys") == 1000 - (700 - 200)
    proc = _fake_cgroup(tmp_path / "p", v2, limit=1000, usage=100, inactive=0, parent_limit=300)
    assert memory.cgroup_available(proc, tmp_path / "p" / "sys") == 300  # the parent's limit is smaller
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "cg").write_text("0::/\n")
    assert memory.cgroup_available(tmp_path / "none" / "cg", tmp_path / "none") is None


def _memory_cgroup_root() -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    return root if os.geteuid() == 0 and (root / "cgroup.procs").exists() else None


@pytest.mark.skipif(_memory_cgroup_root() is None, reason="needs root and a cgroup v1 memory controller")
def test_a_real_container_limit_bounds_the_available_memory(tmp_path: Path) -> None:
    root = _memory_cgroup_root()
    assert root is not None
    group = root / f"mmcache-test-{uuid.uuid4().hex[:8]}"
    limit = 768 << 20
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        code = ("import os, sys; open(sys.argv[1], 'w').write(str(os.getpid()));"
                "from mmcache.memory import available_bytes; print(available_bytes())")
        # The child moves itself into the group before measuring (through a shell, so the write happens first).
        out = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1" "$2"', sys.executable,
                              code, str(tmp_path / "pid")], capture_output=True, text=True, timeout=120, check=True)
        assert 0 < int(out.stdout.strip()) <= limit
    finally:
        if group.exists():
            group.rmdir()


def test_prefetch_keeps_order_passes_errors_and_stops_early() -> None:
    assert list(prefetch(lambda x: x * 2, range(10))) == [2 * i for i in range(10)]
    assert list(prefetch(lambda x: x, [], enabled=True)) == []

    def boom(x: int) -> int:
        if x == 3:
            raise MMCacheError("bad row 3")
        return x

    got = []
    with pytest.raises(MMCacheError, match="bad row 3"):
        for v in prefetch(boom, range(6)):
            got.append(v)
    assert got == [0, 1, 2]
    it = prefetch(lambda x: x, range(100))
    assert next(it) == 0
    it.close()  # leaving early cancels the reads ahead


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_non_finite_rows_are_found_by_their_exponent_bits(dtype: torch.dtype) -> None:
    from mmcache.heads.data import _non_finite_rows

    t = torch.randn(70_000, 3, 5).to(dtype)  # more rows than one block
    t[5, 1, 2], t[100, 2, 4], t[69_999, 0, 0] = float("nan"), float("inf"), float("-inf")
    t[7] = 60_000.0  # large but finite
    t[8] = torch.finfo(dtype).tiny / 2 if dtype != torch.bfloat16 else 0.0  # subnormal: finite
    assert _non_finite_rows(t).nonzero().flatten().tolist() == [5, 100, 69_999]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_rows_in_memory_are_the_stores_rows_as_hdf5_reads_them(tmp_path: Path, dtype: str,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import h5py

    from mmcache.data.base import Dataset, LabelSpace, Sample

    cache = tmp_path / "cache"
    n = 90
    samples = [Sample(id=f"r{i:03d}", split=("train", "val", "test")[i % 3], labels={"label": i % 2}) for i in range(n)]
    Dataset(name="t", samples=samples, labels=LabelSpace(tasks={"label": ["a", "b"]}), root=cache
            ).write_manifest(cache / "t" / "manifest.json")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    x[[4, 50]] = np.nan
    x[61, 2] = np.inf
    ids = [s.id for s in samples]
    with FeatureStore(store_path(cache, "t", "image", "f"), {"preset": "p"}, "t", capacity=n, dtype=dtype) as st:
        st.write(ids, {"pooled": x})  # in manifest order: rows 0-88 are a run of the store, mapped
    with FeatureStore(store_path(cache, "t", "text", "f"), {"preset": "q"}, "t", capacity=n, dtype=dtype) as st:
        keep = list(range(n - 1))[::-1]  # another order, the last row failed: gathered into new arrays
        st.write([ids[i] for i in keep], {"pooled": x[keep] * 2})
        st.fail(ids[-1], "cannot decode")
    capsys.readouterr()
    gathered, mapped = [], []
    load_rows, memmap = StoreReader.load_rows, StoreReader.memmap
    monkeypatch.setattr(StoreReader, "load_rows",
                        lambda self, *a: gathered.append(self.path.parent.name) or load_rows(self, *a))
    monkeypatch.setattr(StoreReader, "memmap",
                        lambda self, *a, **k: mapped.append(self.path.parent.name) or memmap(self, *a, **k))
    mem = load_cached("t", {"image": "f", "text": "f"}, cache, quiet=True, load="memory")
    monkeypatch.undo()
    assert gathered == ["text"] and mapped == ["image"]
    err = capsys.readouterr().err
    assert len(mem.ids) == n - 1
    assert "3 rows of" in err and "hold NaN or inf in 'pooled' (e.g. 'r004', 'r050', 'r061')" in err
    for mod, scale in (("image", 1), ("text", 2)):
        path = store_path(cache, "t", mod, "f")
        with h5py.File(path, "r", locking=False) as f:
            stored = f["pooled"][:len(StoreReader(path))]
        r = StoreReader(path)
        want = stored[r.rows(mem.ids)]
        got = mem.features[mod]["pooled"]
        assert got.dtype == (torch.float16 if dtype == "float16" else torch.float32)
        np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_array_equal(got.numpy(), (x[[int(i[1:]) for i in mem.ids]] * scale).astype(dtype))
    # a float32 copy on request, and a write to a row stays in this process
    wide = load_cached("t", {"image": "f"}, cache, quiet=True, load="memory", dtype=torch.float32)
    assert wide.features["image"]["pooled"].dtype == torch.float32
    mem.features["image"]["pooled"][0] = 0
    again = load_cached("t", {"image": "f"}, cache, quiet=True, load="memory")
    np.testing.assert_array_equal(again.features["image"]["pooled"][0].numpy(), x[0].astype(dtype))


def test_streamed_rows_gather_what_numpy_indexing_gives(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    data = np.random.default_rng(1).normal(size=(40, 3, 4)).astype(np.float16)
    with FeatureStore(path, {"preset": "p"}, "t", capacity=40) as st:
        st.write([f"i{k}" for k in range(40)], {"tokens": data})
    r = StoreReader(path)
    order = np.random.default_rng(2).permutation(40)[:25]  # data position -> store row
    asked: list[tuple[list[str], np.ndarray]] = []
    r.read_ahead = lambda keys, rws: asked.append((list(keys), np.asarray(rws)))  # type: ignore[method-assign]
    for rows, ref in ((None, data), (order, data[order]), (np.arange(5, 30), data[5:30]), ((5, 30), data[5:30])):
        s = StreamedRows(r, "tokens", rows, random=True)
        assert len(s) == len(ref) and tuple(s.shape) == ref.shape and s.dtype == torch.float16
        for idx in ([3, 3, 0, 24], [], list(range(len(ref)))[::-1]):
            got = s.index_select(0, torch.tensor(idx, dtype=torch.long))
            assert got.dtype == torch.float16 and tuple(got.shape) == (len(idx), 3, 4)
            np.testing.assert_array_equal(got.numpy(), ref[idx])
        np.testing.assert_array_equal(s[2:9:3].numpy(), ref[2:9:3])
        np.testing.assert_array_equal(s[-1].numpy(), ref[-1])
        asked.clear()
        s.read_ahead(torch.tensor([4, 0, 4]))  # positions -> the store rows they are
        store_rows = np.arange(40) if rows is None else np.arange(*rows) if isinstance(rows, tuple) else rows
        want = store_rows[[4, 0, 4]]
        assert asked[0][0] == ["tokens"]
        np.testing.assert_array_equal(asked[0][1], want)


def test_prefetch_reads_each_item_ahead_once_before_it_is_computed() -> None:
    log: list[tuple[str, int]] = []
    got = list(prefetch(lambda x: log.append(("fn", x)) or x, range(7), depth=2,
                        ahead=lambda x: log.append(("ahead", x))))
    assert got == list(range(7))
    # one thread does both, in order: items 0..2 ahead first, then each item two places on before the next one
    assert log == [("ahead", 0), ("ahead", 1), ("ahead", 2), ("fn", 0), ("ahead", 3), ("fn", 1), ("ahead", 4),
                   ("fn", 2), ("ahead", 5), ("fn", 3), ("ahead", 6), ("fn", 4), ("fn", 5), ("fn", 6)]
    assert list(prefetch(lambda x: x, [], ahead=lambda x: log.append(("late", x)))) == []
    assert list(prefetch(lambda x: -x, range(3), enabled=False, ahead=lambda x: log.append(("late", x)))) == [0, -1, -2]
    assert ("late", 0) not in log  # rows in memory: nothing to read ahead


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and the page cache advice are Linux's")
def test_streamed_batches_read_their_rows_not_the_readahead_window_around_them(tmp_path: Path) -> None:
    from tests.cache.test_store import _resident

    path = tmp_path / "s.h5"
    n = 4096  # rows of 4 KB, 16 MB: a readahead window around a touched row (128 KB and up) spans many rows
    x = np.random.default_rng(0).standard_normal((n, 2048)).astype(np.float16)
    with FeatureStore(path, {"preset": "p"}, "t", capacity=n) as st:
        st.write([f"i{k}" for k in range(n)], {"pooled": x})
    r = StoreReader(path)
    a = r._layout["pooled"]
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, a.offset, n * a.row_bytes, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    page_rows = range(100, n - 100, 300)
    if _resident(path, a.offset + 100 * a.row_bytes, (n - 200) * a.row_bytes).any():
        pytest.skip("this file system keeps every page cached (tmpfs)")
    s = StreamedRows(r, "pooled", random=True)
    idx = torch.tensor(list(page_rows))
    np.testing.assert_array_equal(s.index_select(0, idx).numpy(), x[idx.numpy()])
    for k in page_rows:  # the rows asked for are cached, their neighbours a few rows away are not
        assert _resident(path, a.offset + k * a.row_bytes, a.row_bytes).all()
        assert not _resident(path, a.offset + (k + 4) * a.row_bytes, 8 * a.row_bytes).any()
        assert not _resident(path, a.offset + (k - 12) * a.row_bytes, 8 * a.row_bytes).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_non_finite_rows_are_found_in_every_block(dtype: torch.dtype) -> None:
    from mmcache.heads import data as hdata

    t = torch.randn(1_500, 4096).to(dtype)  # rows of 8-16 KB: several blocks of CHECK_BYTES, the last one short
    assert hdata.CHECK_BYTES // (4096 * t.element_size()) < len(t) // 2
    bad = [0, 511, 512, 1_023, 1_499]
    for i, v in zip(bad, ("nan", "inf", "-inf", "nan", "inf"), strict=True):
        t[i, i % 4096] = float(v)
    assert hdata._non_finite_rows(t).nonzero().flatten().tolist() == bad
    assert hdata._non_finite_rows(t[:0]).shape == (0,)
    assert not hdata._non_finite_rows(torch.zeros(3, 0, dtype=dtype)).any()
