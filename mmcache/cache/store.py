"""Contract 3: the HDF5 feature store, one file per (dataset, modality, name).

Crash safety by construction. HDF5 is not crash-consistent while it changes its own
structure (a file killed before a flush cannot be opened again), so a store's HDF5
structure is only ever written whole: every dataset is contiguous, allocated up front
for `capacity` rows (sparse on disk: unwritten rows take no blocks), the file is built
under a temporary name, fsynced and renamed into place. After that, extraction writes
only raw row bytes at fixed offsets (`os.pwrite`) and then commits them with one 32-byte
write of the `_state` counters (rows, failed, updated time). A kill at any moment leaves
a valid HDF5 file whose committed rows are complete; rows past the counter are ignored
and overwritten on resume. Growing past `capacity` rebuilds the file under a temporary
name and renames it (amortised by doubling; pass `capacity` to avoid it).

Failure records are append-only like rows: a record whose reason changed is appended
(the last record of an id wins), and a record is superseded, never erased, when its id
is later committed as a row (a retry that succeeded). So no write ever loses a record
that nothing has replaced; a rebuild keeps only the live records.

Ids are kept exactly: they must be non-empty valid Unicode without NUL characters, at
most `MAX_ID_BYTES` bytes of UTF-8 (fixed-width byte slots would drop a trailing NUL),
and are refused otherwise, as datasets refuse them at load.

Static metadata (spec, spec hash, dataset, dtype, versions, created time) are JSON HDF5
attributes; what changes during extraction (committed rows, failed ids with reasons,
updated time) lives in the fixed-size datasets above. `StoreReader.attrs` presents both
as one JSON-able dict. Readers take no lock and never block, even while a writer runs.
"""

from __future__ import annotations

import json
import mmap
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from filelock import FileLock, Timeout

from mmcache.cache.spec import canonical_spec, spec_hash
from mmcache.data.base import MAX_ID_BYTES, id_problem
from mmcache.errors import MMCacheError
from mmcache.manifest import Manifest, default_manifest, manifest_ids
from mmcache.manifest import manifest_path as manifest_path  # the stores' manifest sits beside them

DEFAULT_CACHE = Path("cache")
FORMAT = "mmcache-store/2"
DEFAULT_CAPACITY = 1024
REASON_BYTES = 512
# Rows are copied / scanned in blocks of about this many bytes, so memory stays bounded.
BLOCK_BYTES = 64 << 20
# A dense request whose row span is at most this large is read in one go and indexed in memory.
SPAN_BYTES = 1 << 30
# pread/pwrite move at most this many bytes per call on Linux.
_IO_MAX = 0x7FFFF000
_MADV_POPULATE_READ = 22  # Linux's madvise advice that reads a mapping's pages in (page cache, no copy)
# One page cache advice reads at most the device's readahead window (`read_ahead_kb`, 128 KB by default and
# several MB on some virtual disks), whatever length it is given: longer ranges are advised in pieces of this size.
_ADVICE_BYTES = 128 << 10
_STATE = "_state"  # int64 [n_rows, n_failed, updated_ns, reserved]
_META = ("ids", "failed_ids", "failed_reasons", _STATE)
_ORDER = ("pooled", "tokens", "mask", "boxes", "logits")  # the order arrays are listed in


def store_path(cache_dir: Path | str, dataset: str, modality: str, name: str) -> Path:
    """`cache/<dataset>/<modality>/<name>.h5`."""
    return Path(cache_dir) / dataset / modality / f"{name}.h5"


def lock_path(path: Path | str) -> Path:
    """The lock file a writer of `path` holds."""
    return Path(f"{path}.lock")


def partial_path(path: Path | str) -> Path:
    """Where a store is (re)built before it is renamed into place."""
    return Path(f"{path}.partial")


def failures_path(path: Path | str) -> Path:
    """`cache/<dataset>/<modality>/<name>.failed.csv`: every failed id of a store with its reason."""
    p = Path(path)
    return p.with_name(f"{p.stem if p.suffix == '.h5' else p.name}.failed.csv")


def _iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ns / 1e9)) if ns else ""


def _corrupt(path: Path, why: str) -> MMCacheError:
    return MMCacheError(
        f"{path} is not a readable feature store ({why}); remove it with `mmcache cache rm {path}` "
        "and run `mmcache extract` again"
    )


def _pwrite(fd: int, buf: np.ndarray, offset: int) -> None:
    # numpy's stubs give ndarray __buffer__ (typing.Buffer) only for Python >= 3.12.
    mv = memoryview(np.ascontiguousarray(buf)).cast("B")  # type: ignore[arg-type]
    while len(mv):
        n = os.pwrite(fd, mv[:_IO_MAX], offset)
        mv, offset = mv[n:], offset + n


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    mv = memoryview(out).cast("B")  # type: ignore[arg-type]  # as in _pwrite
    while len(mv):
        n = os.preadv(fd, [mv[:_IO_MAX]], offset)
        if n == 0:
            raise OSError(f"unexpected end of file at byte {offset}")
        mv, offset = mv[n:], offset + n


