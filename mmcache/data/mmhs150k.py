"""MMHS150K (Gomez et al. 2020): hate speech in image+text tweets.

    <root>/MMHS150K_GT.json        {tweet id: {"tweet_text", "labels": [3 votes 0-5], ...}}
    <root>/img_resized/<id>.jpg
    <root>/img_txt/<id>.json        {"img_text": OCR text} for images with text (-> Sample.context)
    <root>/splits/train_ids.txt  val_ids.txt  test_ids.txt

Without the image archive, `mmcache data fetch mmhs150k` downloads the `img_url` of every tweet into
img_resized/ once (`mmcache.data.fetch`; the originals, not resized).

Tasks: `hate` (binary, primary): hate when at least two of the three annotators chose a hate
class; `category` (6-way): the class at least two annotators chose; items without such a
majority (e.g. votes 1, 2, 3) have no 6-way label (they are left out of that task only).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mmcache.data.base import Dataset, LabelSpace, Sample, register_dataset
from mmcache.data.fetch import FetchPlan, Job, fetch_command, is_url, register_fetch, summary_note
from mmcache.data.io import (
    IdCheck,
    as_bool,
    decode_bytes,
    locate,
    open_text,
    order_tasks,
    parse_json,
    progress_bar,
    read_text,
)
from mmcache.errors import MMCacheError

CATEGORIES = ["NotHate", "Racist", "Sexist", "Homophobe", "Religion", "OtherHate"]
BINARY = ["NotHate", "Hate"]
SPLITS = (("train", "train_ids.txt"), ("val", "val_ids.txt"), ("test", "test_ids.txt"))


def vote(labels: list[int]) -> tuple[int, int | None]:
    """(binary label by majority, 6-way label held by a majority or None) from the annotators' votes."""
    hate_votes = sum(1 for v in labels if v != 0)
    binary = int(hate_votes * 2 > len(labels))
    cls, n = Counter(labels).most_common(1)[0]
    return binary, (cls if n * 2 > len(labels) else None)


def read_ocr(path: Path) -> str | None:
    """The OCR text of one image (img_txt/<id>.json), or None when it is empty."""
    try:
        text = json.loads(read_text(path)).get("img_text")
    except (json.JSONDecodeError, AttributeError):
        raise MMCacheError(f"{path}: unreadable OCR JSON; fix or delete the file") from None
    return str(text).strip() or None if text is not None else None


@register_dataset("mmhs150k", "mmhs")
def load_mmhs150k(root: Path, seed: int = 0, task: str | None = None, ocr: bool = True) -> Dataset:
    """Load the official splits; the OCR text of an image becomes the sample's context."""
    ocr = as_bool(ocr, "ocr")
    space = LabelSpace(order_tasks({"hate": BINARY, "category": CATEGORIES}, task, "mmhs150k"), metric="auroc")
    gt_path = locate(root, "MMHS150K_GT.json")
    base = gt_path.parent
    gt = parse_json(decode_bytes(gt_path.read_bytes()), gt_path, "download it again")
    if not isinstance(gt, dict):
        raise MMCacheError(f"{gt_path}: expected a JSON object keyed by tweet id")
    split_dir = base / "splits"
    img_dir = base / "img_resized"
    if not img_dir.is_dir():
        raise MMCacheError(f"{img_dir} not found; unpack the images there (img_resized/<id>.jpg), or download them "
                           f"from the img_url entries once with `{fetch_command('mmhs150k', root)}`")
    ocr_dir = base / "img_txt"
    ocr_files = {p.stem: p for p in ocr_dir.iterdir()} if ocr and ocr_dir.is_dir() else {}
    ids = IdCheck()
    samples: list[Sample] = []
    no_majority = 0
    for split, fname in SPLITS:
        path = split_dir / fname
        lines = list(open_text(path))
        for n, line in enumerate(progress_bar(lines, desc=f"mmhs150k {split}", unit="tweet"), 1):
            sid = line.strip()
            if not sid:
                continue
            where = f"{path}, line {n}"
            ids.add(sid, path, n)
            item = gt.get(sid)
            if item is None:
                raise MMCacheError(f"{where}: tweet {sid} is not in {gt_path.name}; use the split files that came "
                                   "with this MMHS150K_GT.json")
            votes = item.get("labels") if isinstance(item, dict) else None
            if not isinstance(votes, list) or not votes:
                raise MMCacheError(f"{gt_path}, tweet {sid}: no 'labels' list; download the file again")
            for v in votes:
                if not isinstance(v, int) or not 0 <= v < len(CATEGORIES):
                    raise MMCacheError(f"{gt_path}, tweet {sid}: label {v!r} is outside 0-5 {CATEGORIES}; "
                                       "fix the entry")
            binary, category = vote(votes)
            labels = {"hate": binary}
            if category is None:
                no_majority += 1
            else:
                labels["category"] = category
            ocr_path = ocr_files.get(sid)
            samples.append(Sample(id=sid, split=split, text=str(item.get("tweet_text") or ""),
                                  image=str(img_dir / f"{sid}.jpg"),
                                  context=read_ocr(ocr_path) if ocr_path is not None else None, labels=labels))
    notes = [f"{no_majority} tweets without a 6-way majority: no 'category' label"] if no_majority else []
    unused = len(gt) - len(samples)
    if unused:
        notes.append(f"{unused} tweets of {gt_path.name} are in no split file and were left out")
    notes.append(f"OCR context for {sum(s.context is not None for s in samples)} tweets" if ocr_files
                 else "no OCR context (img_txt/ missing or -o ocr=false)")
    fetched = summary_note(img_dir, "img_url", fetch_command("mmhs150k", root))
    if fetched:
        notes.append(fetched)
    return Dataset(name="mmhs150k", samples=samples, labels=space, root=base, notes=notes)


@register_fetch("mmhs150k")
def plan_mmhs150k(root: Path, seed: int = 0, task: str | None = None, ocr: bool = True) -> FetchPlan:
    """The `img_url` of every tweet of MMHS150K_GT.json, each to img_resized/<id>.jpg."""
    gt_path = locate(root, "MMHS150K_GT.json")
    gt = parse_json(decode_bytes(gt_path.read_bytes()), gt_path, "download it again")
    if not isinstance(gt, dict):
        raise MMCacheError(f"{gt_path}: expected a JSON object keyed by tweet id")
    img_dir = gt_path.parent / "img_resized"
    jobs, no_url = [], 0
    for sid, item in gt.items():
        url = item.get("img_url") if isinstance(item, dict) else None
        if is_url(url):
            jobs.append(Job(str(url).strip(), img_dir / f"{sid}.jpg", f"{gt_path}, tweet {sid}"))
        else:
            no_url += 1
    return FetchPlan(jobs, img_dir, [f"{no_url} tweets without an http(s) img_url"] if no_url else [])
