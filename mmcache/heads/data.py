"""The feature stores and manifest of a dataset, aligned by id, in memory or read where they lie.

The trainer batches by index (no DataLoader, no per-sample Python): `data.batch(idx)` gathers rows `idx` (a
LongTensor of positions) of every array, cast to float32 per batch. Features keep the stores' dtype (float16 stays
float16, in memory and on a GPU). With `load="memory"` each array is one tensor, all of it read up front: when a
store holds the rows in their order (the usual case) the tensor is the store's copy-on-write memory map with every
page read in, so loading copies nothing; with `load="stream"` it is a `StreamedRows`, a memory map of the store
that reads only the rows a batch asks for, so a dataset larger than memory trains with memory bounded by a few
batches; `batches` / `chunks` then read the next batches in a background thread (pinned memory on CUDA).
`load="auto"` (the default) keeps the rows in memory when they take at most half of what the process may use
(`mmcache.memory`) and streams otherwise.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcache.cache.store import StoreReader, manifest_path, store_path
from mmcache.data.base import LabelSpace
from mmcache.errors import MMCacheError
from mmcache.heads.base import Features, InputSpec
from mmcache.heads.parallel import RankShard
from mmcache.manifest import IGNORE, Manifest
from mmcache.memory import choose_load

PREFETCH = 3  # batches read ahead by the background thread of a streamed dataset
CHUNK_BYTES = 64 << 20  # an evaluation chunk's features take about this much (float32), whatever the row size
CHECK_BYTES = 4 << 20  # the non-finite row check tests blocks of about this many bytes (they stay in the core's cache)

_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64, np.dtype(np.bool_): torch.bool, np.dtype(np.uint8): torch.uint8,
                 np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}


class StreamedRows:
    """Array `key` of store `reader` read where it lies: `index_select(0, idx)` reads rows `idx` (positions in the
    aligned data) from a memory map of the store, in the stored dtype. `rows`: `(lo, hi)` (store rows lo..hi-1 in
    order), an array (`rows[i]` is position i's store row) or None (every row in order). With `random`,
    `read_ahead(idx)` starts the disk on rows a later batch takes. It offers what the trainer uses of an in-memory
    tensor (`shape`, `dtype`, `device`, `index_select`, `is_floating_point`, `len`, integer and slice indexing)."""

    def __init__(self, reader: StoreReader, key: str, rows: tuple[int, int] | np.ndarray | None = None,
                 random: bool = False) -> None:
        self.path = reader.path
        self._reader, self._key, self.random = reader, key, random
        run = (0, len(reader)) if rows is None else rows if isinstance(rows, tuple) else _contiguous_run(rows)
        # `random`: more rows than the page cache keeps, read in a shuffled order: a page not cached reads itself,
        # not the readahead window around it (`StoreReader.memmap`), and batches are read ahead (`read_ahead`).
        # Rows that stay cached are left to the kernel's readahead, which fills the cache in the first epoch.
        mm = reader.memmap(key, run, random=random)
        self._lo = run[0] if run else 0
        self._mm = mm
        # The map as a tensor (no copy): a batch is one `index_select` of it, the gather in-memory rows take, which
        # runs without holding the GIL (a numpy gather of a few hundred rows holds it), so the reads of a prefetch
        # thread do not stall the training thread. The map is read-only (a writable one of a store larger than
        # memory would be refused) and only ever read here, so torch's warning about it does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            self._t = torch.from_numpy(mm)
        self._rows = None if run else torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        n = len(mm) if self._rows is None else len(self._rows)
        self.shape = torch.Size((n, *mm.shape[1:]))
        self.dtype = _TORCH_DTYPES[mm.dtype]
        self.device = torch.device("cpu")
        self._row_bytes = int(np.prod(mm.shape[1:], dtype=np.int64)) * mm.dtype.itemsize

    def read_ahead(self, idx: torch.Tensor) -> None:
        """Start reading rows `idx` (positions) into the page cache in the background (`StoreReader.read_ahead`)."""
        pos = idx.detach().to("cpu", torch.int64)
        rows = pos + self._lo if self._rows is None else self._rows.index_select(0, pos)
        self._reader.read_ahead([self._key], rows.numpy())

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row_bytes

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        if dim != 0:
            raise ValueError("streamed rows are selected along the row axis only")
        pos = idx.detach().to("cpu", torch.int64)
        return self._t.index_select(0, pos if self._rows is None else self._rows.index_select(0, pos))

    def __getitem__(self, key: int | slice) -> torch.Tensor:
        n = self.shape[0]
        if isinstance(key, slice):
            return self.index_select(0, torch.arange(n)[key])
        return self.index_select(0, torch.tensor([range(n)[key]]))[0]


def prefetch(fn: Callable[[Any], Any], items: Iterable[Any], enabled: bool = True,
             depth: int = PREFETCH, ahead: Callable[[Any], None] | None = None) -> Iterator[Any]:
    """`fn(item)` for each item in order; when `enabled`, computed up to `depth` items ahead in one background
    thread (the reads of a streamed batch overlap the training step of the one before). With `ahead`, that thread
    calls `ahead(item)` `depth` items before `fn(item)` (`CachedData.read_ahead`: the disk reads a later batch's
    rows, many at once, while this one is gathered)."""
    if not enabled:
        for item in items:
            yield fn(item)
        return
    call = fn
    if ahead is not None:
        items = _with_ahead(items, depth)

        def call(pair: tuple[Any, list[Any]]) -> Any:
            for later in pair[1]:
                ahead(later)
            return fn(pair[0])

    it = iter(items)
    pending: deque[Future[Any]] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="mmcache-prefetch") as pool:
        try:
            for item in it:
                pending.append(pool.submit(call, item))
                if len(pending) >= depth:
                    break
            while pending:
                done = pending.popleft().result()
                nxt = next(it, _END)
                if nxt is not _END:
                    pending.append(pool.submit(call, nxt))
                yield done
        finally:
            for f in pending:
                f.cancel()


def _with_ahead(items: Iterable[Any], depth: int) -> Iterator[tuple[Any, list[Any]]]:
    """(item, the items to read ahead before it) for each item in order: items 0..depth with the first, then each
    item `depth` places on with the one it follows, so every item is read ahead once, `depth` items early."""
    it, buf = iter(items), deque[Any]()
    while True:
        new = []
        while len(buf) <= depth and (x := next(it, _END)) is not _END:
            buf.append(x)
            new.append(x)
        if not buf:
            return
        yield buf.popleft(), new


_END = object()


@dataclass
class CachedData:
    """All rows of a dataset that every requested store holds, as tensors on one device."""

    dataset: str
    ids: list[str]
    split_index: dict[str, torch.Tensor]  # split -> LongTensor of row positions
    features: Features  # modality -> key -> [N, ...] tensor
    targets: dict[str, torch.Tensor]  # task -> [N] long, IGNORE where unlabeled
    labels: LabelSpace
    inputs: InputSpec
    teacher: torch.Tensor | None = None
    dropped: dict[str, int] = field(default_factory=dict)  # "<modality>/<name>" -> rows missing there
    specs: dict[str, str] = field(default_factory=dict)  # "<modality>/<name>" -> spec hash
    store_specs: dict[str, dict[str, Any]] = field(default_factory=dict)  # "<modality>/<name>" -> full spec, dtype
    fold: int | None = None  # the manifest's cross-validation fold (None: official splits)
    split_seed: int | None = None  # the manifest's split seed
    manifest_split_index: dict[str, torch.Tensor] | None = None  # splits as the manifest has them
    val_fraction: float = 0.1
    carved_seed: int | None = None  # seed of the val rows carved from train (None: the manifest has val)
    manifest: Manifest | None = None  # the manifest the rows came from (every row, dropped ones included)
    load: str = "memory"  # "memory": tensors; "stream": StreamedRows read from the stores per batch
    load_seconds: float = 0.0  # what `load_cached` took (manifest, id alignment, and the rows in memory mode)
    shard: RankShard = field(default_factory=RankShard)  # data-parallel training: the rows this rank trains on

    def for_seed(self, seed: int) -> CachedData:
        """The same tensors with the validation rows a run with `seed` uses: unchanged when the manifest has
        a val split; else `val_fraction` of train carved with `seed` (as `load_cached(..., seed=seed)`)."""
        if self.carved_seed is None or self.carved_seed == seed or self.manifest_split_index is None:
            return self
        split_index = _carve_val(self.manifest_split_index, self.targets[self.labels.primary], self.val_fraction, seed)
        return replace(self, split_index=split_index, carved_seed=seed)

    def for_fold(self, fold: int, k: int = 10) -> CachedData:
        """The same tensors with the splits of fold `fold` of `k`-fold cross-validation, as the dataset defines
        them (`mmcache extract --fold K` writes the same splits for k=10): the features do not depend on the
        fold, only the split does. Refused for a dataset with its own splits, and for a manifest whose splits
        are not the ones its recorded fold/seed give over its rows (a part of the dataset, or edited)."""
        from mmcache.data.io import assign_splits

        man = self.manifest
        if man is None or man.split_seed is None:
            raise MMCacheError(f"{self.dataset!r} has its own splits (its manifest records no generated fold/seed); "
                               "cross-validation folds exist for datasets whose splits are generated (mvsa-single, "
                               "mvsa-multiple, a table or webdataset without splits)")
        # The adapters draw splits from the primary task's labels, -1 where a row has none.
        y = [int(v) if v != IGNORE else -1 for v in man.targets[man.labels.primary]]
        if assign_splits(y, seed=man.split_seed, fold=man.fold) != man.splits:
            held = f"fold {man.fold}" if man.fold is not None else "8:1:1"
            raise MMCacheError(f"the {held} splits in the manifest of {self.dataset!r} are not the ones seed "
                               f"{man.split_seed} gives over its {len(man.ids)} rows (it lists a part of the dataset, "
                               f"e.g. after `--limit`, or was edited); run `mmcache extract {self.dataset}` over the "
                               "whole dataset before cross-validating")
        if k > len(y):
            raise MMCacheError(f"--folds {k}: {self.dataset!r} has {len(y)} rows, fewer than the folds; use at most "
                               f"--folds {len(y)} (10 is usual)")
        splits = np.asarray(assign_splits(y, seed=man.split_seed, fold=fold, k=k))
        pos = {sid: j for j, sid in enumerate(man.ids)}
        mine = splits[np.fromiter((pos[i] for i in self.ids), dtype=np.int64, count=len(self.ids))]
        dev = self.targets[self.labels.primary].device
        split_index = {s: torch.from_numpy(np.flatnonzero(mine == s)).to(dev) for s in ("train", "val", "test")}
        return replace(self, split_index=split_index, manifest_split_index=split_index, carved_seed=None, fold=fold)

    @property
    def tasks(self) -> dict[str, int]:
        """task -> number of classes."""
        return {t: len(v) for t, v in self.labels.tasks.items()}

    @property
    def device(self) -> torch.device:
        """Where targets, split indices and batches live."""
        return next(iter(self.targets.values())).device if self.targets else torch.device("cpu")

    @property
    def streamed(self) -> bool:
        return self.load == "stream"

    def batch(self, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> Features:
        """Features of rows `idx` on the data's device, floats cast to `dtype` (stores may be float16): one gather
        of each array (from memory, or from the stores when streamed), then the cast."""
        dev = self.device
        out: Features = {}
        for m, d in self.features.items():
            out[m] = {}
            for k, v in d.items():
                t = v.index_select(0, idx)  # a row gather several times faster than advanced indexing on CPU
                if t.device != dev:  # streamed rows: host -> device in the stored dtype, through pinned memory
                    t = (t.pin_memory() if dev.type == "cuda" else t).to(dev, non_blocking=True)
                out[m][k] = t.to(dtype) if t.is_floating_point() else t
        return out

    def batches(self, idxs: Iterable[torch.Tensor], dtype: torch.dtype = torch.float32) -> Iterator[Features]:
        """`batch(idx)` for each `idx` in order; a streamed dataset reads the next ones in a background thread."""
        return prefetch(lambda i: self.batch(i, dtype), idxs, enabled=self.streamed, ahead=self.ahead)

    @property
    def ahead(self) -> Callable[[torch.Tensor], None] | None:
        """`read_ahead` where some streamed array is read at random places, else None (nothing to read ahead)."""
        return self.read_ahead if self._random_rows() else None

    def read_ahead(self, idx: torch.Tensor) -> None:
        """Start the disk on rows `idx` of every streamed array larger than the page cache keeps, in the background
        (nothing for rows in memory or that stay cached: the advice would cost more than it saves)."""
        for v in self._random_rows():
            v.read_ahead(idx)

    def _random_rows(self) -> list[StreamedRows]:
        """The streamed arrays read at random places (`StreamedRows.random`)."""
        return [v for d in self.features.values() for v in d.values() if isinstance(v, StreamedRows) and v.random]

    def chunks(self, idx: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> Iterator[Features]:
        """Features of rows `idx` in consecutive chunks of at most `size` rows and about `CHUNK_BYTES` (evaluation:
        never a whole split at once)."""
        size = max(1, min(size, CHUNK_BYTES // max(1, self.row_bytes(dtype))))
        return self.batches((idx[s:s + size] for s in range(0, len(idx), size)), dtype)

    def row_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes one row of every array takes in a batch, floats as `dtype`."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(int(np.prod(v.shape[1:], dtype=np.int64)) * (size if v.is_floating_point() else v.dtype.itemsize)
                   for d in self.features.values() for v in d.values())

    def class_counts(self, split: str = "train") -> dict[str, torch.Tensor]:
        """task -> [C] label counts in `split` (for class weights, balanced alphas, oversampling)."""
        idx = self.split_index.get(split, torch.zeros(0, dtype=torch.long))
        out = {}
        for t, n in self.tasks.items():
            y = self.targets[t][idx.to(self.targets[t].device)]
            y = y[y != IGNORE]
            out[t] = torch.bincount(y.cpu(), minlength=n)
        return out


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def load_cached(dataset: str, modalities: dict[str, str], cache_dir: Path | str = "cache",
                keys: Iterable[str] | None = None, tasks: list[str] | None = None, teacher: str | None = None,
                device: str = "cpu", dtype: torch.dtype | None = None, val_fraction: float = 0.1,
                seed: int = 0, manifest: Path | None = None, fold: int | None = None,
                quiet: bool = False, load: str = "auto") -> CachedData:
    """The stores `modalities` ({modality: store name}) of `dataset` and its manifest, aligned by id.

    `keys`: arrays to load per store (None = all the store holds). Rows missing from any store
    (failed or not extracted) are dropped from all modalities, with a printed count. Floats keep the
    store's dtype (`batch` casts per batch) unless `dtype` is given. `load`: "memory" (the rows as tensors on
    `device`; refused in one line, before anything is read, when they cannot fit), "stream" (read from the
    stores per batch), "auto" (memory when they fit with room to spare). Without a `val` split, `val_fraction`
    of train becomes validation (seeded). `fold`: the cross-validation fold the manifest must hold (an error
    when it holds another).
    """
    if not modalities:
        raise MMCacheError("no feature stores selected; pass at least one of --vtype/--ttype/--ctype/--atype/"
                           "--videotype")
    t_start = time.perf_counter()
    man_path = Path(manifest) if manifest else manifest_path(cache_dir, dataset)
    if not man_path.is_file():  # no such dataset here: the manifest's one-line error, before any store's
        Manifest.read(man_path)
    readers = _open_readers(dataset, modalities, cache_dir, teacher)
    wanted = {tag: _wanted(r, keys) for tag, r in readers.items() if not tag.startswith("teacher/")}
    if load != "stream":
        _read_ahead(readers, wanted)
    man = Manifest.read(man_path)
    _check_stores_of(man, readers)
    labels = _manifest_labels(man, dataset, fold, tasks)
    keep, dropped = _rows_in_every_store(man, dataset, readers)
    ids = list(man.ids) if keep.all() else [i for i, k in zip(man.ids, keep, strict=True) if k]
    splits = man.split_array[keep]

    dev = torch.device(device)
    need = sum(len(ids) * r.row_bytes(k) for tag, r in readers.items() for k in wanted.get(tag, []))
    mode = choose_load(load, need, f"the features of {dataset!r} ({len(ids):,} rows of {', '.join(wanted)})")
    # Streamed rows that do not fit with room to spare (as `--load auto` decides: this process's memory limit caps
    # its page cache too, and its own memory takes part of it) are read at random places on every epoch: advised as
    # such and read ahead per batch (`StreamedRows`).
    random = mode == "stream" and (load == "auto" or choose_load("auto", need, "") == "stream")
    arrays = _read_arrays(readers, ids, wanted, mode, dtype, dev, random)
    # Printed as the missing-rows warning is, quiet or not: they are problems of the data. Streamed rows are not
    # read up front (heads treat a non-finite row as missing that modality; `mmcache cache verify` lists them).
    if mode == "memory":
        _warn_non_finite(arrays.features, {tag.split("/", 1)[0]: r.path for tag, r in readers.items()}, ids)
    targets = {t: torch.from_numpy(man.targets[t][keep]).to(dev) for t in labels.tasks}
    _warn_classes_without_train_rows(labels, targets, splits)
    split_index = {s: torch.from_numpy(np.flatnonzero(splits == s)).to(dev) for s in dict.fromkeys(splits.tolist())}
    if "train" not in split_index:
        raise MMCacheError(f"manifest of {dataset!r} has no `train` rows (splits: {list(split_index)})")
    manifest_split_index = split_index
    carved_seed = None
    if "val" not in split_index:
        split_index = _carve_val(split_index, targets[labels.primary], val_fraction, seed)
        carved_seed = seed
        if not quiet:
            _warn(f"no `val` split in {dataset!r}: using {len(split_index['val'])} train rows ({val_fraction:.0%}, "
                  f"seed {seed}) for validation")
    return CachedData(dataset=dataset, ids=ids, split_index=split_index, features=arrays.features, targets=targets,
                      labels=labels, inputs=arrays.inputs, teacher=arrays.teacher, dropped=dropped, specs=arrays.specs,
                      store_specs=arrays.store_specs, fold=man.fold, split_seed=man.split_seed,
                      manifest_split_index=manifest_split_index, val_fraction=val_fraction, carved_seed=carved_seed,
                      manifest=man, load=mode, load_seconds=time.perf_counter() - t_start)


def _manifest_labels(man: Manifest, dataset: str, fold: int | None, tasks: list[str] | None) -> LabelSpace:
    """The label space of the tasks asked for (None: all the manifest has); an error when the manifest holds
    another fold than `fold`, or lacks a task."""
    if fold is not None and man.fold != fold:
        held = f"fold {man.fold}" if man.fold is not None else "the official splits (no fold)"
        raise MMCacheError(f"the manifest of {dataset!r} holds {held}, not fold {fold}; re-run "
                           f"`mmcache extract {dataset} --fold {fold}` (stores are reused) to write that fold's splits")
    labels = man.labels
    if tasks:
        unknown = [t for t in tasks if t not in labels.tasks]
        if unknown:
            raise MMCacheError(f"unknown task(s) {unknown} for dataset {dataset!r}; tasks are {list(labels.tasks)}")
        labels = LabelSpace(tasks={t: labels.tasks[t] for t in tasks}, metric=labels.metric)
    return labels


def _open_readers(dataset: str, modalities: dict[str, str], cache_dir: Path | str,
                  teacher: str | None) -> dict[str, StoreReader]:
    """"<modality>/<name>" -> reader of each store asked for, teachers ("teacher/<name>", several: "nli,clip")
    included; an error for a teacher store without logits."""
    readers: dict[str, StoreReader] = {}
    for mod, name in modalities.items():
        readers[f"{mod}/{name}"] = StoreReader(store_path(cache_dir, dataset, mod, name))
    for name in (teacher or "").split(","):  # several teachers: --teacher nli,clip
        if not name.strip():
            continue
        tag = f"teacher/{name.strip()}"
        readers[tag] = StoreReader(store_path(cache_dir, dataset, "teacher", name.strip()))
        if "logits" not in readers[tag].keys:
            raise MMCacheError(f"{readers[tag].path} holds no `logits` array; a teacher store needs per-row logits")
    return readers


def _read_ahead(readers: dict[str, StoreReader], wanted: dict[str, list[str]]) -> None:
    """Start the disk on the rows a load into memory reads, in the background, while the manifest is read and the
    ids aligned: only when every store's rows fit with room to spare (as `--load auto` keeps them in memory), so a
    store larger than memory is never read ahead whole."""
    need = sum(len(r) * r.row_bytes(k) for tag, r in readers.items() for k in wanted.get(tag, []))
    if choose_load("auto", need, "the stores' rows") == "memory":
        for tag, keys in wanted.items():
            readers[tag].read_ahead(keys)


def _check_stores_of(man: Manifest, readers: dict[str, StoreReader]) -> None:
    """An error for a store of another dataset than the manifest's."""
    for r in readers.values():  # a store copied in from another dataset: its rows are not these rows
        of = r.attrs.get("dataset")
        if man.name and of and of != man.name:
            raise MMCacheError(f"{r.path} holds features of dataset {of!r}, but its manifest {man.path} is of {man.name!r}; "
                               f"extract this store for {man.name!r} (`mmcache extract`) or use another store name")


