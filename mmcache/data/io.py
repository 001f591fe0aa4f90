"""Shared reading helpers for the adapters: robust text, delimited files, split names, file lookup."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from mmcache import progress
from mmcache.data.base import id_problem
from mmcache.errors import MMCacheError

T = TypeVar("T")

# Split names as datasets spell them -> the canonical train / val / test.
SPLIT_ALIASES = {
    "train": "train", "training": "train", "trn": "train",
    "val": "val", "valid": "val", "validation": "val", "validate": "val", "dev": "val", "development": "val",
    "dev_seen": "val", "test": "test", "testing": "test", "tst": "test", "test_seen": "test",
    "test_public": "test",
}
SPLIT_ORDER = ("train", "val", "test")

# Fields of Fakeddit/MMHS150K can be long; the csv module's default limit (128 KiB) is not enough everywhere.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def normalise_split(name: str) -> str:
    """Canonical split name: dev/valid/validation -> val, training -> train, ...; others lower-cased."""
    key = str(name).strip().lower().replace("-", "_")
    return SPLIT_ALIASES.get(key, key)


def split_sort_key(name: str) -> tuple[int, str]:
    """Sort key that puts train, val, test first, then other splits alphabetically."""
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def decode_bytes(raw: bytes) -> str:
    """Decode text of unknown encoding: UTF-8 (with or without BOM), else cp1252, else latin-1 (never fails)."""
    for enc in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def parse_json(text: str, where: Path | str, fix: str = "fix the file") -> Any:
    """`text` parsed as JSON; a syntax error is one line naming `where`, the line and what to do (`fix`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MMCacheError(f"{where}: unreadable JSON at line {e.lineno} ({e.msg}); {fix}") from None


def fix_mojibake(s: str) -> str:
    """Undo UTF-8 text that was decoded as cp1252 once ("donâ€™t" -> "don’t"); leave other text alone."""
    if not any(ch in s for ch in "âÃ\x92\x93\x94\x85"):
        return s
    try:
        return s.encode("cp1252").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return s


def read_text(path: Path) -> str:
    """A short text file (a tweet, a caption) read robustly: any encoding, NULs dropped, stripped."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MMCacheError(f"{path}: cannot read ({e.strerror}); restore the file or drop its row") from None
    return decode_bytes(raw).replace("\x00", "").strip()


def text_lines(text: str) -> list[str]:
    """Split on newlines only: str.splitlines also splits on U+2028, \\x85, \\x1c..., which occur inside tweets."""
    return [ln.rstrip("\r") for ln in text.split("\n")]


def open_text(path: Path) -> list[str]:
    """Lines of a text file of unknown encoding (decoded as a whole, so one odd byte does not break it)."""
    if not path.is_file():
        raise MMCacheError(f"{path} not found; check the dataset layout (see docs/howto/datasets.md)")
    lines = text_lines(decode_bytes(path.read_bytes()))
    return lines[:-1] if lines and lines[-1] == "" else lines


def iter_delimited(path: Path, delimiter: str = ",", quoting: Literal[0, 1, 2, 3] = csv.QUOTE_MINIMAL,
                   required: Iterable[str] = (), stream: bool = False) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV/TSV as (line number, dict); a missing column or ragged row names the file and line.

    Parsing is strict: a quote opened and never closed (which would swallow the rows after it into
    one cell) is an error naming the line it opened on. `stream=True` reads a large file as UTF-8
    (bad bytes replaced) without holding it in memory.
    """
    if not path.is_file():
        raise MMCacheError(f"{path} not found; check the dataset layout (see docs/howto/datasets.md)")
    f: Any
    if stream:
        f = path.open(encoding="utf-8-sig", errors="replace", newline="")
    else:
        f = io.StringIO(decode_bytes(path.read_bytes()), newline="")
    with f:
        # strict: text after a closing quote, or the end of the file inside quotes, is an error.
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=True)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise MMCacheError(f"{path}: the file is empty; restore it from the dataset archive") from None
        except csv.Error as e:
            raise MMCacheError(f"{path}, line 1: unreadable header ({e}); is this the right file?") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise MMCacheError(f"{path}: missing column(s) {missing}; the header is {header}. "
                               "Is this the right file?")
        while True:
            start = reader.line_num + 1  # a record may span lines (quoted newlines); report where it began
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise MMCacheError(_row_error(path, start, reader.line_num, e)) from None
            line = reader.line_num
            if len(fields) != len(header):
                if not "".join(fields).strip():  # blank line
                    continue
                raise MMCacheError(f"{path}, line {line}: {len(fields)} fields where the header has "
                                   f"{len(header)}; fix or remove the row")
            yield line, dict(zip(header, fields, strict=True))


def _row_error(path: Path, start: int, end: int, err: csv.Error) -> str:
    if end > start:
        return (f"{path}, line {start}: a quote opened on this line is not closed where it should be (the row runs "
                f"on to line {end}: {err}); close the quote, or double a quote inside a quoted cell (\"\")")
    return f"{path}, line {start}: unreadable row ({err}); fix the quotes or remove the row"


def read_delimited(path: Path, delimiter: str = ",", quoting: Literal[0, 1, 2, 3] = csv.QUOTE_MINIMAL,
                   required: Iterable[str] = ()) -> list[tuple[int, dict[str, str]]]:
    """All rows of a (small) CSV/TSV as (line number, dict) pairs; see `iter_delimited`."""
    return list(iter_delimited(path, delimiter, quoting, required))


