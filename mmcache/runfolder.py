"""Run folders: their names, taking a name, writing a folder whole, and the one check of a folder that is read.

- Names (`check_name`): every `--dataset`, `--run-name`, `--name` and grid-derived folder name is one path
  component of letters, digits and `. _ + , = @ -`, starting with a letter or a digit, at most 128 characters.
- Taking a name (`take_run_dir`): an exclusive lock (`flock` on `.<name>.lock` beside the folder, released by
  the kernel when the process dies, even by SIGKILL) held until the folder is written, so two runs given the same
  `--run-name` never share or replace one folder: the second is refused in one line.
- Writing whole (`write_whole`): the files go into `.tmp-<name>-<random>` in the same folder, each one fsynced,
  then the folder is renamed into place. A kill at any moment leaves either no run or a complete one; a full
  disk or a read-only folder is one line naming the folder and the file, and nothing half-written stays.
- Reading (`check_run`, `load_head`): the JSON files against their schema, the safetensors header (parsed here,
  with a size cap) and each tensor's shape and dtype against `head.json` before anything is allocated, finite
  weights, label lists against the head's outputs. Each problem is one line naming the file and the field.

- Writing a run (`write_run`): the one layout of every trainer's folder (head, config, metrics, curves, plots,
  per-row test predictions, the criterion's and trained encoders' weights); `metrics_json` is `metrics.json`.

Imports no torch at module level: `heads runs` checks folders without it.
"""

from __future__ import annotations

import atexit
import csv
import errno
import json
import math
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcache.errors import MMCacheError
from mmcache.utils import file_sha256, fsync_path

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmcache.engine.result import RunResult
    from mmcache.heads.base import Head

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+,=@-]*\Z")
MAX_NAME = 128
TMP_PREFIX = ".tmp-"  # a run folder being written (or the leftover of one that was killed)
OLD_PREFIX = ".old-"  # the folder --overwrite replaces, between the two renames
PARTIAL_PREFIX = ".partial-"  # a fine-tuning run in progress: its checkpoints
JSON_CAP = 64 << 20  # bytes of a run folder's JSON file
HEADER_CAP = 16 << 20  # bytes of a safetensors header
DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}


# ---------------------------------------------------------------- names


def check_name(value: Any, flag: str, example: str = "lora-r8") -> str:
    """`value` when it is one folder name of allowed characters; else an MMCacheError naming `flag`."""
    if isinstance(value, str) and NAME_RE.match(value) and len(value) <= MAX_NAME and value not in (".", ".."):
        return value
    shown = repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
    raise MMCacheError(f"{flag} {shown}: a name is one folder name of letters, digits and . _ + , = @ - (starting "
                       f"with a letter or a digit, at most {MAX_NAME} characters), not a path; e.g. {flag} {example}")


def name_option(flag: str, example: str = "lora-r8") -> Callable[[Any], Any]:
    """A typer/click option callback that checks the value (None passes) with `check_name`, as a usage error."""

    def callback(value: Any) -> Any:
        if value is None:
            return value
        import typer

        try:
            return check_name(value, flag, example)
        except MMCacheError as e:
            raise typer.BadParameter(str(e).split(": ", 1)[1]) from None

    return callback


def check_run_name_parts(run_name: str, flag: str = "--run-name") -> list[str]:
    """A run name made of folder names joined by `/` (a sweep's `sweeps/<stem>/<config>`, a fold `<cv>/fold0`):
    each part checked."""
    parts = run_name.split("/") if isinstance(run_name, str) else [run_name]
    for p in parts:
        check_name(p, flag)
    return parts


# ---------------------------------------------------------------- taking a name

_HELD: dict[str, int] = {}  # absolute folder path -> the fd holding its lock
_MADE: dict[str, list[Path]] = {}  # absolute folder path -> the folders its lock created (deepest first)


