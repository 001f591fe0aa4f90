"""Generic table adapter: any CSV / TSV / JSON / JSONL of image, text, label."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mmcache.data.base import Dataset, LabelSpace, Sample, register_dataset
from mmcache.data.splits import stratified_split
from mmcache.errors import MMCacheError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
LABELS_FILE = "labels.json"


def find_table(root: Path) -> Path:
    """The table file: `root` itself if it is a file, else the single table inside `root`."""
    if root.is_file():
        return root
    found = sorted(p for p in root.iterdir() if p.suffix.lower() in TABLE_SUFFIXES and p.name != LABELS_FILE)
    if len(found) != 1:
        raise MMCacheError(
            f"{root}: expected exactly one table file (.csv/.tsv/.json/.jsonl), found "
            f"{[p.name for p in found] or 'none'}; pass the file itself as --data-dir"
        )
    return found[0]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV/JSON/JSONL file as dicts; errors name the file and line."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise MMCacheError(f"{path}:{line_no}: unreadable JSON line ({e.msg}); fix or remove it") from None
            return rows
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise MMCacheError(f"{path}: not UTF-8 text ({e}); re-save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise MMCacheError(f"{path}: unreadable JSON ({e}); fix the file") from None
    if isinstance(obj, dict):  # {"id": {...}, ...}
        return [{"id": k, **v} for k, v in obj.items()]
    return list(obj)


def _get(row: dict[str, Any], *names: str) -> Any:
    for n in names:
        v = row.get(n)
        if v not in (None, ""):
            return v
    return None


@register_dataset("table")
def load_table(
    root: Path, name: str = "table", seed: int = 0, label_names: list[str] | None = None, **_: Any
) -> Dataset:
    """Load a table with columns image/image_path, text, label [, id, split, entity, ctx_text, video, audio].

    Label names are mapped to indices in sorted order (or the order of `labels.json` beside
    the table, if present) and saved there so indices stay stable. Rows without a `split`
    column get a seeded, stratified 8:1:1 split.
    """
    table = find_table(root)
    base = table.parent
    rows = read_rows(table)
    if not rows:
        raise MMCacheError(f"{table}: the table has no rows")
    labels_path = base / LABELS_FILE
    if label_names is None and labels_path.exists():
        label_names = LabelSpace.from_json(json.loads(labels_path.read_text())).tasks["label"]
    raw_labels = [_get(r, "label") for r in rows]
    if label_names is None:
        label_names = sorted({str(v) for v in raw_labels if v is not None})
        labels_path.write_text(json.dumps(LabelSpace({"label": label_names}).to_json(), indent=1))
    space = LabelSpace({"label": label_names})

    def media(v: Any) -> str | None:
        return None if v is None else str(base / str(v))

    samples: list[Sample] = []
    label_idx: list[int] = []
    for i, row in enumerate(rows):
        where = f"{table}, row {i + 1}: "
        lab = raw_labels[i]
        labels = {} if lab is None else {"label": space.index("label", str(lab), where)}
        label_idx.append(labels.get("label", -1))
        image, text = _get(row, "image", "image_path"), _get(row, "text")
        if image is None and text is None and _get(row, "video", "audio") is None:
            raise MMCacheError(f"{where}no image, text, video or audio; fill it in or drop the row")
        samples.append(
            Sample(
                id=str(_get(row, "id") or i),
                split=str(_get(row, "split") or ""),
                text=None if text is None else str(text),
                image=media(image),
                video=media(_get(row, "video")),
                audio=media(_get(row, "audio")),
                entity=_get(row, "entity"),
                context=_get(row, "ctx_text", "context"),
                labels=labels,
            )
        )
    if any(not s.split for s in samples):
        splits = stratified_split(label_idx, seed=seed)
        samples = [s if s.split else _with_split(s, sp) for s, sp in zip(samples, splits, strict=True)]
    return Dataset(name=name, samples=samples, labels=space, root=base)


def _with_split(s: Sample, split: str) -> Sample:
    from dataclasses import replace

    return replace(s, split=split)