def _rows_in_every_store(man: Manifest, dataset: str, readers: dict[str, StoreReader]) -> tuple[np.ndarray, dict[str, int]]:
    """[len(manifest)] bool: the manifest's rows every store holds; and per store, the rows it lacks (warned)."""
    keep = np.ones(len(man.ids), dtype=bool)
    dropped: dict[str, int] = {}
    for tag, r in readers.items():
        if r.ids == man.ids:  # the store holds every row in manifest order (the usual case): no id lookups
            continue
        have = np.fromiter((i in r.index for i in man.ids), dtype=bool, count=len(man.ids))
        miss = int((~have).sum())
        if miss:
            n_failed = sum(1 for i in man.ids if i in r.failed)
            dropped[tag] = miss
            _warn(f"{miss} of {len(man.ids)} rows are missing from {r.path} ({n_failed} failed, "
                  f"{miss - n_failed} not extracted); dropped from all modalities")
        keep &= have
    if not keep.any():
        raise MMCacheError(f"no row of {dataset!r} is present in every selected store ({', '.join(readers)}); "
                           "run `mmcache extract` for them")
    if dropped:
        _warn(f"training on {int(keep.sum())} of {len(man.ids)} rows")
    return keep, dropped


@dataclass
class _Arrays:
    """What `_read_arrays` gives: the features, their shapes, the teacher logits and the stores' specs."""

    features: Features
    inputs: InputSpec
    teacher: torch.Tensor | None
    specs: dict[str, str]
    store_specs: dict[str, dict[str, Any]]