def _lock_path(d: Path) -> Path:
    return d.parent / f".{d.name}.lock"


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def take(d: Path) -> bool:
    """Lock folder name `d` for this process (True), or False when another live process holds it. Idempotent."""
    import fcntl

    key = str(d.absolute())
    if key in _HELD:
        return True
    if _rank() != 0:  # under torchrun rank 0 takes the name and writes the folder
        return True
    lock = _lock_path(d)
    made = [q for q in (lock.parent, *lock.parent.parents) if not q.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its last holder unlinked while we waited for it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd
    _MADE[key] = made
    return True


def holder(d: Path) -> str:
    """The process id recorded in `d`'s lock, as text ('?' when unknown)."""
    try:
        return _lock_path(d).read_text().strip() or "?"
    except OSError:
        return "?"


def release(d: Path) -> None:
    """Give up the lock on `d` (no-op when this process does not hold it)."""
    fd = _HELD.pop(str(d.absolute()), None)
    if fd is None:
        return
    try:
        _lock_path(d).unlink(missing_ok=True)  # while still holding it: a waiter re-checks the inode
    except OSError:
        pass
    os.close(fd)
    for q in _MADE.pop(str(d.absolute()), []):  # folders only the lock needed: a refused run leaves nothing
        try:
            q.rmdir()
        except OSError:  # not empty (a run was written there) or gone
            break


@contextmanager
def releasing() -> Iterator[None]:
    """Names taken inside the block are given up when it ends, also by an error (a library call that fails
    leaves no lock behind for the rest of the process)."""
    before = set(_HELD)
    try:
        yield
    finally:
        for key in [k for k in _HELD if k not in before]:
            release(Path(key))


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        release(Path(key))


def busy_error(d: Path, flag: str) -> MMCacheError:
    return MMCacheError(f"run folder {d} is being written by another process (pid {holder(d)}); choose another "
                        f"{flag}, or wait until that run ends")


def take_run_dir(base: Path, run_name: str | None, stem_parts: list[str], overwrite: bool = False,
                 taken: set[Path] | None = None, flag: str = "--run-name") -> Path:
    """`<base>/<run_name>` taken for this process (refused when another process holds it, or when it exists and
    holds files, unless `overwrite`), or a fresh `<parts>_<time>` name that collides with no folder, no name
    another process holds and no name in `taken` (handed out earlier in the same call; the new one is added).
    A name of several parts (`sweeps/<stem>/<config>`) takes its parent folder's name, once per process."""
    if run_name is not None:
        parts = check_run_name_parts(run_name, flag)
        d = base.joinpath(*parts)
        target = d if len(parts) == 1 else d.parent
        if not take(target):
            raise busy_error(target, flag)
        if d.is_file() or (d.is_dir() and any(d.iterdir()) and not overwrite):
            if len(parts) == 1:
                release(d)
            raise MMCacheError(f"run folder {d} already exists; choose another {flag} or pass --overwrite")
        return d
    stem = "_".join([*stem_parts, time.strftime("%Y%m%d-%H%M%S")])
    taken = taken if taken is not None else set()
    k = 1
    while True:
        d = base / (stem if k == 1 else f"{stem}-{k}")
        k += 1
        if d.exists() or d in taken or (base / f"{PARTIAL_PREFIX}{d.name}").exists():
            continue
        if not take(d):
            continue
        if d.exists():  # written between the look and the lock
            release(d)
            continue
        taken.add(d)
        return d


# ---------------------------------------------------------------- writing whole


def disk_error(error: BaseException) -> str | None:
    """What a write failure was, when the disk or the folder caused it (full, quota, read-only, no permission);
    else None. safetensors' own error type carries the OS error in its text."""
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        return DISK_ERRNOS[error.errno]
    if type(error).__name__ == "SafetensorError":
        text = str(error)
        for code, what in DISK_ERRNOS.items():
            if f"os error {code})" in text or os.strerror(code) in text:
                return what
    return None


class Writing:
    """Which file of a folder is being written (named in a disk error)."""

    def __init__(self) -> None:
        self.file = "the run folder"

    def __call__(self, name: str) -> str:
        self.file = name
        return name


def write_whole(d: Path, fill: Callable[[Path, Writing], None], flag: str = "--runs-dir") -> Path:
    """Write folder `d` whole: `fill(tmp, writing)` writes its files into a temporary folder beside it; each file is
    fsynced, then the folder is renamed to `d` (an existing `d`, which --overwrite replaces, goes only then). The
    name's lock is released. A disk error is one line naming `d` and the file; the temporary folder is removed."""
    parent = d.parent
    tmp = parent / f"{TMP_PREFIX}{d.name}-{uuid.uuid4().hex[:8]}"
    writing = Writing()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        fill(tmp, writing)
        writing.file = "the run folder"
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                fsync_path(p)
        fsync_path(tmp)
        if d.exists():  # --overwrite: the old folder goes once the new one is whole
            old = parent / f"{OLD_PREFIX}{d.name}-{uuid.uuid4().hex[:8]}"
            os.rename(d, old)
            os.rename(tmp, d)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, d)
        fsync_path(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = disk_error(e)
        if why is not None:
            raise MMCacheError(f"cannot write run folder {d}: {why} while writing {writing.file}; nothing was kept "
                               f"(free space, or pass another {flag})") from None
        raise
    finally:
        release(d)
    return d


def incomplete_runs(runs_dir: Path) -> list[Path]:
    """Folders under `runs_dir` that hold an unfinished run: a write that was killed (`.tmp-*`, `.old-*`), a
    fine-tuning run in progress or killed (`.partial-*`)."""
    out = []
    for p in runs_dir.rglob(".*"):
        rel = p.relative_to(runs_dir).parts
        if (p.is_dir() and p.name.startswith((TMP_PREFIX, OLD_PREFIX, PARTIAL_PREFIX))
                and not any(x.startswith(".") or x == "mlruns" for x in rel[:-1])):
            out.append(p)
    return sorted(out)


# Files a finished run folder holds (older versions wrote them in place: a folder lacking one was cut short).
REQUIRED = ("model.safetensors", "head.json", "config.json", "metrics.json", "versions.json", "curves.json")


def missing_files(d: Path, metrics: dict[str, Any] | None = None) -> list[str]:
    """The files finished run folder `d` lacks: REQUIRED, curves.png when it has curves, the confusion plots its
    metrics promise."""
    missing = [f for f in REQUIRED if not (d / f).is_file()]
    if not missing:
        try:
            has_curves = bool(json.loads((d / "curves.json").read_text()))
        except (OSError, ValueError):
            return ["curves.json"]
        if has_curves and not (d / "curves.png").is_file():
            missing.append("curves.png")
    if metrics is not None and isinstance(metrics.get("splits"), dict):
        splits = metrics["splits"]
        split = "test" if splits.get("test") else "val"
        per = splits.get(split)
        if isinstance(per, dict):
            missing += [f"confusion_{t}.png" for t, m in per.items()
                        if isinstance(m, dict) and "confusion_matrix" in m and not (d / f"confusion_{t}.png").is_file()]
    return missing


# ---------------------------------------------------------------- reading


def read_json(path: Path, kind: type = dict) -> Any:
    """A run folder's JSON file, of type `kind`; one line naming the file otherwise (nothing read past the cap)."""
    if not path.exists():
        raise MMCacheError(f"{path} not found; is {path.parent} a run folder?")
    if not path.is_file():
        raise MMCacheError(f"{path} is not a file")
    try:
        if path.stat().st_size > JSON_CAP:
            raise MMCacheError(f"{path} is {path.stat().st_size:,} bytes, more than a run folder's JSON file holds "
                               f"({JSON_CAP:,}); is it the file the run wrote?")
        obj = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MMCacheError(f"{path} is not readable JSON ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
                           ) from None
    if not isinstance(obj, kind):
        raise MMCacheError(f"{path} holds a JSON {type(obj).__name__}, not an {'object' if kind is dict else 'array'}")
    return obj


def _field(path: Path, name: str, msg: str) -> MMCacheError:
    return MMCacheError(f"{path}: {name}: {msg}")


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_head_json(path: Path) -> dict[str, Any]:
    """head.json: `name` (a registered head's, checked when built), `inputs` {modality: {array: [positive
    sizes]}}, `tasks` {task: classes >= 1}, `hparams` {...}."""
    hc = read_json(path)
    if not isinstance(hc.get("name"), str) or not hc["name"]:
        raise _field(path, "name", "missing or not a head name")
    inputs = hc.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise _field(path, "inputs", "must be an object {modality: {array: [sizes]}}")
    for m, arrays in inputs.items():
        if not isinstance(arrays, dict) or not arrays:
            raise _field(path, f"inputs.{m}", "must be an object {array: [sizes]}")
        for k, shape in arrays.items():
            if not isinstance(shape, list) or not shape or len(shape) > 4 or not all(_pos_int(s) for s in shape):
                raise _field(path, f"inputs.{m}.{k}", f"{json.dumps(shape)[:60]} is not a list of 1 to 4 positive sizes")
            if math.prod(shape) > 1 << 24:
                raise _field(path, f"inputs.{m}.{k}", f"{shape} is larger than any feature ({1 << 24:,} values)")
    tasks = hc.get("tasks")
    if not isinstance(tasks, dict) or not tasks or not all(isinstance(t, str) and _pos_int(n) and n <= 1 << 20
                                                           for t, n in tasks.items()):
        raise _field(path, "tasks", "must be an object {task: number of classes >= 1}")
    if not isinstance(hc.get("hparams", {}), dict):
        raise _field(path, "hparams", "must be an object")
    hc.setdefault("hparams", {})
    return hc


def safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor: (dtype, shape)} of a safetensors file, read from its header alone (capped at HEADER_CAP bytes):
    every offset inside the file, every size matching its shape and dtype, tensors not overlapping."""
    if not path.exists():
        raise MMCacheError(f"{path} not found; is {path.parent} a run folder?")
    if not path.is_file():
        raise MMCacheError(f"{path} is not a file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MMCacheError(f"{path} is not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > HEADER_CAP or n > size - 8:
                raise MMCacheError(f"{path}: its header claims {n:,} bytes (the file has {size:,}; at most "
                                   f"{HEADER_CAP:,} are read); not a safetensors file the run wrote")
            raw = f.read(n)
        header = json.loads(raw)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MMCacheError(f"{path}: unreadable safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise MMCacheError(f"{path}: the safetensors header is not an object")
    data = size - 8 - n
    out: dict[str, tuple[str, list[int]]] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise MMCacheError(f"{path}: tensor {name!r}: its header entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise MMCacheError(f"{path}: tensor {name!r}: dtype {dtype!r} is not one a run folder holds")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise MMCacheError(f"{path}: tensor {name!r}: shape {json.dumps(shape)[:60]} is not a list of sizes")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and o >= 0 for o in offs)
                or offs[1] < offs[0] or offs[1] > data):
            raise MMCacheError(f"{path}: tensor {name!r}: data offsets {json.dumps(offs)[:60]} lie outside the file "
                               f"({data:,} data bytes); the file is truncated or damaged")
        if offs[1] - offs[0] != math.prod(shape) * DTYPES[dtype]:
            raise MMCacheError(f"{path}: tensor {name!r}: {offs[1] - offs[0]:,} bytes for shape {shape} of {dtype}")
        spans.append((offs[0], offs[1], name))
        out[name] = (dtype, shape)
    spans.sort()
    for (_, e0, a), (s1, _, b) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise MMCacheError(f"{path}: tensors {a!r} and {b!r} overlap; the file is damaged")
    return out


TORCH_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _meta_head(path: Path, hc: dict[str, Any]) -> Head:
    """The head head.json describes, built on torch's meta device (shapes only: nothing allocated)."""
    import torch

    from mmcache.heads.base import build_head

    inputs = {m: {k: tuple(v) for k, v in a.items()} for m, a in hc["inputs"].items()}
    try:
        with torch.device("meta"):
            return build_head(hc["name"], inputs, hc["tasks"], hc["hparams"])
    except MMCacheError as e:
        raise MMCacheError(f"{path}: {e}") from None
    except Exception as e:  # a value the head's own checks do not see
        raise MMCacheError(f"{path}: head {hc['name']!r} cannot be built from it ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:120]})") from None