def _populate(m: mmap.mmap) -> None:
    """Read every page of mapping `m` in and map it: one `madvise(MADV_POPULATE_READ)` (Linux 5.14+), else a read of
    one byte per page."""
    try:
        m.madvise(_MADV_POPULATE_READ)
        return
    except (AttributeError, OSError, ValueError):
        pass
    view = np.frombuffer(m, dtype=np.uint8)
    try:
        int(view[:: mmap.PAGESIZE].max())
    finally:
        del view


@dataclass(frozen=True)
class _Array:
    """Where one contiguous dataset lives in the file."""

    offset: int
    row_shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


def _layout(f: h5py.File) -> dict[str, _Array]:
    out: dict[str, _Array] = {}
    for k, ds in f.items():
        off = ds.id.get_offset()
        if off is None:
            raise ValueError(f"dataset {k!r} is not contiguous")
        out[k] = _Array(int(off), tuple(ds.shape[1:]), ds.dtype)
    return out


def _create_contiguous(f: h5py.File, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    # Early allocation fixes every row's address for the file's life; no fill means the
    # unwritten tail stays a sparse hole instead of gigabytes of zeros written up front.
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), h5py.h5s.create_simple(shape),
                    dcpl=dcpl)


def _encode_ids(ids: Sequence[str], width: int) -> np.ndarray:
    return np.array([i.encode() for i in ids], dtype=f"S{width}")


def clean_reason(reason: str) -> str:
    """A failure reason as the store keeps it: printable escapes for what UTF-8 bytes cannot hold, at most
    REASON_BYTES bytes, cut between characters."""
    raw = str(reason).replace("\0", "\\x00").encode("utf-8", "backslashreplace")
    return raw[:REASON_BYTES].decode("utf-8", "ignore")


def _decode(arr: np.ndarray) -> list[str]:
    # bytes.decode per item: several times faster than numpy's astype("U") on a million fixed-width ids.
    return [b.decode("utf-8", "replace") for b in arr.tolist()]


