"""Twitter-15 / Twitter-17 entity-level sentiment in the TomBERT TSV layout.

    <root>/train.tsv  dev.tsv  test.tsv     (or <root>/twitter2015/*.tsv)
        index<TAB>#1 Label<TAB>#2 ImageID<TAB>#3 String<TAB>#3 String
        0<TAB>2<TAB>1860693.jpg<TAB>RT @ ltsChuckBass : $T$ is everything # MCM<TAB>Chuck Bass
    <root>/twitter2015_images/<image id>    (or images/)
    [<root>/captions.json]   optional {image id: caption} -> Sample.context

Labels 0/1/2 = negative/neutral/positive. The sample text is the tweet with `$T$` replaced by
the target entity; the entity is kept in `Sample.entity`. Sample ids are `<split>/<index>`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mmcache.data.base import Dataset, LabelSpace, Sample, adapter_options, register_dataset
from mmcache.data.io import IdCheck, decode_bytes, locate, open_text, parse_json, text_lines
from mmcache.errors import MMCacheError

LABELS = ["negative", "neutral", "positive"]
SPLIT_FILES = (("train", "train.tsv"), ("val", "dev.tsv"), ("test", "test.tsv"))
PLACEHOLDER = "$T$"


def read_tomBERT_tsv(path: Path) -> list[tuple[int, list[str]]]:
    """Rows of a TomBERT TSV as (line, [index, label, image id, tweet, entity]); header checked."""
    lines = list(open_text(path))
    if not lines or not lines[0].lower().startswith("index"):
        raise MMCacheError(f"{path}, line 1: expected the header 'index<TAB>#1 Label<TAB>#2 ImageID<TAB>#3 String"
                           "<TAB>#3 String'; is this a TomBERT TSV?")
    out = []
    # Tweets contain quotes; the files are not quoted, so quoting must be off.
    for n, fields in enumerate(csv.reader(lines[1:], delimiter="\t", quoting=csv.QUOTE_NONE), 2):
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != 5:
            raise MMCacheError(f"{path}, line {n}: {len(fields)} fields, expected 5 (index, label, image id, "
                               "tweet, entity); fix or remove the row")
        out.append((n, [f.strip() for f in fields]))
    return out


def load_captions(path: Path | None) -> dict[str, str]:
    """Image id -> caption from a JSON object, JSON lines ({image, caption}) or a 2-column TSV."""
    if path is None:
        return {}
    if not path.is_file():
        raise MMCacheError(f"captions file {path} not found; pass an existing file with -o captions=PATH")
    raw = decode_bytes(path.read_bytes())
    if path.suffix.lower() == ".json":
        obj = parse_json(raw, path)
        if not isinstance(obj, dict):
            raise MMCacheError(f"{path}: expected a JSON object {{image id: caption}}")
        return {str(k): str(v) for k, v in obj.items()}
    out = {}
    for n, line in enumerate(text_lines(raw), 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                row = json.loads(line)
                out[str(row["image"])] = str(row["caption"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MMCacheError(f"{path}, line {n}: expected {{\"image\": ..., \"caption\": ...}}") from None
        else:
            parts = line.split("\t")
            if len(parts) != 2:
                raise MMCacheError(f"{path}, line {n}: expected 'image id<TAB>caption'; fix the line")
            out[parts[0].strip()] = parts[1].strip()
    return out


def load_twitter(root: Path, year: str, seed: int = 0, captions: str | None = None) -> Dataset:
    """Load one of the TomBERT datasets (`year` "2015" or "2017")."""
    name = f"twitter{year[2:]}"
    train = locate(root, "train.tsv", hint=year)
    base = train.parent
    image_dir = (locate(root, f"twitter{year}_images", kind="dir", required=False)
                 or locate(root, "images", kind="dir", hint=year, required=False))
    if image_dir is None:
        raise MMCacheError(f"{root}: no image folder twitter{year}_images/ or images/; unpack the tweet images "
                           "there or pass --data-dir")
    cap_path = Path(captions) if captions else locate(root, "captions.json", required=False)
    caps = load_captions(cap_path)
    ids = IdCheck()
    samples: list[Sample] = []
    no_placeholder = 0
    for split, fname in SPLIT_FILES:
        path = base / fname
        if not path.is_file():
            raise MMCacheError(f"{path} not found; {name} needs train.tsv, dev.tsv and test.tsv side by side")
        for line, (index, label, image_id, tweet, entity) in read_tomBERT_tsv(path):
            where = f"{path}, line {line}"
            sid = f"{split}/{index}"
            ids.add(sid, path, line)
            if label not in ("0", "1", "2"):
                raise MMCacheError(f"{where}: label {label!r} is not 0 (negative), 1 (neutral) or 2 (positive); "
                                   "fix the row")
            if PLACEHOLDER not in tweet:
                no_placeholder += 1
            image = image_id if Path(image_id).suffix else f"{image_id}.jpg"
            samples.append(Sample(id=sid, split=split, text=tweet.replace(PLACEHOLDER, entity),
                                  image=str(image_dir / image), entity=entity, context=caps.get(image_id),
                                  labels={"sentiment": int(label)}))
    notes = [f"captions from {cap_path} ({sum(s.context is not None for s in samples)} samples)"] if caps else []
    if no_placeholder:
        notes.append(f"{no_placeholder} tweets have no {PLACEHOLDER}; their text is kept as is")
    return Dataset(name=name, samples=samples, labels=LabelSpace({"sentiment": LABELS}, metric="accuracy"),
                   root=base, notes=notes)


TWITTER_OPTIONS = adapter_options(load_twitter, exclude=("year",))


@register_dataset("twitter15", "twitter2015", options=TWITTER_OPTIONS)
def load_twitter15(root: Path, **options: Any) -> Dataset:
    """Twitter-15 (3,179 / 1,122 / 1,037 targets)."""
    return load_twitter(root, "2015", **options)


@register_dataset("twitter17", "twitter2017", options=TWITTER_OPTIONS)
def load_twitter17(root: Path, **options: Any) -> Dataset:
    """Twitter-17 (3,562 / 1,176 / 1,234 targets)."""
    return load_twitter(root, "2017", **options)