def check_tensors(path: Path, header: dict[str, tuple[str, list[int]]], want: dict[str, Any], what: str) -> None:
    """The safetensors `header` of `path` must hold exactly the tensors of state dict `want` (meta tensors), with
    their shapes and dtypes."""
    missing = [k for k in want if k not in header]
    extra = [k for k in header if k not in want]
    if missing or extra:
        raise MMCacheError(f"{path}: " + (f"lacks tensor {missing[0]!r} of {what}" if missing else
                                          f"holds tensor {extra[0]!r}, which {what} has not")
                           + f" ({len(missing)} missing, {len(extra)} unexpected); it is not this run's file")
    for k, t in want.items():
        dtype, shape = header[k]
        if list(t.shape) != shape or TORCH_DTYPES.get(str(t.dtype).removeprefix("torch.")) != dtype:
            raise MMCacheError(f"{path}: tensor {k!r} is {dtype} {shape}, {what} needs "
                               f"{TORCH_DTYPES.get(str(t.dtype).removeprefix('torch.'))} {list(t.shape)}")


def check_finite(path: Path, state: dict[str, Any]) -> None:
    """Every float tensor of `state` (loaded from `path`) finite: a NaN or an infinity is named."""
    import torch

    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            raise MMCacheError(f"{path}: tensor {k!r} holds {n} NaN or infinite value(s); the run's weights are "
                               "damaged: train it again")