@overload
def locate(root: Path, name: str, kind: str = "file", hint: str = "", required: Literal[True] = True) -> Path: ...


@overload
def locate(root: Path, name: str, kind: str = "file", hint: str = "", *, required: bool) -> Path | None: ...


def locate(root: Path, name: str, kind: str = "file", hint: str = "", required: bool = True) -> Path | None:
    """Find `name` in `root` or up to two folder levels below it (archives often add a top folder).

    Several hits are resolved by `hint` (a substring of the path, e.g. "2015"); still ambiguous is an error.
    None when nothing is found, unless `required` (the default), which makes that an error.
    """
    want = Path.is_file if kind == "file" else Path.is_dir
    direct = root / name
    if want(direct):
        return direct
    hits = [p for pattern in (f"*/{name}", f"*/*/{name}") for p in sorted(root.glob(pattern)) if want(p)]
    if hint and len(hits) > 1:
        hits = [p for p in hits if hint in str(p.relative_to(root))] or hits
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise MMCacheError(f"{root}: several {name!r} found ({[str(p) for p in hits[:4]]}); "
                           "point --data-dir at the one you mean")
    if required:
        raise MMCacheError(f"{root}: no {kind} {name!r} (looked in the folder and two levels below); "
                           "check the dataset layout (see docs/howto/datasets.md) or --data-dir")
    return None


class IdCheck:
    """Remembers where each id was seen (file, line), so a duplicate names both places."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[Path | str, int | None]] = {}

    def add(self, sid: str, path: Path | str, line: int | None = None) -> None:
        """Record `sid` seen at `path`, `line`; raise if it was seen before or cannot be an id."""
        why = id_problem(sid)
        if why is not None:
            raise MMCacheError(f"{where(path, line)}: id {sid!r:.80} {why}; fix the id in the file")
        first = self.seen.get(sid)
        if first is not None:
            raise MMCacheError(f"{where(path, line)}: duplicate id {sid!r} (first seen at {where(*first)}); "
                               "ids must be unique, remove one of the rows")
        self.seen[sid] = (path, line)


def where(path: Path | str, line: int | None = None) -> str:
    """`file, line N` for error messages."""
    return f"{path}" if line is None else f"{path}, line {line}"


@contextmanager
def show_progress(on: bool) -> Iterator[None]:
    """Within the block, adapters show their progress bars only if `on` (`--no-progress` turns them off)."""
    with progress.progress_enabled(on):
        yield


def progress_bar(items: Iterable[T], desc: str, unit: str) -> Iterable[T]:
    """A transient bar over `items` by the one policy (`mmcache.progress`), unless progress is off."""
    return progress.bar(items, desc=desc, unit=unit)


def warn(msg: str) -> None:
    """A one-line warning on stderr (what was skipped and why); a progress bar on screen is redrawn below it."""
    progress.write(f"warning: {msg}", file=sys.stderr)


def as_bool(value: Any, name: str) -> bool:
    """An option given as a bool or as text from the command line (`-o ocr=false`)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise MMCacheError(f"option {name}={value!r} must be true or false")


def as_int(value: Any, name: str) -> int:
    """An integer option given as int or text (`-o seed=3`)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MMCacheError(f"option {name}={value!r} must be an integer") from None


def order_tasks(tasks: dict[str, list[str]], primary: str | None, dataset: str) -> dict[str, list[str]]:
    """Tasks reordered so `primary` comes first (it becomes the LabelSpace's primary task)."""
    if primary is None:
        return tasks
    if primary not in tasks:
        raise MMCacheError(f"dataset {dataset!r} has no task {primary!r}; tasks are {list(tasks)}")
    return {primary: tasks[primary], **{k: v for k, v in tasks.items() if k != primary}}


def assign_splits(labels: list[int], seed: int = 0, fold: int | None = None, k: int = 10) -> list[str]:
    """Splits for a dataset without official ones: stratified 8:1:1 by seed, or fold `fold` of k-fold CV."""
    from mmcache.data.splits import kfold_split, stratified_split

    seed = as_int(seed, "seed")
    fold = None if fold is None else as_int(fold, "fold")
    if len(labels) < k:
        raise MMCacheError(f"only {len(labels)} rows: a generated split (8:1:1 or {k}-fold) needs at least {k}; "
                           "give the rows a split column instead")
    if fold is None:
        return stratified_split(labels, seed=seed)
    if not 0 <= fold < k:
        raise MMCacheError(f"--fold must be in 0..{k - 1} ({k}-fold cross-validation), got {fold}")
    return kfold_split(labels, fold, k=k, seed=seed)


def fill_missing_splits(samples: list[Any], where: str, primary: str | None, seed: int = 0,
                        fold: int | None = None) -> tuple[list[Any], str | None]:
    """Give samples without a split a generated one (stratified by the primary task); returns (samples, note).

    Every sample has a split already: unchanged, no note. None has: `assign_splits`. Some have: an error,
    since mixing given and generated splits would leak rows across them.
    """
    from dataclasses import replace

    if all(s.split for s in samples):
        return samples, None
    if any(s.split for s in samples):
        raise MMCacheError(f"{where}: some rows have a split and some do not; give every row one or drop the split")
    y = [s.labels.get(primary, -1) if primary else 0 for s in samples]
    splits = assign_splits(y, seed=seed, fold=fold)
    how = f"10-fold CV, fold {fold}" if fold is not None else f"8:1:1 stratified, seed {seed}"
    return [replace(s, split=sp) for s, sp in zip(samples, splits, strict=True)], f"splits assigned: {how}"
