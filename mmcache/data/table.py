"""Generic table adapter: any CSV / TSV / JSON / JSONL of image, text, label (+ optional columns).

Columns: `image` or `image_path`, `text`, `label`, and optionally `id`, `split`, `entity`,
`ctx_text` (or `context`), `video`, `audio`, and `label_<task>` for extra tasks (multi-task).
Options name other columns: `text_column`, `image_column`, `id_column`, `split_column`,
`label_column`; a column the adapter does not read is named in the dataset's notes.
A folder may hold one table (splits from its `split` column, else a seeded 8:1:1 split) or one
table per split (`train.csv`, `dev.csv`/`val.csv`, `test.csv`, ...).
An image given as an http(s):// URL is read from its local copy under `fetched/` beside the
table, which `mmcache data fetch table` downloads once (`mmcache.data.fetch`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmcache.data.base import Dataset, LabelSpace, Sample, adapter_options, default_name, register_dataset
from mmcache.data.fetch import FETCHED_DIR, FetchPlan, Job, failed_paths, fetch_command, is_url, register_fetch, table_copy
from mmcache.data.io import (
    IdCheck,
    as_int,
    decode_bytes,
    fill_missing_splits,
    normalise_split,
    parse_json,
    read_delimited,
    text_lines,
)
from mmcache.errors import MMCacheError
from mmcache.utils import atomic_write_text

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
LABELS_FILE = "labels.json"
LABEL_PREFIX = "label_"
PRIMARY_TASK = "label"
# Fields the `<field>_column` options rename, and the columns each reads by default (the first filled one wins).
DEFAULT_COLUMNS = {"text": ("text",), "image": ("image", "image_path"), "id": ("id",), "split": ("split",)}
# Columns read under their own names only.
FIXED_COLUMNS = ("video", "video_path", "audio", "audio_path", "entity", "target", "ctx_text", "context")


def find_tables(root: Path) -> list[tuple[Path, str | None]]:
    """(table, split) pairs: `root` itself if it is a file, the single table in `root`, or one table per split."""
    if root.is_file():
        return [(root, None)]
    found = sorted(p for p in root.iterdir()
                   if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES and p.name != LABELS_FILE)
    if len(found) == 1:
        return [(found[0], None)]
    splits = {p: normalise_split(p.stem) for p in found}
    if found and all(s in ("train", "val", "test") or "unseen" in s for s in splits.values()):
        if len(set(splits.values())) != len(found):
            raise MMCacheError(f"{root}: two tables for the same split ({[p.name for p in found]}); keep one per split")
        return [(p, splits[p]) for p in found]
    raise MMCacheError(
        f"{root}: expected one table file (.csv/.tsv/.json/.jsonl) or one per split (train/val/test), found "
        f"{[p.name for p in found] or 'none'}; pass the file itself as --data-dir"
    )


def find_table(root: Path) -> Path:
    """The single table file: `root` itself if it is a file, else the one table inside `root`."""
    tables = find_tables(root)
    if len(tables) != 1:
        raise MMCacheError(f"{root}: holds one table per split; load it with the `table` adapter")
    return tables[0][0]


def read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a CSV/TSV/JSON/JSONL file as (where, dict) pairs; `where` names the file and line for errors."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return [(f"{path}, line {n}", row) for n, row in read_delimited(path, "\t" if suffix == ".tsv" else ",")]
    try:
        raw = decode_bytes(path.read_bytes())
    except OSError as e:
        raise MMCacheError(f"{path}: cannot read ({e.strerror})") from None
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text_lines(raw), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MMCacheError(f"{path}, line {n}: unreadable JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(obj, dict):
                raise MMCacheError(f"{path}, line {n}: expected a JSON object per line, got {type(obj).__name__}")
            rows.append((f"{path}, line {n}", obj))
        return rows
    obj = parse_json(raw, path)
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if isinstance(obj, dict):  # {"id": {...}, ...}
        items = [{"id": k, **v} if isinstance(v, dict) else v for k, v in obj.items()]
    else:
        items = list(obj)
    out = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise MMCacheError(f"{path}, item {i}: expected a JSON object, got {type(item).__name__}")
        out.append((f"{path}, item {i}", item))
    return out


def _get(row: dict[str, Any], *names: str) -> Any:
    for n in names:
        v = row.get(n)
        if v is not None and str(v).strip() != "":
            return v
    return None


def label_str(v: Any) -> str:
    """A label or id value as the string it is matched by: JSON may give 1 or 1.0 or True for a class written
    "1" elsewhere (all become "1"); other values as text without surrounding blanks."""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def sorted_names(values: set[str]) -> list[str]:
    """Class names in a stable order: numeric order if all are integers, else alphabetical."""
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def label_columns(rows: list[tuple[str, dict[str, Any]]], where: Path,
                  label_column: str = PRIMARY_TASK) -> dict[str, str]:
    """Task name -> column: `label_column` is the primary task, each `label_<task>` column an extra one.

    A table with no label column at all (or without the `label_column` asked for) is an error.
    """
    cols: dict[str, str] = {}
    seen: dict[str, None] = {}
    for _, row in rows:
        for c in row:
            seen.setdefault(c)
            if c == label_column:
                cols.setdefault(label_column, c)
            elif c.startswith(LABEL_PREFIX) and len(c) > len(LABEL_PREFIX):
                cols.setdefault(c[len(LABEL_PREFIX):], c)
    if label_column in cols:
        return {label_column: cols[label_column], **cols}
    if not cols or label_column != PRIMARY_TASK:
        raise MMCacheError(f"{where}: no {label_column!r} column (columns: {', '.join(seen)}); name the column "
                           "holding the class `label`, or pass -o label_column=NAME")
    return cols


def load_label_space(path: Path) -> LabelSpace | None:
    """The saved label space beside a table, if any; a task saved without classes counts as not saved."""
    if not path.exists():
        return None
    try:
        space = LabelSpace.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise MMCacheError(f"{path}: unreadable label file ({e}); fix it or delete it to rebuild it") from None
    space.tasks = {t: names for t, names in space.tasks.items() if names}
    return space


def present_label_columns(rows: list[dict[str, Any]], space: LabelSpace, label_column: str = PRIMARY_TASK) -> dict[str, str]:
    """Task -> column for the tasks of `space` a table has a column for (`label_column` is the primary task's,
    `label_<task>` each task's); none at all is fine (an unlabelled table, for prediction)."""
    seen = {c for row in rows for c in row}
    cols = {t: f"{LABEL_PREFIX}{t}" for t in space.tasks if f"{LABEL_PREFIX}{t}" in seen}
    if label_column in seen:
        cols[space.primary] = label_column
    return cols


def _table_label_space(rows: list[tuple[str, dict[str, Any], str | None]], cols: dict[str, str], source: Path,
                       base: Path, label_names: list[str] | None, metric: str | None) -> LabelSpace:
    """The label space of a table's label columns: from `labels.json` beside it, else `label_names` (primary
    task), else the sorted names found; written back to `labels.json` when it changed."""
    primary = next(iter(cols))
    labels_path = base / LABELS_FILE
    saved = load_label_space(labels_path)
    tasks: dict[str, list[str]] = {}
    for task, col in cols.items():
        if saved is not None and task in saved.tasks:
            tasks[task] = list(saved.tasks[task])
        elif task == primary and label_names is not None:
            tasks[task] = [str(n) for n in label_names]
        else:
            tasks[task] = sorted_names({label_str(r[col]) for _, r, _ in rows if _get(r, col) is not None})
        if not tasks[task]:  # an empty label space would be saved and then refuse every label filled in later
            raise MMCacheError(f"{source}: column {col!r} is blank in every row, so task {task!r} has no classes; "
                               "fill in the labels, or remove or rename the column")
    space = LabelSpace(tasks, metric=metric or (saved.metric if saved else "accuracy"))
    if saved is None or saved.tasks != tasks or (metric and saved.metric != metric):
        try:
            atomic_write_text(labels_path, json.dumps(space.to_json(), indent=1))  # processes may load at once
        except OSError:
            pass  # a read-only dataset folder still loads; indices then follow the sorted names
    return space


def load_table(
    root: Path,
    name: str | None = None,
    seed: int = 0,
    fold: int | None = None,
    label_names: list[str] | None = None,
    image_root: str | Path | None = None,
    metric: str | None = None,
    label_column: str = PRIMARY_TASK,
    text_column: str | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    split_column: str | None = None,
) -> Dataset:
    """Load a table (or one table per split); label names -> indices, saved to `labels.json` beside it.

    Class order comes from `labels.json` if present (so indices stay stable when rows change), else
    from `label_names` (primary task), else sorted names; a label outside a saved space is an error.
    Rows without a split get a seeded, stratified 8:1:1 split, or fold `fold` of 10-fold CV. The
    dataset is named `name`, else after the table file (or the folder of per-split tables).
    `text_column`, `image_column`, `id_column`, `split_column` name the column of that field when
    it is not the default (`text`, `image`/`image_path`, `id`, `split`).
    """
    return _load_table(root, name, seed=seed, fold=fold, label_names=label_names, image_root=image_root,
                       metric=metric, label_column=label_column,
                       columns={"text": text_column, "image": image_column, "id": id_column, "split": split_column})


def load_unlabelled_table(root: Path, label_space: LabelSpace, name: str | None = None,
                          image_root: str | Path | None = None, label_column: str = PRIMARY_TASK,
                          text_column: str | None = None, image_column: str | None = None,
                          id_column: str | None = None, split_column: str | None = None) -> Dataset:
    """A table of new rows to predict on, in a trained model's `label_space`: labels are optional (those
    present are read in that space, and one outside it is an error), nothing is saved beside the table,
    and rows keep the split they have, or none (no split is generated)."""
    return _load_table(root, name, image_root=image_root, label_column=label_column, label_space=label_space,
                       columns={"text": text_column, "image": image_column, "id": id_column, "split": split_column})


def resolve_columns(seen: list[str], given: dict[str, Any] | None, source: Path) -> dict[str, tuple[str, ...]]:
    """Field -> the columns it reads: the `<field>_column` option given (which must be a column of the table),
    else the defaults (`DEFAULT_COLUMNS`)."""
    out: dict[str, tuple[str, ...]] = {}
    named: dict[str, str] = {}
    for fld, default in DEFAULT_COLUMNS.items():
        col = (given or {}).get(fld)
        if col is None:
            out[fld] = default
            continue
        if not isinstance(col, str) or col not in seen:
            raise MMCacheError(f"{source}: -o {fld}_column={col!r}: the table has no such column (columns: "
                               f"{_names(seen)}); name one of them")
        if col in named:
            raise MMCacheError(f"{source}: -o {named[col]}_column and -o {fld}_column both name column {col!r}; "
                               "give each field its own column")
        named[col] = fld
        out[fld] = (col,)
    return out


def _names(columns: Iterable[str]) -> str:
    return ", ".join(c if c.strip() else repr(c) for c in columns)


def _column_options(columns: dict[str, Any] | None) -> str:
    """The `-o <field>_column=` options of a command line (for the fetch command named in errors)."""
    return "".join(f" -o {f}_column={c}" for f, c in (columns or {}).items() if c is not None and f == "image")


def _load_table(root: Path, name: str | None = None, *, seed: int = 0, fold: int | None = None,
                label_names: list[str] | None = None, image_root: str | Path | None = None, metric: str | None = None,
                label_column: str = PRIMARY_TASK, label_space: LabelSpace | None = None,
                columns: dict[str, Any] | None = None) -> Dataset:
    """`load_table` and `load_unlabelled_table`: with `label_space` the rows are read in that space (labels
    optional, nothing saved, no split generated); `columns`: field -> the column named for it, or None."""
    root = Path(root)
    name = name or default_name(root, "table")
    if label_names is not None and (not isinstance(label_names, list) or not label_names):
        raise MMCacheError(f"option label_names={label_names!r} must be a non-empty list of class names, "
                           'e.g. -o \'label_names=["neg","pos"]\'')
    tables, rows = _read_tables(root)
    base = tables[0][0].parent
    source = tables[0][0] if len(tables) == 1 else root  # named in errors about the whole table
    seen = list(dict.fromkeys(c for _, r, _ in rows for c in r))
    use = resolve_columns(seen, columns, source)
    if label_space is not None:
        cols = present_label_columns([r for _, r, _ in rows], label_space, label_column)
        space = label_space
    else:
        cols = label_columns([(w, r) for w, r, _ in rows], source, label_column)
        space = _table_label_space(rows, cols, source, base, label_names, metric)
    media = _MediaPaths(Path(image_root) if image_root is not None else base, base / FETCHED_DIR)
    ids = IdCheck()
    samples: list[Sample] = []
    for n, (where, row, table_split) in enumerate(rows):
        labels = _row_labels(row, where, cols, space, base, trained=label_space is not None)
        default_id = f"{table_split}-{n}" if len(tables) > 1 else str(n)
        samples.append(_row_sample(row, where, default_id, table_split, labels, use, media, ids))
    notes = _url_notes(media.urls, media.no_copy, media.fetched,
                       fetch_command("table", root) + _column_options(columns))
    read = {*cols.values(), *(c for names in use.values() for c in names), *FIXED_COLUMNS}
    unused = [c for c in seen if c not in read]
    if unused:
        notes.append(f"columns not read: {_names(unused)} (-o text_column=, image_column=, id_column=, "
                     "split_column=, label_column= name the column of a field)")
    if label_space is not None:
        return Dataset(name=name, samples=samples, labels=space, root=base, notes=notes)
    return _with_splits(name, samples, space, base, notes, str(tables[0][0]), next(iter(cols)), seed, fold)


def _read_tables(root: Path) -> tuple[list[tuple[Path, str | None]], list[tuple[str, dict[str, Any], str | None]]]:
    """The tables under `root` and their rows as (where, row, the table's split); no rows at all is an error."""
    tables = find_tables(root)
    rows: list[tuple[str, dict[str, Any], str | None]] = []
    for table, split in tables:
        rows += [(where, row, split) for where, row in read_rows(table)]
    if not rows:
        raise MMCacheError(f"{tables[0][0]}: the table has no rows; add rows or point --data-dir elsewhere")
    return tables, rows


class _MediaPaths:
    """A row's media values as paths under `root`; an image URL becomes its local copy under `fetched`, counted
    in `urls`, and listed in `no_copy` as (where, url, path) while that copy is missing."""

    def __init__(self, root: Path, fetched: Path) -> None:
        self.root = root
        self.fetched = fetched
        self.urls = 0
        self.no_copy: list[tuple[str, str, Path]] = []

    def media(self, v: Any, kind: str, where: str) -> str | None:
        """The path of a video, audio or image value (None when blank); a URL is an error."""
        if v is None:
            return None
        if is_url(v):
            raise MMCacheError(f"{where}: {kind} {str(v).strip()!r} is a URL; only images are fetched "
                               "(`mmcache data fetch`): download the file and give its path")
        return str(self.root / str(v).strip())

    def image(self, v: Any, where: str) -> str | None:
        """The path of an image value, or of the local copy of an image URL."""
        if not is_url(v):
            return self.media(v, "image", where)
        self.urls += 1
        local = table_copy(self.fetched, str(v))
        if not local.is_file():
            self.no_copy.append((where, str(v).strip(), local))
        return str(local)


def _row_labels(row: dict[str, Any], where: str, cols: dict[str, str], space: LabelSpace, base: Path,
                trained: bool) -> dict[str, int]:
    """Task -> class index of a row's filled label columns; a class outside `space` is an error that says where
    the class list comes from (`trained`: the classes of a trained run)."""
    labels = {}
    for task, col in cols.items():
        v = _get(row, col)
        if v is not None:
            try:
                labels[task] = space.index(task, label_str(v), f"{where}: ")
            except MMCacheError as e:  # say where the class list comes from
                if trained:
                    raise MMCacheError(f"{e} (the classes the run was trained on)") from None
                if (base / LABELS_FILE).is_file():
                    raise MMCacheError(f"{e}; the classes come from {base / LABELS_FILE}, which fixes them for "
                                       f"every table in {base}: add the class there, or delete the file to "
                                       "rebuild it from this table") from None
                raise
    return labels


def _row_sample(row: dict[str, Any], where: str, default_id: str, table_split: str | None, labels: dict[str, int],
                use: dict[str, tuple[str, ...]], media: _MediaPaths, ids: IdCheck) -> Sample:
    """The Sample of one row (`use`: the columns each renamed field reads; its id, else `default_id`, checked
    by `ids`); a row with no input is an error."""
    image, text = _get(row, *use["image"]), _get(row, *use["text"])
    video, audio = _get(row, "video", "video_path"), _get(row, "audio", "audio_path")
    if image is None and text is None and video is None and audio is None:
        raise MMCacheError(f"{where}: no image, text, video or audio; fill it in or drop the row")
    sid = _get(row, *use["id"])
    sid = label_str(default_id if sid is None else sid)
    ids.add(sid, where)
    split = table_split or _get(row, *use["split"])
    entity, context = _get(row, "entity", "target"), _get(row, "ctx_text", "context")
    return Sample(
        id=sid,
        split=normalise_split(split) if split is not None else "",
        text=None if text is None else str(text),
        image=media.image(image, where),
        video=media.media(video, "video", where),
        audio=media.media(audio, "audio", where),
        entity=None if entity is None else str(entity),
        context=None if context is None else str(context),
        labels=labels,
    )


def _with_splits(name: str, samples: list[Sample], space: LabelSpace, base: Path, notes: list[str], table: str,
                 primary: str, seed: int, fold: int | None) -> Dataset:
    """The dataset, rows without a split given a seeded stratified split (or fold `fold` of 10-fold CV); a fold
    is refused for a table with its own splits."""
    samples, note = fill_missing_splits(samples, table, primary, seed=seed, fold=fold)
    if note:
        notes.append(note)
    elif fold is not None:
        raise MMCacheError(f"{table}: the table has its own splits; --fold applies only to tables without "
                           "a split column")
    generated = note is not None
    return Dataset(name=name, samples=samples, labels=space, root=base, notes=notes,
                   fold=as_int(fold, "fold") if generated and fold is not None else None,
                   seed=as_int(seed, "seed") if generated else None)


register_dataset("table", options=adapter_options(load_table, exclude=("name",)))(load_table)


def write_table(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as CSV/TSV/JSON/JSONL by suffix (e.g. to export a dataset for the `table` adapter)."""
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".csv", ".tsv"):
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, delimiter="\t" if suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        raise MMCacheError(f"{path}: unknown table format; use .csv, .tsv, .json or .jsonl")
    return path


def _url_notes(urls: int, no_copy: list[tuple[str, str, Path]], folder: Path, command: str) -> list[str]:
    """Notes on a table's image URLs; a URL never fetched (no copy, no failure on record) is an error naming the
    command that fetches them."""
    if not urls:
        return []
    failed = failed_paths(folder) if no_copy else {}
    never = [(w, u) for w, u, p in no_copy if p.relative_to(folder).as_posix() not in failed]
    if never:
        where, url = never[0]
        more = f" (and {len(never) - 1} more rows)" if len(never) > 1 else ""
        raise MMCacheError(f"{where}: image {url!r} is a URL with no local copy{more}; download the table's images "
                           f"once with `{command}` (into {folder}), then run this again")
    note = f"{urls} image URLs read from their local copies in {folder}"
    if no_copy:
        note += (f"; {len(no_copy)} failed to download (reasons in {folder / 'fetch.jsonl'}; `{command} "
                 "--retry-failed` tries them again) and count as missing images")
    return [note]


@register_fetch("table")
def plan_table(root: Path, seed: int = 0, fold: int | None = None, label_names: list[str] | None = None,
               image_root: str | Path | None = None, metric: str | None = None, label_column: str = PRIMARY_TASK,
               text_column: str | None = None, image_column: str | None = None, id_column: str | None = None,
               split_column: str | None = None) -> FetchPlan:
    """The image URLs of a table: each to `fetched/<hash>.<ext>` beside the table (`table_copy`)."""
    tables = find_tables(Path(root))
    base = tables[0][0].parent
    source = tables[0][0] if len(tables) == 1 else Path(root)
    rows = [(where, row) for table, _ in tables for where, row in read_rows(table)]
    seen = list(dict.fromkeys(c for _, r in rows for c in r))
    use = resolve_columns(seen, {"text": text_column, "image": image_column, "id": id_column,
                                 "split": split_column}, source)
    folder = base / FETCHED_DIR
    jobs = []
    for where, row in rows:
        v = _get(row, *use["image"])
        if is_url(v):
            url = str(v).strip()
            jobs.append(Job(url, table_copy(folder, url), where))
    notes = [] if jobs else [f"no http(s):// image URLs in {source} (column {' / '.join(use['image'])}); "
                             "nothing to fetch"]
    return FetchPlan(jobs, folder, notes)