def _read_arrays(readers: dict[str, StoreReader], ids: list[str], wanted: dict[str, list[str]], mode: str,
                 dtype: torch.dtype | None, dev: torch.device, random: bool = False) -> _Arrays:
    """The arrays `wanted` of each store for rows `ids`: tensors on `dev` in memory mode (floats as `dtype` when
    given), `StreamedRows` in stream mode (`random`: larger than the page cache keeps); teachers' logits always in
    memory, as float32."""
    out = _Arrays({}, {}, None, {}, {})
    teachers: list[tuple[Path, torch.Tensor]] = []
    for tag, r in readers.items():
        mod = tag.split("/", 1)[0]
        out.specs[tag] = str(r.attrs.get("spec_hash", ""))
        # What rebuilds the extractor later (prediction on new data), even once the store is gone.
        out.store_specs[tag] = {"spec": r.spec, "dtype": str(r.attrs.get("dtype", "float32"))}
        if mod == "teacher":
            arr = r.load(ids, keys=["logits"])["logits"]
            teachers.append((r.path, torch.from_numpy(np.ascontiguousarray(arr)).float().to(dev)))
            continue
        rows = r.rows(ids)
        run = _contiguous_run(rows)
        feats: dict[str, Any] = {}
        if mode == "stream":
            for k in wanted[tag]:
                feats[k] = StreamedRows(r, k, run or rows, random=random)
        else:
            for k, t in _in_memory(r, rows, run, wanted[tag]).items():
                if t.is_floating_point() and dtype is not None:
                    t = t.to(dtype)
                feats[k] = t.to(dev)
        out.features[mod] = feats
        out.inputs[mod] = {k: tuple(int(s) for s in v.shape[1:]) for k, v in feats.items()}
    out.teacher = _stack_teachers(teachers)
    return out


