"""Contract 3: the HDF5 feature store, one file per (dataset, modality, name).

Rows are keyed by sample id. Writes are append-only: each batch is written, flushed,
and only then counted as committed (`n_committed`), so a killed run loses at most the
batch in flight. Attributes are JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mmcache.errors import MMCacheError

DEFAULT_CACHE = Path("cache")


def store_path(cache_dir: Path | str, dataset: str, modality: str, name: str) -> Path:
    """`cache/<dataset>/<modality>/<name>.h5`."""
    return Path(cache_dir) / dataset / modality / f"{name}.h5"


def manifest_path(cache_dir: Path | str, dataset: str) -> Path:
    """`cache/<dataset>/manifest.json`: ids, splits and labels of the dataset the stores were built from."""
    return Path(cache_dir) / dataset / "manifest.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class FeatureStore:
    """Writer: appends batches of rows keyed by id; refuses a store built with another spec."""

    def __init__(self, path: Path | str, spec: dict[str, Any], dataset: str, dtype: str = "float16",
                 versions: dict[str, str] | None = None) -> None:
        from mmcache.extract.base import spec_hash

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.hash = spec_hash(spec)
        new = not self.path.exists()
        self.f = h5py.File(self.path, "a")
        if new or "spec" not in self.f.attrs:
            self.f.attrs["spec"] = json.dumps(spec, sort_keys=True)
            self.f.attrs["spec_hash"] = self.hash
            self.f.attrs["dataset"] = dataset
            self.f.attrs["dtype"] = self.dtype.name
            self.f.attrs["versions"] = json.dumps(versions or {})
            self.f.attrs["created"] = _now()
            self.f.attrs["failed"] = "{}"
            self.f.attrs["n_committed"] = 0
        elif self.f.attrs["spec_hash"] != self.hash:
            old = self.f.attrs["spec"]
            self.f.close()
            raise MMCacheError(
                f"{self.path} was built with a different spec:\n  store: {old}\n  asked: "
                f"{json.dumps(spec, sort_keys=True)}\nremove it (`mmcache cache rm {self.path}`) or write elsewhere"
            )
        n = int(self.f.attrs["n_committed"])
        self._committed = [x.decode() for x in self.f["ids"][:n]] if "ids" in self.f else []
        self.failed: dict[str, str] = json.loads(self.f.attrs["failed"])

    @property
    def done(self) -> set[str]:
        """Ids committed or recorded as failed (a rerun skips them)."""
        return set(self._committed)

    def write(self, ids: list[str], arrays: dict[str, np.ndarray]) -> None:
        """Append one batch of rows and commit it (flushed before it counts)."""
        n0 = len(self._committed)
        n1 = n0 + len(ids)
        if "ids" not in self.f:
            self.f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(1024,))
        self._put("ids", np.asarray(ids, dtype=object), n0, n1)
        for key, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.dtype.kind == "f":
                arr = arr.astype(self.dtype)
            self._put(key, arr, n0, n1)
        self.f.flush()
        self.f.attrs["n_committed"] = n1
        self.f.attrs["updated"] = _now()
        self.f.flush()
        self._committed.extend(ids)

    def _put(self, key: str, arr: np.ndarray, n0: int, n1: int) -> None:
        if key not in self.f:
            chunk = (max(1, min(256, (1 << 20) // max(1, arr[0].nbytes))),) + arr.shape[1:]
            self.f.create_dataset(key, shape=(0,) + arr.shape[1:], maxshape=(None,) + arr.shape[1:],
                                  dtype=arr.dtype if key == "ids" else arr.dtype, chunks=chunk)
        ds = self.f[key]
        ds.resize(n1, axis=0)
        ds[n0:n1] = arr

    def fail(self, sample_id: str, reason: str) -> None:
        """Record that `sample_id` could not be extracted, and why."""
        self.failed[sample_id] = reason
        self.f.attrs["failed"] = json.dumps(self.failed)
        self.f.flush()

    def close(self) -> None:
        """Flush and close the file."""
        if self.f.id.valid:
            self.f.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoreReader:
    """Reads committed rows of a store, aligned to requested ids."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise MMCacheError(f"feature store {self.path} not found; run `mmcache extract` first")
        try:
            with h5py.File(self.path, "r") as f:
                self.attrs = {k: f.attrs[k] for k in f.attrs}
                n = int(f.attrs.get("n_committed", 0))
                self.ids = [x.decode() for x in f["ids"][:n]] if "ids" in f else []
                self.shapes = {k: f[k].shape[1:] for k in f if k != "ids"}
                self.dtypes = {k: f[k].dtype for k in f if k != "ids"}
        except OSError as e:
            raise MMCacheError(f"{self.path} is not a readable HDF5 store ({e}); remove it and extract again") from None
        self.spec: dict[str, Any] = json.loads(self.attrs["spec"])
        self.failed: dict[str, str] = json.loads(self.attrs.get("failed", "{}"))
        self.index = {k: i for i, k in enumerate(self.ids)}

    @property
    def keys(self) -> list[str]:
        """Names of the arrays per row (pooled, tokens, mask, ...)."""
        return list(self.shapes)

    def load(self, ids: list[str] | None = None, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays for `ids` (default: all committed rows), in that order; missing ids are an error."""
        keys = keys or self.keys
        n = len(self.ids)
        with h5py.File(self.path, "r") as f:
            full = {k: f[k][:n] for k in keys}
        if ids is None:
            return full
        missing = [i for i in ids if i not in self.index]
        if missing:
            raise MMCacheError(
                f"{self.path}: {len(missing)} requested ids are not in the store (e.g. {missing[:3]}); "
                "run `mmcache extract` again to fill them"
            )
        rows = np.fromiter((self.index[i] for i in ids), dtype=np.int64, count=len(ids))
        return {k: v[rows] for k, v in full.items()}