def check_config(path: Path, config: dict[str, Any], tasks: dict[str, int] | None = None) -> dict[str, Any]:
    """config.json: `resolved` an object; its label space {task: [class names]} holding each of the head's
    `tasks` with as many classes as the head has outputs; logit offsets finite, one per class."""
    if "resolved" in config and not isinstance(config["resolved"], dict):
        raise _field(path, "resolved", "must be an object")
    res = config.get("resolved") or {}
    labels = res.get("labels")
    if tasks is not None:
        if not isinstance(labels, dict) or not isinstance(labels.get("tasks"), dict):
            raise _field(path, "resolved.labels.tasks", "missing or not an object {task: [class names]}")
        for t, n in tasks.items():
            names = labels["tasks"].get(t)
            if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
                raise _field(path, f"resolved.labels.tasks.{t}", "missing or not a list of class names")
            if len(names) != n:
                raise _field(path, f"resolved.labels.tasks.{t}", f"{len(names)} class names, the head has {n} outputs")
    adj = res.get("logit_adjust")
    if adj is not None:
        if not isinstance(adj, dict) or not isinstance(adj.get("offsets") or {}, dict):
            raise _field(path, "resolved.logit_adjust.offsets", "must be an object {task: [offsets]}")
        for t, offs in (adj.get("offsets") or {}).items():
            if (not isinstance(offs, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      and math.isfinite(v) for v in offs)
                    or (tasks is not None and t in tasks and len(offs) != tasks[t])):
                raise _field(path, f"resolved.logit_adjust.offsets.{t}",
                             f"{json.dumps(offs)[:60]} is not one finite number per class")
    for key in ("modalities", "encoders", "stores"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise _field(path, key, "must be an object")
    for key in ("stores", "store_specs", "specs"):
        if res.get(key) is not None and not isinstance(res[key], dict):
            raise _field(path, f"resolved.{key}", "must be an object")
    return config


def check_run(d: Path | str) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[str, list[int]]]]:
    """(head.json, config.json, model.safetensors' header) of run folder `d`, each checked (no torch)."""
    d = Path(d)
    if not d.is_dir():
        raise MMCacheError(f"run folder {d} not found" if not d.exists() else f"{d} is not a run folder")
    hc = check_head_json(d / "head.json")
    config = check_config(d / "config.json", read_json(d / "config.json"), hc["tasks"])
    header = safetensors_header(d / "model.safetensors")
    return hc, config, header