def _contiguous_run(rows: np.ndarray) -> tuple[int, int] | None:
    """(lo, hi) when store rows `rows` are lo, lo+1, ..., hi-1 in this order (every row in store order, the usual
    case), else None."""
    if not len(rows):
        return None
    lo = int(rows[0])
    return (lo, lo + len(rows)) if bool((rows == np.arange(lo, lo + len(rows))).all()) else None


def _in_memory(r: StoreReader, rows: np.ndarray, run: tuple[int, int] | None, keys: list[str]) -> dict[str, torch.Tensor]:
    """Arrays `keys` of store rows `rows` as CPU tensors in the store's dtype. A contiguous run of rows is the store's
    copy-on-write memory map (`StoreReader.memmap`): the rows sit in the page cache, mapped, and nothing is copied;
    fresh memory would first have to be faulted in page by page, which costs more than the read itself. Floating-point
    arrays are mapped page by page by the non-finite check that reads them next (`_warn_non_finite`), as the disk
    delivers the rows read ahead (`_read_ahead`), so the check overlaps the read; other arrays are read in and
    mapped here (`populate`). Rows in another order are gathered into fresh arrays (`StoreReader.load_rows`)."""
    if run is None:
        return {k: torch.from_numpy(a) for k, a in r.load_rows(rows, keys).items()}
    return {k: torch.from_numpy(r.memmap(k, run, populate=r.dtypes[k].kind != "f", copy_on_write=True)) for k in keys}


