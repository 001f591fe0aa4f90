"""The manifest of a dataset's cache: `cache/<dataset>/manifest.json`, written by extraction, read by heads and verify.

It lists every sample id the stores were built for, with its split and labels, plus the label space and the
fold/seed of generated splits (both null for a dataset's own splits). Up to `COLUMNS_FROM` rows it is one JSON
file, every row an object, easy to read and edit by hand:

    {"name": "mvsa-single", "fold": 0, "seed": 0,
     "labels": {"tasks": {"sentiment": ["negative", "neutral", "positive"]}, "metric": "accuracy"},
     "samples": [{"id": "1", "split": "train", "labels": {"sentiment": 2}}, ...]}

(rows of a dataset combined from several, `mmhs150k,fakeddit`, also name their `"source"` dataset). A larger
dataset's manifest is two files, so that a million rows open in well under a second and a few hundred MB:
`manifest.json`, a small JSON summary, and beside it the rows as columns in an uncompressed NumPy archive
(`manifest-<digest>.npz`, loaded without pickle) that the summary names with its BLAKE2 digest:

    {"format": "mmcache-manifest/2", "name": "mvsa-single", "fold": 0, "seed": 0,
     "labels": {"tasks": {"sentiment": ["negative", "neutral", "positive"]}, "metric": "accuracy"},
     "rows": 4511, "splits": {"train": 3608, "val": 451, "test": 452},
     "columns": {"file": "manifest-3f2a....npz", "blake2b": "3f2a..."}}

The columns: `ids` (the ids' UTF-8 bytes joined by NUL, which no id holds), `split_codes` into `split_names`,
`label_<task>` (class index per row, -100 where a row has no label) and, for a dataset combined from several
(`mmhs150k,fakeddit`), `source_codes` into `source_names` (-1: none). The summary is renamed into place after its
columns, so a reader sees the old manifest or the new one, never a mix; older columns files are removed then.
Both layouts read whatever their size (`Manifest.write(path, columns=True)` forces the columnar one).

This module is its one reader and writer: `Manifest.read` (checked, cached by content), `Manifest.write`
(atomic), and what extraction needs (`check_replace`, `update`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmcache.data.base import LabelSpace
from mmcache.errors import MMCacheError
from mmcache.utils import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from mmcache.data.base import Dataset

FILENAME = "manifest.json"
FORMAT = "mmcache-manifest/2"
COLUMNS_FROM = 100_000  # manifests of at least this many rows are written as a summary + columns
IGNORE = -100  # target of a row without a label for a task (cross_entropy's ignore_index)
_REWRITE = "run `mmcache extract` again to rewrite it"


def manifest_path(cache_dir: Path | str, dataset: str) -> Path:
    """`cache/<dataset>/manifest.json`: ids, splits and labels of the dataset the stores were built from."""
    return Path(cache_dir) / dataset / FILENAME


def default_manifest(store: Path | str) -> Path:
    """The manifest a store at `cache/<dataset>/<modality>/<name>.h5` belongs to."""
    return Path(store).parent.parent / FILENAME


def _codes(values: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """Values as integer codes into their distinct values (in order of first appearance)."""
    names = list(dict.fromkeys(values))
    pos = {v: i for i, v in enumerate(names)}
    dtype = np.int8 if len(names) < 127 else np.int32
    return np.fromiter((pos[v] for v in values), dtype=dtype, count=len(values)), names


@dataclass(frozen=True)
class Manifest:
    """Ids, splits and labels of a dataset's rows, in dataset order, with its label space and split fold/seed."""

    name: str  # the dataset's name ("" in a manifest that records none)
    labels: LabelSpace
    ids: list[str]
    splits: list[str]
    label_columns: dict[str, np.ndarray]  # task -> [N] int64 class index per row, IGNORE where a row has none
    fold: int | None = None  # cross-validation fold whose splits the manifest holds (None: official splits)
    seed: int | None = None  # seed of generated splits / folds
    path: Path | None = field(default=None, compare=False)  # the file it was read from
    row_sources: list[str | None] = field(default_factory=list)  # per row: its source dataset (empty: one dataset)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return (self.name, self.labels, self.ids, self.splits, self.fold, self.seed, self.row_sources) == \
            (other.name, other.labels, other.ids, other.splits, other.fold, other.seed, other.row_sources) and \
            self.label_columns.keys() == other.label_columns.keys() and \
            all(np.array_equal(v, other.label_columns[k]) for k, v in self.label_columns.items())

    __hash__ = None  # type: ignore[assignment]

    @property
    def split_seed(self) -> int | None:
        """The seed of generated splits (None for a dataset's own splits)."""
        return self.seed

    @cached_property
    def targets(self) -> dict[str, np.ndarray]:
        """task -> [N] int64 class index per row, IGNORE where a row has no label (read-only arrays), for the tasks
        of the label space."""
        out = {}
        for t in self.labels.tasks:
            arr = np.array(self.label_columns[t], dtype=np.int64) if t in self.label_columns \
                else np.full(len(self.ids), IGNORE, dtype=np.int64)
            arr.flags.writeable = False
            out[t] = arr
        return out

    @cached_property
    def split_array(self) -> np.ndarray:
        """The splits as one NumPy array of names, [N]."""
        codes, names = _codes(self.splits)
        return np.asarray(names or [""], dtype=str)[codes] if len(codes) else np.zeros(0, dtype=str)

    @cached_property
    def row_labels(self) -> list[dict[str, int]]:
        """Per row: task -> class index (tasks without a label left out)."""
        cols = {t: v.tolist() for t, v in self.label_columns.items()}
        return [{t: c[i] for t, c in cols.items() if c[i] != IGNORE} for i in range(len(self.ids))]

    def split_ids(self, split: str | None = None) -> list[str]:
        """Ids of one split (or all), in dataset order; an error naming the splits there are."""
        if split is None:
            return list(self.ids)
        ids = [i for i, s in zip(self.ids, self.splits, strict=True) if s == split]
        if not ids:
            raise MMCacheError(f"manifest {self._where} has no split {split!r}; its splits are "
                               f"{sorted(set(self.splits))}")
        return ids

    @property
    def _where(self) -> str:
        return str(self.path) if self.path is not None else f"of {self.name!r}"

    # -- building and writing ----------------------------------------------------------

    @classmethod
    def from_rows(cls, name: str, labels: LabelSpace, ids: list[str], splits: list[str],
                  row_labels: Sequence[dict[str, int]], fold: int | None = None, seed: int | None = None,
                  row_sources: list[str | None] | None = None) -> Manifest:
        """A manifest from per-row label dicts (task -> class index)."""
        tasks = list(dict.fromkeys([*labels.tasks, *(t for r in row_labels for t in r)]))
        cols = {t: np.fromiter((r.get(t, IGNORE) for r in row_labels), dtype=np.int64, count=len(row_labels))
                for t in tasks}
        sources = list(row_sources or [])
        return cls(name=name, labels=labels, ids=ids, splits=splits, label_columns=cols, fold=fold, seed=seed,
                   row_sources=sources if any(s is not None for s in sources) else [])

    @classmethod
    def from_dataset(cls, ds: Dataset, ids: Collection[str] | None = None) -> Manifest:
        """The manifest of `ds` (its rows whose id is in `ids`, default all), keeping its fold and seed."""
        rows = [s for s in ds.samples if ids is None or s.id in ids]
        return cls.from_rows(ds.name, ds.labels, [s.id for s in rows], [s.split for s in rows],
                             [s.labels for s in rows], ds.fold, ds.seed, [s.source for s in rows])

    def to_json(self) -> dict[str, Any]:
        """Every row as one JSON object (the first on-disk layout, still read; see the module docstring)."""
        return {
            "name": self.name,
            "fold": self.fold,
            "seed": self.seed,
            "labels": self.labels.to_json(),
            "samples": [{"id": i, "split": s, "labels": lab, **({"source": src} if src is not None else {})}
                        for i, s, lab, src in zip(self.ids, self.splits, self.row_labels,
                                                  self.row_sources or [None] * len(self.ids), strict=True)],
        }

    def _columns(self) -> dict[str, np.ndarray]:
        codes, names = _codes(self.splits)
        cols: dict[str, np.ndarray] = {
            "ids": np.frombuffer("\0".join(self.ids).encode("utf-8"), dtype=np.uint8),
            "split_codes": codes, "split_names": np.asarray(names, dtype=str)}
        for t, v in self.label_columns.items():
            cols[f"label_{t}"] = np.asarray(v, dtype=np.int64)
        if self.row_sources:
            src, src_names = _codes(self.row_sources)
            known = [n for n in src_names if n is not None]
            remap = np.array([known.index(n) if n is not None else -1 for n in src_names], dtype=np.int32)
            cols["source_codes"] = remap[src] if len(src) else np.zeros(0, dtype=np.int32)
            cols["source_names"] = np.asarray(known, dtype=str)
        return cols

    def write(self, path: Path | str, columns: bool | None = None) -> Path:
        """Write atomically (a kill never leaves a manifest that reads wrong); returns the path. `columns`: the
        summary + columns layout (None: from `COLUMNS_FROM` rows): the columns first, then the summary naming
        them. Columns files beside it that it no longer names are removed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (len(self.ids) >= COLUMNS_FROM if columns is None else columns):
            atomic_write_text(path, json.dumps(self.to_json()))
            _remove_columns(path, keep=None)
            return path
        buf = io.BytesIO()
        np.savez(buf, **self._columns())  # type: ignore[arg-type]  # numpy's stubs take the keywords for allow_pickle
        raw = buf.getvalue()
        digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
        cols = path.with_name(f"{path.stem}-{digest}.npz")
        if not cols.exists():
            atomic_write_bytes(cols, raw)
        summary = {"format": FORMAT, "name": self.name, "fold": self.fold, "seed": self.seed,
                   "labels": self.labels.to_json(), "rows": len(self.ids),
                   "splits": dict(Counter(self.splits)), "columns": {"file": cols.name, "blake2b": digest}}
        atomic_write_text(path, json.dumps(summary, indent=1))
        _remove_columns(path, keep=cols)
        return path

    # -- reading -----------------------------------------------------------------------

    @classmethod
    def from_json(cls, obj: Any, where: str = "manifest") -> Manifest:
        """Parse the JSON of a manifest in the first layout (every row in the JSON); one-line errors name `where`
        (its path) and what is wrong."""
        try:
            samples = obj["samples"]
            if not isinstance(samples, list):
                raise TypeError("'samples' is not a list")
            labels = LabelSpace.from_json(obj["labels"]) if obj.get("labels") is not None else LabelSpace(tasks={})
            raw = [s["id"] for s in samples]
            splits = [str(s["split"]) for s in samples]
            row_labels = [{str(t): int(v) for t, v in (s.get("labels") or {}).items()} for s in samples]
            sources = [None if s.get("source") is None else str(s["source"]) for s in samples]
            fold, seed = _fold_seed(obj)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise MMCacheError(f"{where} is not a valid manifest ({type(e).__name__}: {e}); {_REWRITE}") from None
        # Ids are text; numbers (a hand-written manifest) are taken as their text, as stores keep ids.
        bad = [i for i in raw if isinstance(i, bool) or not isinstance(i, (str, int)) or i == ""]
        if bad:
            raise MMCacheError(f"{where} lists the sample id {bad[0]!r}, which is not a non-empty text; {_REWRITE}")
        ids = [str(i) for i in raw]
        _check_unique(ids, where)
        return cls.from_rows(str(obj.get("name") or ""), labels, ids, splits, row_labels, fold, seed, sources)

    @classmethod
    def _from_columns(cls, obj: dict[str, Any], path: Path) -> Manifest:
        """Parse a summary (`"format": FORMAT`) and the columns file it names."""
        where = str(path)
        try:
            labels = LabelSpace.from_json(obj["labels"]) if obj.get("labels") is not None else LabelSpace(tasks={})
            fold, seed = _fold_seed(obj)
            spec = obj["columns"]
            name, digest, rows = str(spec["file"]), str(spec["blake2b"]), int(obj["rows"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise MMCacheError(f"{where} is not a valid manifest ({type(e).__name__}: {e}); {_REWRITE}") from None
        cols_path = path.parent / name
        if Path(name).name != name or not name.endswith(".npz"):
            raise MMCacheError(f"{where} names the columns file {name!r}, which is not a file beside it; {_REWRITE}")
        try:
            raw = cols_path.read_bytes()
        except OSError as e:
            raise MMCacheError(f"{where}: its columns file {cols_path} cannot be read ({e.strerror or e}); "
                               f"{_REWRITE}") from None
        if hashlib.blake2b(raw, digest_size=16).hexdigest() != digest:
            raise MMCacheError(f"{where}: its columns file {cols_path} does not match the digest the manifest "
                               f"records (changed or damaged); {_REWRITE}")
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                cols = {k: z[k] for k in z.files}
            ids = bytes(cols["ids"]).decode("utf-8").split("\0") if rows else []
            split_names = [str(v) for v in cols["split_names"].tolist()]
            splits = [split_names[c] for c in cols["split_codes"].tolist()]
            label_columns = {k[len("label_"):]: np.asarray(v, dtype=np.int64) for k, v in cols.items()
                             if k.startswith("label_")}
            sources: list[str | None] = []
            if "source_codes" in cols:
                names = [str(v) for v in cols["source_names"].tolist()]
                sources = [names[c] if c >= 0 else None for c in cols["source_codes"].tolist()]
        except (KeyError, ValueError, IndexError, UnicodeDecodeError, OSError) as e:
            raise MMCacheError(f"{where}: its columns file {cols_path} is not valid ({type(e).__name__}: {e}); "
                               f"{_REWRITE}") from None
        lengths = {len(ids), len(splits), *(len(v) for v in label_columns.values()), *([len(sources)] if sources else [])}
        if lengths != {rows}:
            raise MMCacheError(f"{where}: its columns hold {sorted(lengths)} rows, the summary {rows}; {_REWRITE}")
        if rows and (not all(ids) if rows < 2 else "" in ids):
            raise MMCacheError(f"{where} lists an empty sample id; {_REWRITE}")
        _check_unique(ids, where)
        return cls(name=str(obj.get("name") or ""), labels=labels, ids=ids, splits=splits, label_columns=label_columns,
                   fold=fold, seed=seed, row_sources=sources)

    @classmethod
    def read(cls, path: Path | str, labels: bool = True) -> Manifest:
        """Read a manifest (either layout); a clear error when it is missing or malformed.

        With `labels` (for training) the label space must have a task, every task a class, and every row
        label must index a class; without, only ids and splits are needed (verify, loading a split).
        The last few parsed manifests are kept by path and content: train/val/test loads parse once.
        """
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise MMCacheError(f"manifest {path} not found; run `mmcache extract` for this dataset first "
                               "(it writes the manifest next to the stores)") from None
        except OSError as e:
            raise MMCacheError(f"manifest {path} cannot be read ({e})") from None
        # Keyed by content: hashing the bytes costs a fraction of parsing them, and a rewrite is never missed (the
        # summary names its columns by their digest).
        key = (str(path.resolve()), hashlib.blake2b(raw, digest_size=16).digest())
        man = _CACHE.get(key)
        if man is None:
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise MMCacheError(f"{path} is not a valid manifest ({type(e).__name__}: {e}); {_REWRITE}") from None
            if isinstance(obj, dict) and obj.get("format") == FORMAT:
                man = cls._from_columns(obj, path)
            elif isinstance(obj, dict) and "format" in obj:
                raise MMCacheError(f"{path} has manifest format {obj['format']!r}, which this version of mmcache does "
                                   f"not read (it reads {FORMAT!r} and the first layout); {_REWRITE}")
            else:
                man = cls.from_json(obj, str(path))
            man = replace(man, path=path)
            if len(_CACHE) >= 4:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = man
        if labels:
            man.check_labels()
        return man

    def check_labels(self) -> None:
        """The label space has a task, each task a class, and each row label indexes a class of its task."""
        empty = [t for t, names in self.labels.tasks.items() if not names]
        if not self.labels.tasks or empty:  # written by an older version from a blank label column
            raise MMCacheError(f"{self._where}: task {(empty or ['(none)'])[0]!r} has no classes; fill in the "
                               "dataset's labels and run `mmcache extract` again to rewrite the manifest")
        for t, names in self.labels.tasks.items():
            y = self.targets[t]
            off = np.flatnonzero((y != IGNORE) & ((y < 0) | (y >= len(names))))
            if off.size:
                i = int(off[0])
                raise MMCacheError(f"{self._where}: row {self.ids[i]!r} has label {int(y[i])} for task {t!r}, which "
                                   f"has {len(names)} classes ({len(off)} such rows); {_REWRITE}")


_CACHE: dict[tuple[str, bytes], Manifest] = {}


def _remove_columns(path: Path, keep: Path | None) -> None:
    """Columns files of the manifest at `path` other than `keep` (left behind by an earlier write)."""
    for old in path.parent.glob(f"{path.stem}-*.npz"):
        if old != keep:
            old.unlink(missing_ok=True)


def _fold_seed(obj: dict[str, Any]) -> tuple[int | None, int | None]:
    fold, seed = obj.get("fold"), obj.get("split_seed", obj.get("seed"))
    return (None if fold is None else int(fold)), (None if seed is None else int(seed))


def _check_unique(ids: list[str], where: str) -> None:
    if len(set(ids)) == len(ids):
        return
    dup = [k for k, n in Counter(ids).items() if n > 1]
    raise MMCacheError(f"{where} lists {len(dup)} ids twice (e.g. {dup[:3]}); {_REWRITE}")


def read_if_valid(path: Path | str) -> Manifest | None:
    """The manifest at `path`, or None when there is none or it is unreadable (extraction then rewrites it)."""
    try:
        return Manifest.read(path, labels=False)
    except MMCacheError:
        return None


def manifest_ids(path: Path | str, split: str | None = None) -> list[str]:
    """Sample ids listed in a dataset manifest, of one split or all, in dataset order."""
    return Manifest.read(path, labels=False).split_ids(split)


# -- what extraction does with it -------------------------------------------------------


def check_replace(path: Path | str, ds: Dataset, force: bool = False) -> None:
    """Refuse to replace a manifest listing ids that `ds` lacks (another dataset under the same name), unless `force`.

    A manifest whose ids `ds` all has (an earlier `--limit` or `--split` run, another fold) is no conflict.
    """
    old = read_if_valid(path)
    if old is None or force:
        return
    have = set(ds.ids())
    stale = [i for i in old.ids if i not in have]
    if stale:
        raise MMCacheError(
            f"{path} lists {len(stale)} ids not in dataset {ds.name!r} at {ds.root} (e.g. {stale[:3]}): it was "
            "written for another dataset or an older version of this one. Give this dataset its own --name, or "
            "pass --force to replace the manifest (its stores keep the old rows; `mmcache cache verify` lists them)"
        )


def update(path: Path | str, ds: Dataset, selected: Iterable[str]) -> Path:
    """Write the manifest of `ds` over the `selected` ids plus those the manifest at `path` lists already (so an
    earlier `--limit` or `--split` run's rows stay); splits, labels, fold and seed come from `ds`."""
    keep = set(selected)
    old = read_if_valid(path)
    if old is not None:
        keep.update(old.ids)
    return Manifest.from_dataset(ds, keep).write(path)
