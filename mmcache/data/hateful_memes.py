"""Hateful Memes (Kiela et al. 2020) in its distributed layout.

    <root>/img/<id>.png
    <root>/train.jsonl  dev_seen.jsonl  test_seen.jsonl  [dev_unseen.jsonl  test_unseen.jsonl]
    (phase-1 release: dev.jsonl, test.jsonl; a test file without labels loads unlabeled)

Each line: {"id": 42953, "img": "img/42953.png", "label": 0, "text": "..."}. Splits: train,
val (dev_seen / dev), test (test_seen / test), dev_unseen, test_unseen. The unseen sets reuse
memes of the seen ones, so their sample ids carry the split: `dev_unseen/<id>`.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmcache.data.base import Dataset, LabelSpace, Sample, register_dataset
from mmcache.data.io import IdCheck, as_bool, decode_bytes, locate, text_lines
from mmcache.errors import MMCacheError

LABELS = ["not_hateful", "hateful"]
# File stem -> split, in load order; the first of each group that exists is used.
FILES = (("train", "train"), ("dev_seen", "val"), ("dev", "val"), ("test_seen", "test"), ("test", "test"),
         ("dev_unseen", "dev_unseen"), ("test_unseen", "test_unseen"))


@register_dataset("hateful-memes", "hateful_memes")
def load_hateful_memes(root: Path, seed: int = 0, unseen: bool = True) -> Dataset:
    """Load the jsonl splits present (train required); primary metric AUROC."""
    unseen = as_bool(unseen, "unseen")
    train = locate(root, "train.jsonl")
    base = train.parent
    ids = IdCheck()
    samples: list[Sample] = []
    notes: list[str] = []
    done: set[str] = set()
    for stem, split in FILES:
        path = base / f"{stem}.jsonl"
        if split in done or not path.is_file() or (not unseen and "unseen" in split):
            continue
        done.add(split)
        n_unlabeled = 0
        before = len(samples)
        for n, line in enumerate(text_lines(decode_bytes(path.read_bytes())), 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                row = json.loads(line)
                raw_id, img = row["id"], row["img"]
            except json.JSONDecodeError as e:
                raise MMCacheError(f"{where}: unreadable JSON ({e.msg}); fix or remove the line") from None
            except (KeyError, TypeError):
                raise MMCacheError(f"{where}: a meme needs 'id' and 'img' fields; fix or remove the line") from None
            sid = str(raw_id) if "unseen" not in split else f"{split}/{raw_id}"
            ids.add(sid, path, n)
            labels = {}
            if row.get("label") is not None:
                lab = row["label"]
                if lab not in (0, 1) or isinstance(lab, bool):
                    raise MMCacheError(f"{where}: label {lab!r} is not 0 (not hateful) or 1 (hateful); fix the line")
                labels["hateful"] = int(lab)
            else:
                n_unlabeled += 1
            samples.append(Sample(id=sid, split=split, text=str(row.get("text") or ""), image=str(base / img),
                                  labels=labels))
        if len(samples) == before:
            raise MMCacheError(f"{path} holds no meme (an empty or truncated download?); restore the file or remove it")
        notes.append(f"{split}: {path.name}" + (f" ({n_unlabeled} rows without labels)" if n_unlabeled else ""))
    img_dir = base / "img"
    if not img_dir.is_dir():
        raise MMCacheError(f"{img_dir} not found; unpack the memes' images there (img/<id>.png)")
    return Dataset(name="hateful-memes", samples=samples, labels=LabelSpace({"hateful": LABELS}, metric="auroc"),
                   root=base, notes=notes)