def _wanted(r: StoreReader, keys: Iterable[str] | None) -> list[str]:
    """The arrays of store `r` a head reads (`keys`, None = all it holds); an error when it holds none of them."""
    want = [k for k in (list(keys) if keys is not None else r.keys) if k in r.keys]
    if not want:
        raise MMCacheError(f"{r.path} holds {r.keys}, none of the arrays this head needs ({list(keys or [])})")
    return want


_EXPONENT = {torch.float16: (torch.int16, np.uint16, 0x7C00), torch.bfloat16: (torch.int16, np.uint16, 0x7F80),
             torch.float32: (torch.int32, np.uint32, 0x7F800000),
             torch.float64: (torch.int64, np.uint64, 0x7FF0000000000000)}


def _non_finite_rows(t: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows of `t` holding a NaN or inf, i.e. a value whose exponent bits are all ones (an integer test,
    several times faster on a CPU than float16 arithmetic). On a CPU in blocks of about `CHECK_BYTES` through one
    reused buffer, so each block is tested while it sits in the core's cache and memory stays small."""
    flat = t.reshape(len(t), int(np.prod(t.shape[1:], dtype=np.int64)))
    if not flat.shape[1]:
        return torch.zeros(len(flat), dtype=torch.bool, device=t.device)
    if t.dtype not in _EXPONENT or t.device.type != "cpu":
        return torch.cat([~torch.isfinite(flat[s:s + 65536]).all(1) for s in range(0, len(flat), 65536)])
    itype, utype, mask = _EXPONENT[t.dtype]
    bits = flat.view(itype).numpy().view(utype)
    step = max(1, CHECK_BYTES // (bits.shape[1] * bits.itemsize))
    buf = np.empty((min(step, len(bits)), bits.shape[1]), dtype=utype)
    out = np.empty(len(bits), dtype=bool)
    for s in range(0, len(bits), step):
        block = buf[:len(bits[s:s + step])]
        np.bitwise_and(bits[s:s + step], utype(mask), out=block)
        np.equal(block.max(1), utype(mask), out=out[s:s + len(block)])
    return torch.from_numpy(out)


def _warn_non_finite(features: Features, paths: dict[str, Path], ids: list[str]) -> None:
    """Warn about rows whose arrays hold NaN or inf: heads treat such a row's modality as missing (zeros), so it
    trains on, but the store is damaged (`mmcache cache verify` lists them)."""
    for mod, feats in features.items():
        for key, t in feats.items():
            if not t.is_floating_point() or not len(t):
                continue
            bad = _non_finite_rows(t)
            n = int(bad.sum())
            if n:
                first = [ids[i] for i in torch.nonzero(bad).flatten()[:3].tolist()]
                _warn(f"{n} rows of {paths[mod]} hold NaN or inf in {key!r} (e.g. {', '.join(map(repr, first))}); "
                      "heads treat them as missing that modality; check with `mmcache cache verify` and re-extract")


def _warn_classes_without_train_rows(labels: LabelSpace, targets: dict[str, torch.Tensor], splits: np.ndarray) -> None:
    """Warn about classes that have no train row: the head cannot learn them, and their val/test rows are errors."""
    train = torch.from_numpy(splits == "train").to(next(iter(targets.values())).device) if targets else None
    for t, names in labels.tasks.items():
        y = targets[t]
        if train is None or not bool(((y != IGNORE) & train).any()):
            continue
        seen = set(torch.unique(y[(y != IGNORE) & train]).tolist())
        absent = [n for i, n in enumerate(names) if i not in seen and bool((y == i).any())]
        if absent:
            _warn(f"task {t!r}: class(es) {absent} have no train rows but occur in other splits; the head cannot "
                  "learn them, so those rows count as errors")


def _stack_teachers(teachers: list[tuple[Path, torch.Tensor]]) -> torch.Tensor | None:
    """One teacher's logits [N,C]; several stacked as [N,n,C] (each must have the same C)."""
    if len(teachers) <= 1:
        return teachers[0][1] if teachers else None
    widths = {p: tuple(t.shape[1:]) for p, t in teachers}
    if len(set(widths.values())) > 1:
        raise MMCacheError("teacher stores must hold the same number of logits per row to be used together: "
                           + ", ".join(f"{p} has {w}" for p, w in widths.items()))
    return torch.stack([t for _, t in teachers], 1)


def _carve_val(split_index: dict[str, torch.Tensor], y: torch.Tensor, frac: float,
               seed: int) -> dict[str, torch.Tensor]:
    from sklearn.model_selection import train_test_split

    train = split_index["train"].cpu().numpy()
    labels = y.cpu().numpy()[train]
    counts = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, dtype=int)
    present = counts[counts > 0]
    # Stratify when every row is labeled and every class has two rows to split.
    strat = labels if (labels >= 0).all() and present.size and present.min() >= 2 else None
    tr, va = train_test_split(train, test_size=frac, random_state=seed, stratify=strat)
    out = dict(split_index)
    dev = split_index["train"].device
    out["train"] = torch.from_numpy(np.sort(tr)).to(dev)
    out["val"] = torch.from_numpy(np.sort(va)).to(dev)
    return out
