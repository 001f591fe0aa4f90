"""The manifest of a dataset's cache: `cache/<dataset>/manifest.json`, written by extraction, read by heads and verify.

It lists every sample id the stores were built for, with its split and labels, plus the label space and the
fold/seed of generated splits (both null for a dataset's own splits). The JSON layout:

    {"name": "mvsa-single", "fold": 0, "seed": 0,
     "labels": {"tasks": {"sentiment": ["negative", "neutral", "positive"]}, "metric": "accuracy"},
     "samples": [{"id": "1", "split": "train", "labels": {"sentiment": 2}}, ...]}

Rows of a dataset combined from several (`mmhs150k,fakeddit`) also name their `"source"` dataset.

This module is its one reader and writer: `Manifest.read` (checked, cached by content), `Manifest.write`
(atomic), and what extraction needs (`check_replace`, `update`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmcache.data.base import LabelSpace
from mmcache.errors import MMCacheError
from mmcache.utils import atomic_write_text

if TYPE_CHECKING:
    from mmcache.data.base import Dataset

FILENAME = "manifest.json"
IGNORE = -100  # target of a row without a label for a task (cross_entropy's ignore_index)
_REWRITE = "run `mmcache extract` again to rewrite it"


def manifest_path(cache_dir: Path | str, dataset: str) -> Path:
    """`cache/<dataset>/manifest.json`: ids, splits and labels of the dataset the stores were built from."""
    return Path(cache_dir) / dataset / FILENAME


def default_manifest(store: Path | str) -> Path:
    """The manifest a store at `cache/<dataset>/<modality>/<name>.h5` belongs to."""
    return Path(store).parent.parent / FILENAME


@dataclass(frozen=True)
class Manifest:
    """Ids, splits and labels of a dataset's rows, in dataset order, with its label space and split fold/seed."""

    name: str  # the dataset's name ("" in a manifest that records none)
    labels: LabelSpace
    ids: list[str]
    splits: list[str]
    row_labels: list[dict[str, int]]  # per row: task -> class index (tasks without a label left out)
    fold: int | None = None  # cross-validation fold whose splits the manifest holds (None: official splits)
    seed: int | None = None  # seed of generated splits / folds
    path: Path | None = field(default=None, compare=False)  # the file it was read from
    row_sources: list[str | None] = field(default_factory=list)  # per row: its source dataset (empty: one dataset)

    @property
    def split_seed(self) -> int | None:
        """The seed of generated splits (None for a dataset's own splits)."""
        return self.seed

    @cached_property
    def targets(self) -> dict[str, np.ndarray]:
        """task -> [N] int64 class index per row, IGNORE where a row has no label (read-only arrays)."""
        out = {}
        for t in self.labels.tasks:
            arr = np.array([r.get(t, IGNORE) for r in self.row_labels], dtype=np.int64)
            arr.flags.writeable = False
            out[t] = arr
        return out

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
    def from_dataset(cls, ds: Dataset, ids: Collection[str] | None = None) -> Manifest:
        """The manifest of `ds` (its rows whose id is in `ids`, default all), keeping its fold and seed."""
        rows = [s for s in ds.samples if ids is None or s.id in ids]
        sources = [s.source for s in rows]
        return cls(name=ds.name, labels=ds.labels, ids=[s.id for s in rows], splits=[s.split for s in rows],
                   row_labels=[dict(s.labels) for s in rows], fold=ds.fold, seed=ds.seed,
                   row_sources=sources if any(sources) else [])

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk (the layout in the module docstring)."""
        return {
            "name": self.name,
            "fold": self.fold,
            "seed": self.seed,
            "labels": self.labels.to_json(),
            "samples": [{"id": i, "split": s, "labels": lab, **({"source": src} if src is not None else {})}
                        for i, s, lab, src in zip(self.ids, self.splits, self.row_labels,
                                                  self.row_sources or [None] * len(self.ids), strict=True)],
        }

    def write(self, path: Path | str) -> Path:
        """Write atomically (a kill never leaves half a manifest); returns the path."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_json()))
        return path

    # -- reading -----------------------------------------------------------------------

    @classmethod
    def from_json(cls, obj: Any, where: str = "manifest") -> Manifest:
        """Parse the JSON of a manifest; one-line errors name `where` (its path) and what is wrong."""
        try:
            samples = obj["samples"]
            if not isinstance(samples, list):
                raise TypeError("'samples' is not a list")
            labels = LabelSpace.from_json(obj["labels"]) if obj.get("labels") is not None else LabelSpace(tasks={})
            raw = [s["id"] for s in samples]
            splits = [str(s["split"]) for s in samples]
            row_labels = [{str(t): int(v) for t, v in (s.get("labels") or {}).items()} for s in samples]
            sources = [None if s.get("source") is None else str(s["source"]) for s in samples]
            fold, seed = obj.get("fold"), obj.get("split_seed", obj.get("seed"))
            fold = None if fold is None else int(fold)
            seed = None if seed is None else int(seed)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise MMCacheError(f"{where} is not a valid manifest ({type(e).__name__}: {e}); {_REWRITE}") from None
        # Ids are text; numbers (a hand-written manifest) are taken as their text, as stores keep ids.
        bad = [i for i in raw if isinstance(i, bool) or not isinstance(i, (str, int)) or i == ""]
        if bad:
            raise MMCacheError(f"{where} lists the sample id {bad[0]!r}, which is not a non-empty text; {_REWRITE}")
        ids = [str(i) for i in raw]
        dup = [k for k, n in Counter(ids).items() if n > 1]
        if dup:
            raise MMCacheError(f"{where} lists {len(dup)} ids twice (e.g. {dup[:3]}); {_REWRITE}")
        return cls(name=str(obj.get("name") or ""), labels=labels, ids=ids, splits=splits, row_labels=row_labels,
                   fold=fold, seed=seed, row_sources=sources if any(sources) else [])

    @classmethod
    def read(cls, path: Path | str, labels: bool = True) -> Manifest:
        """Read a manifest; a clear error when it is missing or malformed.

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
        # Keyed by content: hashing the bytes costs a fraction of parsing them, and a rewrite is never missed.
        key = (str(path.resolve()), hashlib.blake2b(raw, digest_size=16).digest())
        man = _CACHE.get(key)
        if man is None:
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise MMCacheError(f"{path} is not a valid manifest ({type(e).__name__}: {e}); {_REWRITE}") from None
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