class FeatureStore:
    """Writer: appends batches of rows keyed by id, crash-safely; resumes; refuses another spec or writer.

    `capacity` is the number of rows (committed + failed) the store should hold; pass the
    dataset's size to avoid growth copies. `durable=True` also fsyncs every batch, which
    protects against power loss, not only against a killed process.
    """

    # Set by _open: read from the existing file, or by _rebuild.
    capacity: int
    _id_width: int

    def __init__(self, path: Path | str, spec: dict[str, Any], dataset: str, dtype: str = "float16",
                 versions: dict[str, str] | None = None, capacity: int | None = None,
                 durable: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spec = canonical_spec(spec)
        self.hash = spec_hash(spec)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise MMCacheError(f"store dtype must be a float type (float16 or float32), not {dtype!r}")
        self.dataset = dataset
        self.durable = durable
        self._fd = -1
        # flock is released by the kernel when the holder dies, so a killed run never leaves a stale lock.
        self._lock = FileLock(lock_path(self.path), timeout=0, fallback_to_soft=False)
        try:
            self._lock.acquire()
        except Timeout:
            raise MMCacheError(
                f"{self.path} is being written by another process (it holds {lock_path(self.path)}); "
                "wait for it to finish or stop it, then rerun to resume"
            ) from None
        try:
            self._open(versions, capacity)
        except BaseException:
            self._lock.release()
            raise

    # -- opening / building -------------------------------------------------------

    def _open(self, versions: dict[str, str] | None, capacity: int | None) -> None:
        # A leftover partial file is a rebuild killed before its rename: the store itself is intact.
        partial_path(self.path).unlink(missing_ok=True)
        if self.path.exists():
            self._load_existing(versions)
            if capacity and capacity > self.capacity:
                self._rebuild(capacity, self._id_width, self._arrays_meta())
        else:
            from mmcache.utils import versions as lib_versions

            self.attrs: dict[str, Any] = {
                "format": FORMAT, "spec": self.spec, "spec_hash": self.hash, "dataset": self.dataset,
                "dtype": self.dtype.name, "versions": versions if versions is not None else lib_versions(),
                "created": _iso(time.time_ns()),
            }
            self._ids: list[str] = []
            self._done: set[str] = set()
            self.failed: dict[str, str] = {}
            self._n = self._nf = 0
            self._rebuild(capacity or DEFAULT_CAPACITY, 64, {})

    def _load_existing(self, versions: dict[str, str] | None) -> None:
        reader = StoreReader(self.path)
        if reader.attrs.get("spec_hash") != self.hash:
            raise MMCacheError(
                f"{self.path} was built with a different spec; rows of two specs are never mixed.\n"
                f"  store spec ({reader.attrs.get('spec_hash')}): {json.dumps(reader.spec, sort_keys=True)}\n"
                f"  asked spec ({self.hash}): {json.dumps(self.spec, sort_keys=True)}\n"
                f"remove the store (`mmcache cache rm {self.path}`) or give this spec another store name"
            )
        of = reader.attrs.get("dataset")
        if of and self.dataset and of != self.dataset:  # e.g. a store copied in from another dataset's cache
            raise MMCacheError(
                f"{self.path} holds rows of dataset {of!r}, not {self.dataset!r}; its ids would be taken as done "
                f"without extracting them: remove it (`mmcache cache rm {self.path}`) or give this store another name"
            )
        if reader.attrs.get("dtype") != self.dtype.name:
            raise MMCacheError(
                f"{self.path} stores {reader.attrs.get('dtype')} rows but {self.dtype.name} was asked; "
                f"resume with the store's dtype, or remove it (`mmcache cache rm {self.path}`) to switch"
            )
        stored_versions = reader.attrs.get("versions", {})
        if versions is not None:
            changed = {k: (stored_versions[k], v) for k, v in versions.items()
                       if k in stored_versions and stored_versions[k] != v and k not in ("git_commit", "mmcache")}
            if changed:
                warnings.warn(f"{self.path}: resuming with other library versions than the store was begun with "
                              f"{changed}; rows may differ in the last bits", stacklevel=3)
        self.attrs = {k: reader.attrs[k] for k in ("format", "spec", "spec_hash", "dataset", "dtype", "versions",
                                                    "created")}
        self._ids = list(reader.ids)
        self._done = set(self._ids)
        self.failed = dict(reader.failed)
        self._n, self._nf = len(self._ids), reader.failed_slots
        self._id_width = reader._layout["ids"].dtype.itemsize
        self.capacity = reader.capacity
        self._layout = reader._layout
        self._fd = os.open(self.path, os.O_RDWR)

    def _arrays_meta(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {k: (a.row_shape, a.dtype) for k, a in self._layout.items() if k not in _META}

    def _rebuild(self, capacity: int, id_width: int, arrays: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """Write the whole file anew under a temporary name, copy committed rows, rename it into place."""
        tmp = partial_path(self.path)
        tmp.unlink(missing_ok=True)
        with h5py.File(tmp, "w", locking=False) as f:
            for k, v in self.attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
            _create_contiguous(f, "ids", (capacity,), np.dtype(f"S{id_width}"))
            _create_contiguous(f, "failed_ids", (capacity,), np.dtype(f"S{id_width}"))
            _create_contiguous(f, "failed_reasons", (capacity,), np.dtype(f"S{REASON_BYTES}"))
            _create_contiguous(f, _STATE, (4,), np.dtype("<i8"))
            for k, (row_shape, dt) in arrays.items():
                _create_contiguous(f, k, (capacity, *row_shape), dt)
            new = _layout(f)
        fd = os.open(tmp, os.O_RDWR)
        try:
            if self._fd >= 0:
                for k in arrays:
                    if k in self._layout:
                        self._copy_rows(self._fd, self._layout[k], fd, new[k], self._n)
            _pwrite(fd, _encode_ids(self._ids, id_width), new["ids"].offset)
            # Only live failure records are carried over: superseded and repeated ones are dropped here.
            _pwrite(fd, _encode_ids(list(self.failed), id_width), new["failed_ids"].offset)
            reasons = np.array([r.encode() for r in self.failed.values()], dtype=f"S{REASON_BYTES}")
            _pwrite(fd, reasons, new["failed_reasons"].offset)
            _pwrite(fd, np.array([self._n, len(self.failed), time.time_ns(), 0], dtype="<i8"), new[_STATE].offset)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.replace(tmp, self.path)
        self._fsync_dir()
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._layout = new
        self.capacity = capacity
        self._id_width = id_width
        self._nf = len(self.failed)

    @staticmethod
    def _copy_rows(src: int, a: _Array, dst: int, b: _Array, n: int) -> None:
        step = max(1, BLOCK_BYTES // max(1, a.row_bytes))
        for lo in range(0, n, step):
            buf = np.empty((min(step, n - lo) * a.row_bytes,), dtype=np.uint8)
            _pread_into(src, buf, a.offset + lo * a.row_bytes)
            _pwrite(dst, buf, b.offset + lo * b.row_bytes)

    def _fsync_dir(self) -> None:
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- writing ------------------------------------------------------------------

    @property
    def done(self) -> set[str]:
        """Ids committed or recorded as failed (a rerun skips them)."""
        return self._done | set(self.failed)

    @property
    def committed(self) -> set[str]:
        """Ids with a committed row (a retry of failed ids writes the others)."""
        return set(self._done)

    @property
    def n_rows(self) -> int:
        """Number of committed rows."""
        return self._n

    def write(self, ids: Sequence[str], arrays: dict[str, Any]) -> None:
        """Append one batch of rows and commit it: rows first, then the counter that makes them count.

        An id recorded as failed may be written (a retry that succeeded): its row supersedes the record.
        """
        self._check_open()
        ids = [str(i) for i in ids]
        if not ids:
            return
        batch = self._prepare(ids, arrays)
        raw_ids = [i.encode() for i in ids]
        width = max(map(len, raw_ids))
        need = self._n + self._nf + len(ids)
        if need > self.capacity or width > self._id_width or not self._arrays_meta():
            # Doubling keeps growth copies amortised O(1) per row; the first batch fixes the arrays.
            cap = max(need, 2 * self.capacity) if need > self.capacity else self.capacity
            meta = self._arrays_meta() or {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
            self._rebuild(cap, max(self._id_width, 1 << (width - 1).bit_length()), meta)
        n0 = self._n
        for k, v in batch.items():
            a = self._layout[k]
            _pwrite(self._fd, v, a.offset + n0 * a.row_bytes)
        _pwrite(self._fd, np.array(raw_ids, dtype=f"S{self._id_width}"),
                self._layout["ids"].offset + n0 * self._id_width)
        self._commit(n0 + len(ids), self._nf)
        self._ids.extend(ids)
        self._done.update(ids)
        for i in ids:
            self.failed.pop(i, None)

    def _check_id(self, sid: str) -> None:
        why = id_problem(sid)
        if why is not None:
            raise MMCacheError(f"{self.path}: sample id {sid!r:.80} {why}; ids are stored as exact UTF-8 "
                               f"(non-empty, no NUL, at most {MAX_ID_BYTES} bytes): fix the id in the dataset")

    def _prepare(self, ids: list[str], arrays: dict[str, Any]) -> dict[str, np.ndarray]:
        for sid in ids:
            self._check_id(sid)
        if len(set(ids)) != len(ids):
            dup = [k for k, c in Counter(ids).items() if c > 1]
            raise MMCacheError(f"{self.path}: batch has duplicate ids {dup[:5]}; ids must be unique")
        again = [i for i in ids if i in self._done]
        if again:
            raise MMCacheError(f"{self.path}: ids already committed {again[:5]}; skip ids in `store.done`")
        out: dict[str, np.ndarray] = {}
        for k, v in arrays.items():
            if hasattr(v, "detach"):  # a torch tensor: cast before the copy to host (half the bytes moved)
                v = self._from_torch(k, v)
            v = np.asarray(v)
            if v.shape[:1] != (len(ids),):
                raise MMCacheError(f"{self.path}: array {k!r} has {v.shape[:1]} rows for {len(ids)} ids")
            if v.dtype.kind == "f" and v.dtype != self.dtype:
                with np.errstate(over="ignore"):  # overflow is checked right below, with a clear message
                    cast = v.astype(self.dtype)
                if not np.isfinite(cast).all() and np.isfinite(v).all():
                    self._overflow(k, float(np.abs(v).max()))
                v = cast
            out[k] = np.ascontiguousarray(v)
        meta = self._arrays_meta()
        if meta:
            got = {k: (v.shape[1:], v.dtype) for k, v in out.items()}
            if got != meta:
                raise MMCacheError(
                    f"{self.path}: batch arrays {_describe(got)} do not match the store's {_describe(meta)}; "
                    "every row of a store has the same arrays and shapes"
                )
        return out

    def _from_torch(self, key: str, t: Any) -> np.ndarray:
        import torch

        t = t.detach()
        if t.is_floating_point() and t.dtype != getattr(torch, self.dtype.name):
            cast = t.to(getattr(torch, self.dtype.name))
            if not torch.isfinite(cast).all() and torch.isfinite(t).all():
                self._overflow(key, float(t.abs().max()))
            t = cast
        return t.cpu().numpy()

    def _overflow(self, key: str, peak: float) -> None:
        raise MMCacheError(
            f"{self.path}: array {key!r} has values beyond the {self.dtype.name} range (max |x| {peak:.3g}); "
            "extract with float32"
        )

    def fail(self, sample_id: str, reason: str) -> None:
        """Record that `sample_id` could not be extracted, and why (committed at once).

        Failing an id again with a new reason appends a record that supersedes the old one;
        the same reason again writes nothing.
        """
        self._check_open()
        sample_id = str(sample_id)
        self._check_id(sample_id)
        if sample_id in self._done:
            raise MMCacheError(f"{self.path}: id {sample_id!r} is already committed; it cannot also fail")
        reason = clean_reason(reason)
        if self.failed.get(sample_id) == reason:
            return
        width = len(sample_id.encode())
        if self._n + self._nf + 1 > self.capacity or width > self._id_width:
            # A rebuild keeps the live records only, so it may free slots as well as add them.
            self._rebuild(max(self.capacity * 2, self._n + len(self.failed) + 1),
                          max(self._id_width, 1 << (width - 1).bit_length()), self._arrays_meta())
        i = self._nf
        _pwrite(self._fd, _encode_ids([sample_id], self._id_width),
                self._layout["failed_ids"].offset + i * self._id_width)
        _pwrite(self._fd, np.array([reason.encode()], dtype=f"S{REASON_BYTES}"),
                self._layout["failed_reasons"].offset + i * REASON_BYTES)
        self._commit(self._n, i + 1)
        self.failed[sample_id] = reason

    def _commit(self, n: int, nf: int) -> None:
        if self.durable:
            os.fdatasync(self._fd)
        # One small pwrite: a killed process never tears it, so the counters are old or new, never mixed.
        _pwrite(self._fd, np.array([n, nf, time.time_ns(), 0], dtype="<i8"), self._layout[_STATE].offset)
        if self.durable:
            os.fdatasync(self._fd)
        self._n, self._nf = n, nf

    def _check_open(self) -> None:
        if self._fd < 0:
            raise MMCacheError(f"{self.path}: the store is closed")

    def close(self) -> None:
        """Sync to disk, close the file and release the writer lock."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._lock.is_locked:
            self._lock.release()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)


def _describe(meta: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str:
    return "{" + ", ".join(f"{k}: {list(s)} {np.dtype(d).name}" for k, (s, d) in sorted(meta.items())) + "}"


IGNORE_LABEL = -100  # label of a row without one for a task (cross_entropy's ignore_index)


@dataclass
class SplitData:
    """One split as `StoreReader.load_split` reads it: ids, the store's arrays and the labels, row-aligned."""

    ids: list[str]
    features: dict[str, np.ndarray]  # array name (pooled, tokens, ...) -> [N, ...]
    labels: dict[str, np.ndarray]  # task -> [N] class index, IGNORE_LABEL where a row has no label
    classes: dict[str, list[str]]  # task -> class names
    missing: list[str] = field(default_factory=list)  # ids of the split the store lacks (left out)


class StoreReader:
    """Reads the committed rows of a store, aligned to requested ids; takes no lock, never blocks."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise MMCacheError(f"feature store {self.path} not found; run `mmcache extract` first")
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                raw = {k: f.attrs[k] for k in f.attrs}
                if raw.get("format") != FORMAT:
                    raise _corrupt(self.path, f"format {raw.get('format')!r}, expected {FORMAT!r}; it was written "
                                              "by another version of mmcache or is not a feature store")
                self._layout = _layout(f)
                missing = [k for k in _META if k not in self._layout]
                if missing:
                    raise _corrupt(self.path, f"datasets {missing} are missing")
                self.capacity = int(f["ids"].shape[0])
                state = f[_STATE][:]
                names = sorted((k for k in self._layout if k not in _META),
                               key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k))
                self.shapes: dict[str, tuple[int, ...]] = {k: self._layout[k].row_shape for k in names}
                self.dtypes: dict[str, np.dtype] = {k: self._layout[k].dtype for k in names}
                n, nf = int(state[0]), int(state[1])
                if not (0 <= n and 0 <= nf and n + nf <= self.capacity):
                    raise _corrupt(self.path, f"counters {n} rows + {nf} failed exceed its {self.capacity} slots")
                self.ids: list[str] = _decode(self._read_ids(n))
                fids = _decode(f["failed_ids"][:nf])
                reasons = _decode(f["failed_reasons"][:nf])
        except MMCacheError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise _corrupt(self.path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        end = max(a.offset + self.capacity * a.row_bytes for k, a in self._layout.items() if k != _STATE)
        if os.path.getsize(self.path) < end:
            raise _corrupt(self.path, f"it is truncated: {os.path.getsize(self.path)} bytes, expected {end}")
        try:
            self.attrs: dict[str, Any] = {k: _maybe_json(k, v) for k, v in raw.items()}
        except ValueError as e:
            raise _corrupt(self.path, f"bad JSON attribute ({e})") from None
        self._index: dict[str, int] | None = None
        # Records are appended: the last record of an id holds its current reason.
        records = dict(zip(fids, reasons, strict=True))
        self.failed_slots = nf  # failure records on disk, superseded ones included
        # A later run may have extracted an id that once failed; the committed row wins.
        committed = set(self.ids) if records else set()
        self.failed: dict[str, str] = {k: v for k, v in records.items() if k not in committed}
        self.attrs.update(rows=n, failed=self.failed, updated=_iso(int(state[2])), capacity=self.capacity)
        self.spec: dict[str, Any] = self.attrs.get("spec", {})

    def _read_ids(self, n: int) -> np.ndarray:
        """The first `n` id slots, read straight from their offset (HDF5's own read is slower at a million)."""
        a = self._layout["ids"]
        out = np.empty((n,), dtype=a.dtype)
        if n:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                _pread_into(fd, out, a.offset)
            finally:
                os.close(fd)
        return out

    @property
    def keys(self) -> list[str]:
        """Names of the arrays per row (pooled, tokens, mask, ...)."""
        return list(self.shapes)

    @property
    def index(self) -> dict[str, int]:
        """Id -> row number (built on first use)."""
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.ids)}
        return self._index

    def __len__(self) -> int:
        return len(self.ids)

    def manifest(self) -> Path:
        """The dataset manifest this store belongs to (`cache/<dataset>/manifest.json`)."""
        return default_manifest(self.path)

    def load(self, ids: Sequence[str] | None = None, keys: Sequence[str] | None = None, *,
             split: str | None = None, manifest: Path | str | None = None) -> dict[str, np.ndarray]:
        """Arrays for `ids`, or for the ids of `split` in the dataset manifest, or all rows; aligned, in order.

        Ids not in the store are an error. Rows are read with sequential reads of the file
        (one per array when the ids are a contiguous run), then reordered in memory.
        """
        if split is not None:
            if ids is not None:
                raise MMCacheError("pass either ids or split to load(), not both")
            ids = manifest_ids(manifest or self.manifest(), split)
        keys = list(keys) if keys is not None else self.keys
        unknown = [k for k in keys if k not in self.shapes]
        if unknown:
            raise MMCacheError(f"{self.path} has no arrays {unknown}; it has {self.keys}")
        return self.load_rows(np.arange(len(self.ids), dtype=np.int64) if ids is None else self.rows(ids), keys)

    def load_rows(self, rows: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Arrays `keys` of store rows `rows` (row numbers, as `rows(ids)` gives them), in that order, read as
        `load` reads them."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return {k: self._gather(fd, self._layout[k], rows) for k in keys}
        finally:
            os.close(fd)

    def memmap(self, key: str, rows: tuple[int, int] | None = None, *, populate: bool = False,
               copy_on_write: bool = False, random: bool = False) -> np.ndarray:
        """A memory map of array `key`'s committed rows (`rows=(lo, hi)`: rows lo..hi-1), [rows, *shape] in the
        store's order. Nothing is copied: the dataset is contiguous, so rows are read from the file where they lie
        when touched, into the kernel's page cache (which it may drop under memory pressure and read again). The
        array is read-only; with `copy_on_write` it is writable and a write stays in this process, never reaching
        the file (such a map counts against the memory the system commits, as an array of its size would: only for
        rows that fit in memory). With `populate`, every page is read in now (from the page cache when the file was
        read lately, else from the disk in sequential order) and mapped, so touching a row later costs no read
        while the pages stay cached. With `random` (rows touched in any order, as a shuffled epoch streams them),
        a page touched that is not cached reads that page alone (`MADV_RANDOM`), not the device's readahead window
        around it (up to several MB a row on some virtual disks, which then fill the page cache with rows nobody
        asked for); `read_ahead` of the rows about to be touched reads them in the background instead."""
        if key not in self.shapes:
            raise MMCacheError(f"{self.path} has no array {key!r}; it has {self.keys}")
        a = self._layout[key]
        lo, hi = rows if rows is not None else (0, len(self.ids))
        if not 0 <= lo <= hi <= len(self.ids):
            raise ValueError(f"rows {lo}:{hi} outside the {len(self.ids)} committed rows of {self.path}")
        if hi == lo or not a.row_bytes:
            return np.zeros((hi - lo, *a.row_shape), dtype=a.dtype)
        offset = a.offset + lo * a.row_bytes
        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # a mapping begins on a page boundary
        fd = os.open(self.path, os.O_RDONLY)
        try:
            m = mmap.mmap(fd, offset - start + (hi - lo) * a.row_bytes, offset=start,
                          access=mmap.ACCESS_COPY if copy_on_write else mmap.ACCESS_READ)
        finally:
            os.close(fd)
        if random and hasattr(mmap, "MADV_RANDOM"):
            m.madvise(mmap.MADV_RANDOM)
        if populate:
            _populate(m)
        count = (hi - lo) * int(np.prod(a.row_shape, dtype=np.int64))
        # The array keeps the mapping alive (its base); the mapping outlives the file's name (rename, unlink).
        return np.frombuffer(m, dtype=a.dtype, count=count, offset=offset - start).reshape(hi - lo, *a.row_shape)

    def read_ahead(self, keys: Sequence[str], rows: tuple[int, int] | np.ndarray | None = None) -> None:
        """Ask the kernel to start reading arrays `keys`' committed rows into the page cache in the background
        (`posix_fadvise(WILLNEED)`) and return at once, so the disk works while the caller does something else; a
        later read or `memmap` of those rows finds them cached. `rows`: `(lo, hi)` (rows lo..hi-1, default all),
        or an array of row numbers in any order (a streamed batch's: rows a page or less apart are advised as one
        range). Nothing where the system has no such advice."""
        if not hasattr(os, "posix_fadvise"):
            return
        spans = self._spans(keys, rows)
        if not spans:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start, end in spans:
                for pos in range(start, end, _ADVICE_BYTES):
                    os.posix_fadvise(fd, pos, min(_ADVICE_BYTES, end - pos), os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def _spans(self, keys: Sequence[str], rows: tuple[int, int] | np.ndarray | None) -> list[tuple[int, int]]:
        """File byte ranges [start, end) of arrays `keys`' `rows` (as `read_ahead` takes them), in file order."""
        n = len(self.ids)
        if rows is None or isinstance(rows, tuple):
            lo, hi = rows if rows is not None else (0, n)
            return [(self._layout[k].offset + lo * self._layout[k].row_bytes,
                     self._layout[k].offset + hi * self._layout[k].row_bytes)
                    for k in keys if hi > lo and self._layout[k].row_bytes]
        r = np.unique(np.asarray(rows, dtype=np.int64))
        if len(r) and not 0 <= r[0] <= r[-1] < n:
            raise ValueError(f"rows outside the {n} committed rows of {self.path}")
        out: list[tuple[int, int]] = []
        for k in keys:
            a = self._layout[k]
            if not len(r) or not a.row_bytes:
                continue
            starts = a.offset + r * a.row_bytes
            ends = starts + a.row_bytes
            cut = np.flatnonzero(starts[1:] > ends[:-1] + mmap.PAGESIZE) + 1  # a gap of more than a page
            out += zip(starts[np.r_[0, cut]].tolist(), ends[np.r_[cut - 1, len(r) - 1]].tolist(), strict=True)
        return out

    def row_bytes(self, key: str) -> int:
        """Bytes one row of array `key` takes in the store (and in memory, in the stored dtype)."""
        return self._layout[key].row_bytes

    def load_split(self, split: str, keys: Sequence[str] | None = None, *,
                   manifest: Path | str | None = None) -> SplitData:
        """Ids, arrays and labels of one split together, from the dataset manifest (default
        `cache/<dataset>/manifest.json` beside the store's folder), in manifest order. Ids of the split the store
        lacks (failed or not extracted) are left out and listed in `missing`."""

        path = Path(manifest) if manifest is not None else self.manifest()
        if not path.exists():
            raise MMCacheError(f"manifest {path} not found; run `mmcache extract` for this dataset to write it, "
                               "or pass manifest=")
        man = Manifest.read(path, labels=False)
        space = man.labels
        mine = np.flatnonzero(man.split_array == split)
        if not len(mine):
            raise MMCacheError(f"manifest {path} has no split {split!r}; its splits are {sorted(set(man.splits))}")
        cols = {t: man.label_columns.get(t) for t in space.tasks}
        samples = [(man.ids[j], {t: int(c[j]) for t, c in cols.items() if c is not None and c[j] != IGNORE_LABEL})
                   for j in mine.tolist()]
        have = [(i, lab) for i, lab in samples if i in self.index]
        ids = [i for i, _ in have]
        labels = {t: np.array([lab.get(t, IGNORE_LABEL) for _, lab in have], dtype=np.int64) for t in space.tasks}
        return SplitData(ids=ids, features=self.load(ids, keys), labels=labels, classes=dict(space.tasks),
                         missing=[i for i, _ in samples if i not in self.index])

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of `ids`; a clear error lists ids that are missing (and why, if they failed)."""
        ids = list(ids)
        n = len(ids)
        if n == len(self.ids) and ids == self.ids:  # every row, in store order: no index needed
            return np.arange(n, dtype=np.int64)
        if n and n <= len(self.ids) and ids[0] in self.index:
            lo = self.index[ids[0]]
            if self.ids[lo:lo + n] == ids:  # a run of stored rows, in order: no per-id lookups
                return np.arange(lo, lo + n, dtype=np.int64)
        try:
            return np.array(list(map(self.index.__getitem__, ids)), dtype=np.int64)
        except KeyError:
            pass
        missing = [i for i in ids if i not in self.index]
        failed = [i for i in missing if i in self.failed]
        why = ""
        if failed:
            why = f"; {len(failed)} of them failed extraction (e.g. {failed[0]!r}: {self.failed[failed[0]]})"
        raise MMCacheError(
            f"{self.path}: {len(missing)} of {n} requested ids are not in the store "
            f"(e.g. {missing[:3]}){why}; rerun `mmcache extract` to fill them, or drop them from the request"
        )

    def _gather(self, fd: int, a: _Array, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *a.row_shape), dtype=a.dtype)
        if len(rows) == 0:
            return out
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo == len(rows) and (np.diff(rows) == 1).all():
            _pread_into(fd, out, a.offset + lo * a.row_bytes)  # one contiguous read, straight into the result
            return out
        # Rows are moved as opaque fixed-size records: numpy gathers those about 2x faster than typed rows.
        rec = np.dtype((np.void, a.row_bytes))
        out_v = out.reshape(len(rows), -1).view(rec).reshape(-1)
        if len(rows) * 8 < hi - lo:
            # A few rows scattered over a long span: read only their pages instead of the span.
            mm = np.memmap(self.path, dtype=rec, mode="r", offset=a.offset, shape=(hi,))
            out_v[:] = mm[rows]
            del mm
            return out
        if (hi - lo) * a.row_bytes <= SPAN_BYTES:
            # Dense: one sequential read of the span, then pick the rows in memory.
            buf = np.empty((hi - lo,), dtype=rec)
            _pread_into(fd, buf, a.offset + lo * a.row_bytes)
            return buf[rows - lo].view(a.dtype).reshape(len(rows), *a.row_shape)
        # A span too large to hold: sweep it in sequential blocks and scatter rows to their places.
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        step = max(1, BLOCK_BYTES // max(1, a.row_bytes))
        buf = np.empty((min(step, hi - lo),), dtype=rec)
        for b0 in range(lo, hi, step):
            b1 = min(hi, b0 + step)
            i0, i1 = np.searchsorted(srt, [b0, b1])
            if i0 == i1:
                continue
            blk = buf[: b1 - b0]
            _pread_into(fd, blk, a.offset + b0 * a.row_bytes)
            out_v[order[i0:i1]] = blk[srt[i0:i1] - b0]
        return out


def _maybe_json(key: str, value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if key in ("spec", "versions") and isinstance(value, str):
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def find_stores(cache_dir: Path | str) -> Iterator[Path]:
    """Every `*.h5` store under `cache_dir`, sorted."""
    root = Path(cache_dir)
    if root.is_file():
        yield root
        return
    yield from sorted(p for p in root.rglob("*.h5") if p.is_file())


def disk_bytes(path: Path) -> int:
    """Bytes a file occupies on disk (stores are sparse: unwritten capacity takes no blocks)."""
    st = path.stat()
    return min(st.st_size, st.st_blocks * 512) if hasattr(st, "st_blocks") else st.st_size


@dataclass
class VerifyReport:
    """Outcome of `verify_store`: problems fail verification; warnings are reported only."""

    path: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rows: int = 0
    failed: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _examples(ids: Sequence[str], k: int = 3) -> str:
    return ", ".join(repr(i) for i in ids[:k]) + (" ..." if len(ids) > k else "")


def verify_store(path: Path | str, manifest: Path | str | None = None, strict: bool = False) -> VerifyReport:
    """Check a store: it opens, shapes agree, values are finite, ids are unique, and ids match the manifest.

    Failed ids are warnings, or problems when `strict`.
    """
    path = Path(path)
    rep = VerifyReport(path)
    try:
        r = StoreReader(path)
    except MMCacheError as e:
        rep.problems.append(str(e))
        return rep
    rep.rows, rep.failed = len(r.ids), len(r.failed)
    # Feature stores hold `pooled`; teacher stores hold only `logits`, captions stores only `caption` (UTF-8 bytes).
    if not {"pooled", "logits", "caption"} & set(r.shapes) and r.ids:
        rep.problems.append(f"no `pooled` (or teacher `logits`) array (arrays: {r.keys})")
    if "tokens" in r.shapes or "mask" in r.shapes:
        t, m = r.shapes.get("tokens"), r.shapes.get("mask")
        if t is None or m is None or len(t) != 2 or tuple(m) != tuple(t[:1]):
            rep.problems.append(f"tokens {t} and mask {m} disagree: expected tokens [T,d] with mask [T]")
        if m is not None and r.dtypes["mask"] != np.bool_:
            rep.problems.append(f"mask has dtype {r.dtypes['mask']}, expected bool")
    if "boxes" in r.shapes and (len(r.shapes["boxes"]) != 2 or r.shapes["boxes"][-1] != 5):
        rep.problems.append(f"boxes rows have shape {list(r.shapes['boxes'])}, expected [R,5]")
    dup = [k for k, c in Counter(r.ids).items() if c > 1]
    if dup:
        rep.problems.append(f"{len(dup)} duplicate ids ({_examples(dup)})")
    if any(not i for i in r.ids):
        rep.problems.append("empty ids among the rows")
    # Scan values block by block so a store larger than memory can be verified.
    step = max(1, BLOCK_BYTES // max(1, sum(a.row_bytes for k, a in r._layout.items() if k in r.shapes)))
    bad: dict[str, list[str]] = {k: [] for k in r.keys}
    zero: list[str] = []
    empty_mask: list[str] = []
    for lo in range(0, len(r.ids), step):
        rows = np.arange(lo, min(len(r.ids), lo + step))
        blk = _block(r, lo, len(rows))
        for k, v in blk.items():
            flat = v.reshape(len(rows), -1)
            if v.dtype.kind == "f":
                nonfinite = ~np.isfinite(flat).all(axis=1)
                bad[k] += [r.ids[lo + i] for i in np.flatnonzero(nonfinite)]
            if k == "pooled":
                zero += [r.ids[lo + i] for i in np.flatnonzero(~flat.any(axis=1))]
            if k == "mask":
                empty_mask += [r.ids[lo + i] for i in np.flatnonzero(~flat.any(axis=1))]
    for k, b in bad.items():
        if b:
            rep.problems.append(f"{len(b)} rows with NaN/inf in {k!r} ({_examples(b)})")
    if zero:
        rep.problems.append(f"{len(zero)} all-zero `pooled` rows ({_examples(zero)}): rows never written or a broken "
                            "encoder; remove the store and extract again")
    if empty_mask:
        rep.warnings.append(f"{len(empty_mask)} rows whose mask has no real token ({_examples(empty_mask)})")
    if r.failed:
        kinds = _listed_kinds(path, r.failed)
        reasons = Counter(kinds.get(i, why) for i, why in r.failed.items()).most_common(3)
        msg = (f"{len(r.failed)} ids failed extraction ({_examples(list(r.failed))}); reasons: "
               + "; ".join(f"{c}x {why}" for why, c in reasons))
        if failures_path(path).exists():
            msg += f"; every one with its reason in {failures_path(path)}"
        (rep.problems if strict else rep.warnings).append(msg)
    mpath = Path(manifest) if manifest is not None else r.manifest()
    if not mpath.exists():
        rep.warnings.append(f"no manifest at {mpath}; ids were not checked against the dataset")
        return rep
    try:
        man = Manifest.read(mpath, labels=False)
    except MMCacheError as e:
        rep.problems.append(str(e))
        return rep
    expected = man.ids
    if man.name and r.attrs.get("dataset") and man.name != r.attrs["dataset"]:
        rep.problems.append(f"store is of dataset {r.attrs['dataset']!r} but manifest {mpath} is of {man.name!r}")
    exp = set(expected)
    stale = [i for i in r.ids if i not in exp]
    if stale:
        rep.problems.append(f"{len(stale)} rows have ids not in manifest {mpath} ({_examples(stale)}): the dataset "
                            "changed since extraction; remove the store and extract again")
    have = set(r.ids) | set(r.failed)
    todo = [i for i in expected if i not in have]
    if todo:
        rep.problems.append(f"{len(todo)} of {len(expected)} manifest ids are neither stored nor failed "
                            f"({_examples(todo)}): rerun `mmcache extract` to resume")
    gone = [i for i in r.failed if i not in exp]
    if gone:
        rep.warnings.append(f"{len(gone)} failed ids are not in the manifest ({_examples(gone)})")
    return rep


def _listed_kinds(path: Path, failed: dict[str, str]) -> dict[str, str]:
    """Id -> failure kind from the store's `<name>.failed.csv` (written by extraction), for the ids whose reason
    there is the store's; empty when there is no readable list."""
    import csv

    try:
        with open(failures_path(path), newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    return {r[0]: r[1] for r in rows[1:] if len(r) == 3 and failed.get(r[0]) == r[2]}


def _block(r: StoreReader, lo: int, n: int) -> dict[str, np.ndarray]:
    fd = os.open(r.path, os.O_RDONLY)
    try:
        return {k: r._gather(fd, r._layout[k], np.arange(lo, lo + n, dtype=np.int64)) for k in r.keys}
    finally:
        os.close(fd)
