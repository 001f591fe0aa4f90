"""`mmcache cache import`: a feature store from arrays computed elsewhere ("bring your own features").

Features of another lab's pipeline (OpenFace, openSMILE, an encoder run outside mmcache) become a store at
`cache/<dataset>/<modality>/<name>.h5`, written by the project's own `FeatureStore`, so `heads train` reads it like
any extracted store. Inputs:

- `--features FILE.npz` / `FILE.safetensors`: arrays named `pooled` [N, d], optionally `tokens` [N, T, d] with
  `mask` [N, T]; ids inside the file (an npz member `ids` of text or integers; the safetensors metadata key `ids`,
  a JSON list of texts) or given by `--ids`.
- `--features FILE.npy` is `pooled`; `--features tokens=T.npy --features mask=M.npy` add the others.
- `--ids FILE`: one id per line (`.txt`, kept exactly, a trailing newline ignored) or a `.csv` with an `id` column.
- `--manifest FILE.csv`: `id,split,label[,label_<task>]` rows, written as the dataset's manifest (through
  `Dataset.write_manifest`) when the dataset has none; class names are the sorted label values.

Nothing is unpickled: `.npy` / `.npz` are opened with `allow_pickle=False` (object arrays are refused), a
`.safetensors` file by the safetensors library. Rows are read in blocks of about `BLOCK_BYTES`: a `.npy` is
memory-mapped, an npz member (compressed or not) is streamed from the archive in row order, a safetensors tensor is
sliced; only a Fortran-order npz member is read whole. Each block is cast to the store dtype and written as one
batch, so memory stays bounded whatever the file size.

Every check that can fail on the input runs before the store is created, with one line naming the file and row.
Rows holding NaN or inf are recorded as failed (`FeatureStore.fail`, with the reason), never stored. The store's
spec records the import: each source file's name, sha256, array shapes and dtypes, and a digest of the ids in row
order; so importing the same files again resumes (rows already there are skipped) and other files under the same
store name are refused, as for extracted stores. A new store whose import fails part way is removed with its folders.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcache.cache.store import (
    BLOCK_BYTES,
    FeatureStore,
    StoreReader,
    failures_path,
    lock_path,
    manifest_path,
    partial_path,
    store_path,
)
from mmcache.data.base import MAX_ID_BYTES, SPLITS, Dataset, LabelSpace, Sample, id_problem
from mmcache.errors import MMCacheError

ARRAYS = ("pooled", "tokens", "mask")
SHAPES = {"pooled": "[rows, d]", "tokens": "[rows, T, d]", "mask": "[rows, T]"}
MODALITIES = ("image", "text", "context", "video", "audio")
SUFFIXES = (".npy", ".npz", ".safetensors")
FAILED_KIND = "NaN/inf values"
# safetensors dtypes numpy reads; the others (bfloat16, float8) are refused with a hint to convert.
_ST_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
              "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass
class Source:
    """One array of an input file: where it is, its shape and dtype, and how to read rows lo:hi (in row order)."""

    file: Path
    key: str  # its name in the file ("" for a .npy)
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]

    @property
    def where(self) -> str:
        return f"{self.file}" + (f" array {self.key!r}" if self.key else "")


@dataclass
class Ids:
    """The ids of the rows and where each came from (for messages)."""

    values: list[str]
    file: Path
    what: str  # "line", "row", "item"
    lines: list[int] | None = None  # line number per id (text / CSV files)
    label: str = ""  # e.g. "array 'ids'", "metadata 'ids'"

    def at(self, row: int) -> str:
        """Where the id of `row` is: `ids.txt, line 4 (row 3)`, `feats.npz array 'ids', row 3`."""
        if self.lines is not None:
            return f"{self.file}, line {self.lines[row]} (row {row})"
        return f"{self.file}{' ' + self.label if self.label else ''}, {self.what} {row}"


@dataclass
class ImportResult:
    """What `import_features` did."""

    path: Path
    rows: int  # rows in the input
    written: int  # rows stored by this call
    failed: dict[str, str] = field(default_factory=dict)  # ids recorded as failed by this call -> reason
    skipped: int = 0  # rows already in the store (committed or failed before)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    dtype: str = "float16"
    manifest: Path | None = None
    manifest_written: bool = False
    unlisted: int = 0  # manifest rows without an imported row
    notes: list[str] = field(default_factory=list)


# -- reading the input files ------------------------------------------------------------------------------------


def _npy_header(fh: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise ValueError(f".npy format version {version} is not read here (1.0 and 2.0 are)")
    except ValueError as e:
        raise MMCacheError(f"{where} is not a readable .npy array ({e}); save it with numpy.save / savez") from None
    return tuple(int(s) for s in shape), bool(fortran), np.dtype(dtype)


class _ZipRows:
    """Rows of one npz member read in order from the archive (decompressed as they stream); a jump back reopens."""

    def __init__(self, zf: zipfile.ZipFile, member: str, src: Path, key: str, shape: tuple[int, ...],
                 dtype: np.dtype, fortran: bool) -> None:
        self.zf, self.member, self.src, self.key = zf, member, src, key
        self.shape, self.dtype, self.fortran = shape, dtype, fortran
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self.fh: Any = None
        self.pos = 0
        self.whole: np.ndarray | None = None

    def _open(self) -> None:
        if self.fh is not None:
            self.fh.close()
        self.fh = self.zf.open(self.member)
        _npy_header(self.fh, f"{self.src} array {self.key!r}")
        self.pos = 0

    def __call__(self, lo: int, hi: int) -> np.ndarray:
        if self.fortran:  # column-major: rows are not contiguous in the stream, so the member is read whole
            if self.whole is None:
                with np.load(self.src, allow_pickle=False) as z:
                    self.whole = z[self.key]
            return self.whole[lo:hi]
        if self.fh is None or lo < self.pos:
            self._open()
        while self.pos < lo:  # skip rows (a resumed import that starts past the first block)
            n = min(lo - self.pos, max(1, BLOCK_BYTES // max(1, self.row_bytes)))
            self._read_exact(n * self.row_bytes)
            self.pos += n
        buf = self._read_exact((hi - lo) * self.row_bytes)
        self.pos = hi
        return np.frombuffer(buf, dtype=self.dtype).reshape(hi - lo, *self.shape[1:])

    def _read_exact(self, n: int) -> bytes:
        try:
            buf = self.fh.read(n)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise MMCacheError(f"{self.src} array {self.key!r}: the archive cannot be read at row {self.pos} ({e}); "
                               "write the file again") from None
        if len(buf) != n:
            row = self.pos + len(buf) // max(1, self.row_bytes)
            raise MMCacheError(f"{self.src} array {self.key!r} ends before row {row} of {self.shape[0]} (truncated); "
                               "write the file again")
        return buf

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def _open_npy(path: Path, key: str) -> Source:
    with open(path, "rb") as fh:
        shape, _fortran, dtype = _npy_header(fh, str(path))
    _check_dtype(path, key, dtype, shape)
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise MMCacheError(f"{path} cannot be read without pickle ({e}); save a numeric array") from None
    return Source(path, key, shape, dtype, lambda lo, hi: mm[lo:hi])


def _open_npz(path: Path, stack: contextlib.ExitStack) -> tuple[dict[str, Source], np.ndarray | None]:
    try:
        zf = stack.enter_context(zipfile.ZipFile(path))
    except (zipfile.BadZipFile, OSError) as e:
        raise MMCacheError(f"{path} is not a readable .npz archive ({e}); save it with numpy.savez") from None
    out: dict[str, Source] = {}
    ids: np.ndarray | None = None
    for member in zf.namelist():
        key = member[:-4] if member.endswith(".npy") else member
        if key == "ids":
            try:
                with np.load(path, allow_pickle=False) as z:
                    ids = z["ids"]
            except ValueError as e:
                raise MMCacheError(f"{path} array 'ids' cannot be read without pickle ({e}); save the ids as a "
                                   "text array (numpy.array(ids, dtype=str))") from None
            continue
        if key not in ARRAYS:
            raise MMCacheError(f"{path} holds an array {key!r}; an import takes only {', '.join(ARRAYS)} and ids")
        with zf.open(member) as fh:
            shape, fortran, dtype = _npy_header(fh, f"{path} array {key!r}")
        _check_dtype(path, key, dtype, shape)
        rows = _ZipRows(zf, member, path, key, shape, dtype, fortran)
        stack.callback(rows.close)
        out[key] = Source(path, key, shape, dtype, rows)
    return out, ids


def _open_safetensors(path: Path, stack: contextlib.ExitStack) -> tuple[dict[str, Source], str | None]:
    from safetensors import safe_open

    try:
        f = stack.enter_context(safe_open(str(path), framework="np"))
        meta = f.metadata() or {}
        keys = list(f.keys())
    except Exception as e:  # the library's SafetensorError, or an OS error
        raise MMCacheError(f"{path} is not a readable .safetensors file ({str(e).splitlines()[0] if str(e) else e}); "
                           "save it with safetensors' save_file") from None
    out: dict[str, Source] = {}
    for key in keys:
        if key not in ARRAYS:
            raise MMCacheError(f"{path} holds a tensor {key!r}; an import takes only {', '.join(ARRAYS)} (ids go in "
                               "the metadata key 'ids')")
        sl = f.get_slice(key)
        shape, st_dtype = tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype())
        if st_dtype not in _ST_DTYPES:
            raise MMCacheError(f"{path} tensor {key!r} has dtype {st_dtype}, which numpy cannot read; save it as "
                               "float16 or float32")
        dtype = np.dtype(_ST_DTYPES[st_dtype])
        _check_dtype(path, key, dtype, shape)
        def read(lo: int, hi: int, sl: Any = sl) -> np.ndarray:
            return np.asarray(sl[lo:hi])

        out[key] = Source(path, key, shape, dtype, read)
    return out, meta.get("ids")


def _check_dtype(path: Path, key: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    where = f"{path}" + (f" array {key!r}" if key else "")
    if key == "mask":
        if dtype.kind not in "biu":
            raise MMCacheError(f"{where} has dtype {dtype}; a mask is bool (or integers 0/1), True at real tokens")
    elif dtype.kind not in "biuf":
        raise MMCacheError(f"{where} has dtype {dtype}, which a feature store does not take; it stores numbers as "
                           "float16 or float32 (save real-valued features)")
    name = key or "pooled"
    ndim = SHAPES[name].count(",") + 1
    if len(shape) != ndim:
        raise MMCacheError(f"{where} has shape {list(shape)}; {name} must be {SHAPES[name]}")
    if 0 in shape[1:]:
        raise MMCacheError(f"{where} has shape {list(shape)}: rows without values")


def open_sources(features: list[str], stack: contextlib.ExitStack) -> tuple[dict[str, Source], Any, Path | None]:
    """The arrays of the `--features` arguments; also ids found inside a file (and that file)."""
    sources: dict[str, Source] = {}
    ids: Any = None
    ids_file: Path | None = None
    for spec in features:
        key, sep, rest = spec.partition("=")
        named = bool(sep) and key in ARRAYS and not Path(spec).exists()
        path = Path(rest if named else spec)
        if not path.is_file():
            raise MMCacheError(f"--features {spec}: {path} not found")
        if path.suffix not in SUFFIXES:
            raise MMCacheError(f"--features {spec}: {path} is not a .npy, .npz or .safetensors file")
        if named and path.suffix != ".npy":
            raise MMCacheError(f"--features {spec}: NAME=FILE is for .npy files; a {path.suffix} file names its arrays")
        found_ids: Any = None
        if path.suffix == ".npy":
            got = {key if named else "pooled": _open_npy(path, key if named else "")}
        elif path.suffix == ".npz":
            got, found_ids = _open_npz(path, stack)
        else:
            got, found_ids = _open_safetensors(path, stack)
        for k, s in got.items():
            if k in sources:
                raise MMCacheError(f"--features: array {k!r} is given twice ({sources[k].where} and {s.where})")
            sources[k] = s
        if found_ids is not None:
            if ids is not None:
                raise MMCacheError(f"{path}: ids are given in {ids_file} too; give them once")
            ids, ids_file = found_ids, path
    if "pooled" not in sources:
        raise MMCacheError(f"--features {' '.join(features)}: no 'pooled' array; an import needs pooled "
                           f"{SHAPES['pooled']}")
    if ("tokens" in sources) != ("mask" in sources):
        have, lack = ("tokens", "mask") if "tokens" in sources else ("mask", "tokens")
        raise MMCacheError(f"{sources[have].where}: {have} without {lack}; tokens {SHAPES['tokens']} come with their "
                           f"mask {SHAPES['mask']} (True at real tokens)")
    n = sources["pooled"].shape[0]
    for s in sources.values():
        if s.shape[0] != n:
            raise MMCacheError(f"{s.where} has {s.shape[0]} rows but {sources['pooled'].where} has {n}; every array "
                               "has one row per id")
    if "tokens" in sources and sources["mask"].shape[1] != sources["tokens"].shape[1]:
        raise MMCacheError(f"{sources['mask'].where} has shape {list(sources['mask'].shape)} but tokens "
                           f"{list(sources['tokens'].shape)}: the mask needs one entry per token")
    if n == 0:
        raise MMCacheError(f"{sources['pooled'].where} has no rows")
    return sources, ids, ids_file


# -- ids ----------------------------------------------------------------------------------------------------------


def read_ids(path: Path) -> Ids:
    """Ids from a text file (one per line, exactly) or a CSV with an `id` column."""
    if not path.is_file():
        raise MMCacheError(f"--ids {path}: no such file")
    if path.suffix.lower() == ".csv":
        from mmcache.data.io import iter_delimited

        vals, lines = [], []
        for line, row in iter_delimited(path, required=("id",)):
            vals.append(row["id"])
            lines.append(line)
        return Ids(vals, path, "line", lines)
    text = path.read_bytes().decode("utf-8", "surrogateescape")  # bad bytes show as an id that is not valid Unicode
    parts = [p[:-1] if p.endswith("\r") else p for p in text.removeprefix("\ufeff").split("\n")]
    if parts and parts[-1] == "":
        parts.pop()
    return Ids(parts, path, "line", list(range(1, len(parts) + 1)))


def inner_ids(raw: Any, file: Path) -> Ids:
    """Ids found inside a features file: an npz array, or a safetensors metadata JSON list."""
    if isinstance(raw, str):  # safetensors metadata
        try:
            vals = json.loads(raw)
        except json.JSONDecodeError as e:
            raise MMCacheError(f"{file} metadata 'ids' is not JSON ({e}); store json.dumps(list_of_ids)") from None
        if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
            raise MMCacheError(f"{file} metadata 'ids' is not a JSON list of texts")
        return Ids(vals, file, "item", label="metadata 'ids'")
    arr = np.asarray(raw)
    if arr.ndim != 1:
        raise MMCacheError(f"{file} array 'ids' has shape {list(arr.shape)}; ids are one text per row, [rows]")
    if arr.dtype.kind == "U":
        vals = [str(v) for v in arr.tolist()]
    elif arr.dtype.kind == "S":
        vals = [b.decode("utf-8", "surrogateescape") for b in arr.tolist()]
    elif arr.dtype.kind in "iu":
        vals = [str(int(v)) for v in arr.tolist()]
    else:
        raise MMCacheError(f"{file} array 'ids' has dtype {arr.dtype}; ids are texts (or integers)")
    return Ids(vals, file, "row", label="array 'ids'")


def check_ids(ids: Ids, n: int, rows_where: str) -> None:
    """One id per row, each a valid id, none twice."""
    if len(ids.values) != n:
        raise MMCacheError(f"{ids.file} has {len(ids.values)} ids but {rows_where} has {n} rows; give one id per row, "
                           "in row order")
    for row, sid in enumerate(ids.values):
        why = id_problem(sid)
        if why is not None:
            raise MMCacheError(f"{ids.at(row)}: id {sid!r:.80} {why}; ids are non-empty UTF-8 text without NUL, at "
                               f"most {MAX_ID_BYTES} bytes")
    if len(set(ids.values)) != n:
        counts = Counter(ids.values)
        first = next(i for i in ids.values if counts[i] > 1)
        rows = [r for r, i in enumerate(ids.values) if i == first]
        n_dup = sum(1 for c in counts.values() if c > 1)
        more = f"; {n_dup - 1} more ids repeat" if n_dup > 1 else ""
        raise MMCacheError(f"{ids.at(rows[0])}: id {first!r:.80} is repeated at rows {', '.join(map(str, rows[:5]))}"
                           f"{more}; ids must be unique")


# -- the manifest CSV ----------------------------------------------------------------------------------------------


def _class_order(values: set[str]) -> list[str]:
    """Class names sorted: as numbers when every one is a number (2 before 10), else as text."""
    try:
        return sorted(values, key=lambda v: (float(v), v))
    except ValueError:
        return sorted(values)


def read_manifest_csv(path: Path, dataset: str) -> Dataset:
    """A dataset (ids, splits, labels) from `id,split,label[,label_<task>]` rows; one line naming the row otherwise.

    `label` is the primary task and must be given on every row; an empty `label_<task>` cell is no label for that
    task. Splits are train / val / test (dev, valid, validation, training, testing are taken as theirs)."""
    from mmcache.data.io import IdCheck, iter_delimited, normalise_split

    if not path.is_file():
        raise MMCacheError(f"--manifest {path}: no such file")
    check = IdCheck()
    rows: list[tuple[int, str, str, dict[str, str]]] = []
    tasks: list[str] | None = None
    for line, row in iter_delimited(path, required=("id", "split", "label")):
        if tasks is None:
            extra = [c for c in row if c not in ("id", "split", "label") and not c.startswith("label_")]
            if extra:
                raise MMCacheError(f"{path}: unknown column(s) {extra}; the manifest CSV has columns id, split, label "
                                   "and optionally label_<task>")
            tasks = ["label", *(c[len("label_"):] for c in row if c.startswith("label_"))]
            bad = [t for t in tasks[1:] if not t or t == "label"]
            if bad or len(set(tasks)) != len(tasks):
                raise MMCacheError(f"{path}: a task column must be label_<task> with a task name of its own")
        sid = row["id"]
        check.add(sid, path, line)
        split = normalise_split(row["split"])
        if split not in SPLITS:
            raise MMCacheError(f"{path}, line {line}: row {sid!r:.80} has split {row['split']!r}; splits are "
                               f"{', '.join(SPLITS)}")
        labels = {t: row["label" if t == "label" else f"label_{t}"].strip() for t in tasks}
        if not labels["label"]:
            raise MMCacheError(f"{path}, line {line}: row {sid!r:.80} has no label; every row needs one (an empty "
                               "label_<task> cell is allowed: no label for that task)")
        rows.append((line, sid, split, {t: v for t, v in labels.items() if v}))
    if tasks is None:
        raise MMCacheError(f"{path}: no rows")
    space = LabelSpace(tasks={t: _class_order({lab[t] for *_, lab in rows if t in lab}) for t in tasks})
    empty = [t for t, names in space.tasks.items() if not names]
    if empty:
        raise MMCacheError(f"{path}: column label_{empty[0]} has no label on any row")
    index = {t: {c: i for i, c in enumerate(names)} for t, names in space.tasks.items()}
    samples = [Sample(id=sid, split=split, labels={t: index[t][v] for t, v in lab.items()})
               for _, sid, split, lab in rows]
    return Dataset(name=dataset, samples=samples, labels=space, root=path.parent)


# -- the import ------------------------------------------------------------------------------------------------------


def _spec(modality: str, sources: dict[str, Source], ids: Ids) -> dict[str, Any]:
    from mmcache.extract.weights import weights_sha256  # cached by size and mtime, so a re-import hashes nothing

    files: dict[str, dict[str, Any]] = {}
    for k, s in sources.items():
        entry = files.setdefault(str(s.file), {"file": s.file.name, "sha256": weights_sha256(s.file), "arrays": {}})
        entry["arrays"][k] = {"shape": list(s.shape), "dtype": s.dtype.name}
    # The ids by their content (the same ids from another file are the same import), in row order.
    digest = hashlib.sha256("\0".join(ids.values).encode("utf-8")).hexdigest()
    id_src = {"rows": len(ids.values), "sha256": digest}
    names = ",".join(dict.fromkeys(f["file"] for f in files.values()))
    return {"preset": "import", "modality": modality, "source": names, "imported": list(files.values()),
            "ids": id_src}


def _remove_new(path: Path, made: list[Path]) -> None:
    """A store this import created, with its side files and the folders it made."""
    for p in (path, partial_path(path), failures_path(path), partial_path(failures_path(path)), lock_path(path)):
        p.unlink(missing_ok=True)
    for d in made:
        try:
            d.rmdir()
        except OSError:
            pass


def _write_failures(path: Path) -> None:
    out = failures_path(path)
    failed = StoreReader(path).failed
    if not failed:
        out.unlink(missing_ok=True)
        return
    tmp = partial_path(out)
    with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "kind", "reason"])
        for sid, reason in failed.items():
            w.writerow([sid, FAILED_KIND if reason.startswith("NaN/inf") else reason, reason])
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)


def _blocks(n: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def import_features(dataset: str, modality: str, name: str, features: list[str], ids_file: Path | None = None,
                    manifest: Path | None = None, cache_dir: Path | str = "cache", dtype: str = "float16",
                    progress: bool = True) -> ImportResult:
    """Write `cache/<dataset>/<modality>/<name>.h5` from the arrays of `features` (see the module docstring)."""
    from mmcache.data.base import check_name
    from mmcache.manifest import Manifest
    from mmcache.progress import bar
    from mmcache.runfolder import check_name as check_folder_name

    check_name(dataset)
    check_folder_name(name, "--name", "openface")
    if modality not in MODALITIES:
        raise MMCacheError(f"--modality {modality!r}: the modality is one of {', '.join(MODALITIES)}")
    store_dtype = np.dtype(dtype)
    if store_dtype.name not in ("float16", "float32"):
        raise MMCacheError(f"--dtype {dtype!r}: a store keeps float16 or float32")
    if not features:
        raise MMCacheError("--features: give the file of the features (.npy, .npz or .safetensors)")
    path = store_path(cache_dir, dataset, modality, name)
    with contextlib.ExitStack() as stack:
        sources, inside, inside_file = open_sources(features, stack)
        pooled = sources["pooled"]
        if ids_file is not None and inside is not None:
            raise MMCacheError(f"--ids {ids_file}: {inside_file} holds ids already; give them once")
        if ids_file is not None:
            ids = read_ids(ids_file)
        elif inside is not None and inside_file is not None:
            ids = inner_ids(inside, inside_file)
        else:
            raise MMCacheError(f"{pooled.file}: no ids; pass --ids FILE (one id per line, in row order), or keep them "
                               "in the file (an npz array 'ids', the safetensors metadata key 'ids')")
        n = pooled.shape[0]
        check_ids(ids, n, pooled.where)

        # The manifest: a new one from the CSV (checked now, written after the store), or the dataset's own.
        mpath = manifest_path(cache_dir, dataset)
        result = ImportResult(path=path, rows=n, written=0, dtype=store_dtype.name, manifest=mpath)
        new_ds = read_manifest_csv(manifest, dataset) if manifest is not None else None
        listed: set[str] | None = None
        if new_ds is not None:
            if mpath.exists() and Manifest.read(mpath, labels=False) != Manifest.from_dataset(new_ds):
                raise MMCacheError(f"--manifest {manifest}: dataset {dataset!r} has a manifest already ({mpath}) that "
                                   "differs from it; import without --manifest, or remove the dataset's manifest first")
            listed = set(new_ds.ids())
            where = str(manifest)
        elif mpath.exists():
            listed = set(Manifest.read(mpath, labels=False).ids)
            where = str(mpath)
        else:
            result.notes.append(f"no manifest at {mpath}: import again with --manifest FILE.csv (id,split,label) "
                                "before `heads train`")
        if listed is not None:
            stray = [r for r, i in enumerate(ids.values) if i not in listed]
            if stray:
                raise MMCacheError(f"{ids.at(stray[0])}: id {ids.values[stray[0]]!r:.80} is not in {where} "
                                   f"({len(stray)} such ids); every imported row needs a manifest row")
            result.unlisted = len(listed) - n

        spec = _spec(modality, sources, ids)
        made = [p for p in (path.parent, path.parent.parent, Path(cache_dir)) if not p.exists()]
        existed = path.exists()
        row_bytes = sum(math.prod(s.shape[1:]) * (s.dtype.itemsize + store_dtype.itemsize + 1)
                        for s in sources.values())
        opened = False
        try:
            with FeatureStore(path, spec, dataset, dtype=store_dtype.name, capacity=n) as st:
                opened = True
                done = st.done
                result.skipped = sum(1 for i in ids.values if i in done)
                with bar(total=n, desc=f"import {modality}/{name}", unit="row", disable=not progress) as pb:
                    for lo, hi in _blocks(n, row_bytes):
                        block_ids = ids.values[lo:hi]
                        todo = np.array([i not in done for i in block_ids])
                        if todo.any():
                            _import_block(st, sources, block_ids, lo, todo, store_dtype, result)
                        pb.update(hi - lo)
            _write_failures(path)
        except Exception:
            if opened and not existed:  # never another writer's files
                _remove_new(path, made)
            raise
        reader = StoreReader(path)
        result.shapes = {k: [len(reader), *s] for k, s in reader.shapes.items()}
        if new_ds is not None and not mpath.exists():
            new_ds.write_manifest(mpath)
            result.manifest_written = True
        return result


def _import_block(st: FeatureStore, sources: dict[str, Source], block_ids: list[str], lo: int, todo: np.ndarray,
                  store_dtype: np.dtype, result: ImportResult) -> None:
    """Rows lo:lo+len(block_ids) of every array: cast, the non-finite ones failed, the others written as one batch."""
    hi = lo + len(block_ids)
    bad_key: list[str | None] = [None] * len(block_ids)
    out: dict[str, np.ndarray] = {}
    for k, s in sources.items():
        a = np.asarray(s.read(lo, hi))
        if a.shape != (hi - lo, *s.shape[1:]):
            raise MMCacheError(f"{s.where}: rows {lo}-{hi - 1} read as shape {list(a.shape)}; the file is damaged")
        flat = a.reshape(hi - lo, -1)
        if k == "mask":
            if a.dtype.kind != "b":
                off = np.flatnonzero(((flat != 0) & (flat != 1)).any(axis=1) & todo)
                if off.size:
                    r = lo + int(off[0])
                    raise MMCacheError(f"{s.where}, row {r}: mask values {sorted(set(flat[off[0]].tolist()))[:4]}; a "
                                       "mask holds 0/1 (or bool), 1 at real tokens")
            out[k] = a.astype(bool)
            continue
        nonfinite = ~np.isfinite(flat).all(axis=1) if a.dtype.kind == "f" else np.zeros(hi - lo, dtype=bool)
        with np.errstate(over="ignore", invalid="ignore"):
            cast = a.astype(store_dtype)
        over = ~np.isfinite(cast.reshape(hi - lo, -1)).all(axis=1) & ~nonfinite & todo
        if over.any():
            j = int(np.flatnonzero(over)[0])
            peak = float(np.abs(flat[j].astype(np.float64)).max())
            raise MMCacheError(f"{s.where}, row {lo + j} (id {block_ids[j]!r:.80}): values beyond the "
                               f"{store_dtype.name} range (max |x| {peak:.3g}); import with --dtype float32")
        for j in np.flatnonzero(nonfinite & todo).tolist():
            if bad_key[j] is None:
                bad_key[j] = f"NaN/inf values in {k!r} ({s.file.name} row {lo + j})"
        out[k] = cast
    bad = np.array([b is not None for b in bad_key])
    for j in np.flatnonzero(bad & todo).tolist():
        reason = str(bad_key[j])
        st.fail(block_ids[j], reason)
        result.failed[block_ids[j]] = reason
    keep = np.flatnonzero(todo & ~bad)
    if keep.size:
        st.write([block_ids[j] for j in keep.tolist()], {k: v[keep] for k, v in out.items()})
        result.written += int(keep.size)


def summary(res: ImportResult) -> list[str]:
    """The lines `mmcache cache import` prints."""
    arrays = ", ".join(f"{k} {v}" for k, v in res.shapes.items()) or "no rows stored"
    lines = [f"imported {res.written} rows into {res.path} ({res.dtype}; {arrays}); {len(res.failed)} failed "
             f"(NaN/inf, not stored), {res.skipped} already in the store"]
    if res.failed:
        first = next(iter(res.failed.items()))
        lines.append(f"failed: {first[0]!r}: {first[1]}" + (f" (all of them in {failures_path(res.path)})"
                                                             if failures_path(res.path).exists() else ""))
    if res.manifest_written:
        lines.append(f"wrote the manifest {res.manifest}")
    if res.unlisted > 0:
        lines.append(f"{res.unlisted} manifest ids have no imported row; heads train leaves them out")
    lines.extend(res.notes)
    return lines