def read_head_state(d: Path | str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(head.json, config.json, the head's weights) of run folder `d`, after `check_run`: the tensors are compared
    with the head head.json describes (built on the meta device) before any is read, then loaded (nothing
    unpickled) and checked finite."""
    from safetensors.torch import load_file

    d = Path(d)
    hc, config, header = check_run(d)
    meta = _meta_head(d / "head.json", hc)
    check_tensors(d / "model.safetensors", header, meta.state_dict(), f"the {hc['name']} head of head.json")
    try:
        state = load_file(str(d / "model.safetensors"), device="cpu")
    except Exception as e:  # the header was checked; the data could still fail to read
        raise MMCacheError(f"{d / 'model.safetensors'}: unreadable ({type(e).__name__})") from None
    check_finite(d / "model.safetensors", state)
    return hc, config, state


def load_head(d: Path | str, device: str = "cpu") -> tuple[Head, dict[str, Any]]:
    """The trained head of run folder `d` and its config (`read_head_state`)."""
    from mmcache.heads.base import build_head

    hc, config, state = read_head_state(d)
    inputs = {m: {k: tuple(v) for k, v in a.items()} for m, a in hc["inputs"].items()}
    head = build_head(hc["name"], inputs, hc["tasks"], hc["hparams"])
    head.load_state_dict(state)
    head.to(device).eval()
    return head, config


def load_extra_tensors(path: Path, want: dict[str, Any], what: str) -> dict[str, Any]:
    """Tensors of a run's other safetensors file (encoders.safetensors) whose names `want` (a state dict) holds:
    the header checked and each tensor's shape and dtype compared before it is read; finite."""
    from safetensors import safe_open

    header = safetensors_header(path)
    for k, (dtype, shape) in header.items():
        t = want.get(k)
        if t is None:
            continue
        tdt = TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if list(t.shape) != shape or tdt != dtype:
            raise MMCacheError(f"{path}: tensor {k!r} is {dtype} {shape}, {what} needs {tdt} {list(t.shape)}")
    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in header:
                if k in want:
                    out[k] = f.get_tensor(k)
    except Exception as e:
        raise MMCacheError(f"{path}: unreadable ({type(e).__name__})") from None
    check_finite(path, out)
    return out


def check_finite_outputs(logits: dict[str, Any], where: str) -> None:
    """Prediction refuses NaN or infinite outputs, as training does."""
    import torch

    for t, v in logits.items():
        if not bool(torch.isfinite(v).all()):
            raise MMCacheError(f"{where}: the head's {t} outputs hold NaN or infinite values; the run's weights or "
                               "the inputs' features are damaged: check the run folder, or train it again")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_spec_paths(spec: Any, where: str) -> None:
    """Local paths a store spec names (weights files, model folders) as a user could have given them: existing,
    matching the `weights_sha256` recorded beside them before any is loaded, and a model folder holding no
    pickled weights when it holds no safetensors."""
    if not isinstance(spec, dict):
        raise MMCacheError(f"{where}: the spec is not an object")
    for key, value in spec.items():
        if not isinstance(value, str) or not (os.path.isabs(value) or value.startswith(("./", "../", "~"))):
            continue
        if key in ("run",):  # finetuned:RUN: checked as a run folder when it is read
            continue
        path = Path(os.path.expanduser(value))
        if not path.exists():
            raise MMCacheError(f"{where}: {key} {value} not found; restore the files the run was trained with")
        if not (path.is_file() or path.is_dir()):
            raise MMCacheError(f"{where}: {key} {value} is neither a file nor a folder")
        want = spec.get("weights_sha256")
        if not isinstance(want, str):
            raise MMCacheError(f"{where}: {key} {value} comes without the weights_sha256 a local path is recorded "
                               "with; not a spec mmcache wrote")
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file()]
            if any(p.suffix in PICKLE_SUFFIXES for p in files) and not any(p.suffix == ".safetensors" for p in files):
                raise MMCacheError(f"{where}: {key} {value} holds pickled weights and no safetensors; mmcache never "
                                   "unpickles a run's files")
        from mmcache.extract.weights import weights_sha256

        if weights_sha256(path) != want:
            raise MMCacheError(f"{where}: {key} {value} is not the file the run was trained with (weights_sha256 "
                               "changed: its sha256 differs from the recorded one); restore it, or train again")


# ---------------------------------------------------------------- writing a run folder (every trainer's)


def named_run_dir(base: Path, run_name: str) -> Path:
    """`base / run_name`, refused unless the name is one folder name (`check_name`)."""
    return base / check_name(run_name, "--run-name")


def new_run_dir(runs_dir: str | Path, dataset: str, run_name: str | None, stem_parts: list[str],
                overwrite: bool = False, taken: set[Path] | None = None) -> Path:
    """`<runs_dir>/<dataset>/<run_name>`, taken for this process until its folder is written (refused when another
    process holds the name, or when it exists and holds files, unless `overwrite`), or a fresh `<parts>_<time>`
    folder name that collides with no existing folder, no name another run holds, nor a name in `taken` (the
    folders handed out earlier in the same call, not yet written; the new one is added). See `take_run_dir`."""
    return take_run_dir(Path(runs_dir) / check_name(dataset, "--dataset", "demo"), run_name, stem_parts, overwrite,
                        taken)


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def metrics_json(result: RunResult) -> dict[str, Any]:
    """The one `metrics.json` layout."""
    return {"best_epoch": result.best_epoch, "select": result.select, "fit_seconds": result.fit_seconds,
            "seconds": result.seconds, "splits": result.metrics,
            **({"by_source": result.by_source} if result.by_source else {}),
            **({"cost": result.cost} if result.cost else {})}


def write_run(d: Path, result: RunResult, tasks: dict[str, list[str]], dataset: str,
              criterion: nn.Module | None = None, encoders: dict[str, torch.Tensor] | None = None,
              metrics_extra: dict[str, Any] | None = None) -> Path:
    """Write run folder `d` whole (`write_whole`: a temporary folder beside it, each file
    fsynced, renamed into place): model.safetensors (the head), head.json, config.json, metrics.json (plus
    `metrics_extra`), versions.json, curves.json/.csv, curves.png, confusion_<task>.png; criterion.safetensors when
    the loss has state; encoders.safetensors with the encoder weights that were trained (fine-tuning; its sha256
    goes into config.json's `resolved.encoders_sha256`). Nothing is pickled."""
    from safetensors.torch import save_file

    from mmcache.utils import versions, write_json

    head = result.head
    head_config = getattr(head, "config", {})

    def fill(t: Path, writing: Callable[[str], str]) -> None:
        save_file(_tensors(head.state_dict()), str(t / writing("model.safetensors")),
                  metadata={"head": json.dumps(head_config)})
        if criterion is not None:
            crit_state = _tensors(criterion.state_dict())
            if crit_state:
                save_file(crit_state, str(t / writing("criterion.safetensors")))
        if encoders:
            save_file(_tensors(encoders), str(t / writing("encoders.safetensors")))
            # The trained weights by content: a file replaced since is refused when loading the run.
            result.config.setdefault("resolved", {})["encoders_sha256"] = file_sha256(t / "encoders.safetensors")
        write_json(t / writing("head.json"), head_config)
        write_json(t / writing("config.json"), result.config)
        write_json(t / writing("metrics.json"), {**metrics_json(result), **(metrics_extra or {})})
        write_json(t / writing("versions.json"), versions())
        writing("curves.json")
        write_curves(t, result.curves)
        writing("curves.png")
        plot_run_curves(t, result, dataset, d.name)
        writing("confusion plots")
        plot_confusions(t, result.metrics, tasks, dataset)
        if result.predictions is not None:  # per-row test predictions, for the tables' paired tests
            from mmcache.stats import PREDICTIONS_FILE, write_predictions

            writing(PREDICTIONS_FILE)
            write_predictions(t, result.predictions)

    return write_whole(d, fill)


def write_curves(d: Path, curves: list[dict[str, Any]]) -> None:
    """Per-epoch curves as curves.json and curves.csv (one row per epoch)."""
    from mmcache.utils import write_json

    write_json(d / "curves.json", curves)
    if curves:
        cols = list(dict.fromkeys(k for row in curves for k in row))
        with (d / "curves.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(curves)


def plot_run_curves(d: Path, result: RunResult, dataset: str, name: str | None = None) -> None:
    """curves.png: train/val loss and the validation selection metric per epoch, the chosen epoch marked."""
    from mmcache.plots import plot_curves

    metric = result.select.get("metric")
    plot_curves(result.curves, d / "curves.png", metric, result.best_epoch,
                f"{dataset} {name or d.name}: val {result.select.get('task', '')}:{metric} "
                f"{result.select.get('value', 0.0):.4f}")


def plot_confusions(d: Path, metrics: dict[str, dict[str, dict[str, Any]]], tasks: dict[str, list[str]],
                    dataset: str) -> None:
    """confusion_<task>.png of the test split (val when test has no labels), one per task."""
    import numpy as np

    from mmcache.plots import plot_confusion

    split = "test" if metrics.get("test") else "val"
    for t, m in metrics.get(split, {}).items():
        if "confusion_matrix" in m:
            plot_confusion(np.asarray(m["confusion_matrix"]), tasks[t], d / f"confusion_{t}.png",
                           f"{dataset} {split} {t}: acc {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")


def run_offsets(config: dict[str, Any]) -> dict[str, list[float]]:
    """The logit adjustment a run folder's `config.json` records (task -> offsets subtracted), empty if none."""
    return dict((config.get("resolved") or {}).get("logit_adjust", {}).get("offsets") or {})
