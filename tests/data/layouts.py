"""Writers of tiny datasets in the real distributed layouts (a handful of rows, 4x4 images)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image


def image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A 4x4 image in the format of the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def write_mvsa(root: Path, rows: list[tuple[str, list[str]]], texts: dict[str, bytes] | None = None,
               multiple: bool = False, media: str = "data") -> Path:
    """MVSA: labelResultAll.txt + data/<id>.jpg + data/<id>.txt (or images/ + texts/ with media="split")."""
    root.mkdir(parents=True, exist_ok=True)
    header = "ID\ttext,image" + ("\ttext,image\ttext,image" if multiple else "")
    lines = [header] + [sid + "\t" + "\t".join(cells) for sid, cells in rows]
    (root / "labelResultAll.txt").write_text("\r\n".join(lines) + "\r\n")
    img_dir, txt_dir = (root / "data", root / "data") if media == "data" else (root / "images", root / "texts")
    txt_dir.mkdir(parents=True, exist_ok=True)
    for sid, _ in rows:
        image(img_dir / f"{sid}.jpg")
        (txt_dir / f"{sid}.txt").write_bytes((texts or {}).get(sid, f"tweet number {sid} #fun\n".encode()))
    return root


def write_hateful_memes(root: Path, files: dict[str, list[dict[str, Any]]]) -> Path:
    """Hateful Memes: img/<id>.png + <split>.jsonl files."""
    for name, rows in files.items():
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for r in rows:
            image(root / r["img"])
    return root


MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
               "Episode", "StartTime", "EndTime"]
MELD_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}


def write_meld(root: Path, rows: dict[str, list[tuple[str, str, str, int, int]]], nested: bool = False,
               encoding: str = "utf-8") -> Path:
    """MELD: {train,dev,test}_sent_emo.csv + dia{D}_utt{U}.mp4 per split folder (empty files)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(MELD_HEADER)
        for i, (utt, emo, sent, d, u) in enumerate(items, 1):
            w.writerow([i, utt, "Joey", emo, sent, d, u, 1, 1, "00:00:01,000", "00:00:02,000"])
            folder = (root / split / MELD_DIRS[split]) if nested else (root / MELD_DIRS[split])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"dia{d}_utt{u}.mp4").write_bytes(b"\x00")
        (root / f"{split}_sent_emo.csv").write_bytes(buf.getvalue().encode(encoding))
    return root


TWITTER_HEADER = "index\t#1 Label\t#2 ImageID\t#3 String\t#3 String"


def write_twitter(root: Path, rows: dict[str, list[tuple[str, str, str, str, str]]],
                  image_dir: str = "twitter2015_images") -> Path:
    """TomBERT layout: {train,dev,test}.tsv + an image folder."""
    root.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        lines = [TWITTER_HEADER] + ["\t".join(r) for r in items]
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        for r in items:
            image(root / image_dir / r[2])
    return root


def write_mmhs(root: Path, gt: dict[str, list[int]], splits: dict[str, list[str]],
               ocr: dict[str, str] | None = None, image_url: str = "http://x/{id}.jpg", images: bool = True) -> Path:
    """MMHS150K: MMHS150K_GT.json + img_resized/ + img_txt/ + splits/*_ids.txt (`images=False`: no img_resized/,
    as before `mmcache data fetch`; `image_url`: the img_url template)."""
    root.mkdir(parents=True, exist_ok=True)
    obj = {sid: {"img_url": image_url.format(id=sid), "labels": votes, "tweet_url": f"http://t/{sid}",
                 "tweet_text": f"tweet {sid} https://t.co/abc", "labels_str": [str(v) for v in votes]}
           for sid, votes in gt.items()}
    (root / "MMHS150K_GT.json").write_text(json.dumps(obj))
    for sid in gt if images else ():
        image(root / "img_resized" / f"{sid}.jpg")
    (root / "img_txt").mkdir(exist_ok=True)
    for sid, text in (ocr or {}).items():
        (root / "img_txt" / f"{sid}.json").write_text(json.dumps({"img_text": text}))
    (root / "splits").mkdir(exist_ok=True)
    for split, ids in splits.items():
        (root / "splits" / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


FAKEDDIT_HEADER = ["", "author", "clean_title", "created_utc", "domain", "hasImage", "id", "image_url",
                   "linked_submission_id", "num_comments", "score", "subreddit", "title", "upvote_ratio",
                   "2_way_label", "3_way_label", "6_way_label"]


def write_fakeddit(root: Path, rows: dict[str, list[tuple[str, str, int, int, int]]],
                   image_url: str = "http://i/{id}.jpg", images: bool = True) -> Path:
    """Fakeddit: multimodal_{train,validate,test_public}.tsv (pandas-style quoting) + public_image_set/
    (`images=False`: no image folder, as before `mmcache data fetch`; `image_url`: the image_url template)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t")
        w.writerow(FAKEDDIT_HEADER)
        for i, (sid, title, l2, l3, l6) in enumerate(items):
            w.writerow([i, "someone", title, 1.5e9, "i.imgur.com", True, sid, image_url.format(id=sid), "", 3, 10,
                        "pics", title.upper(), 0.9, l2, l3, l6])
            if images:
                image(root / "public_image_set" / f"{sid}.jpg")
        (root / f"multimodal_{split}.tsv").write_text(buf.getvalue())
    return root


def write_shard(path: Path, samples: dict[str, dict[str, bytes | str | dict[str, Any]]]) -> Path:
    """A WebDataset tar: per key, {ext: content}; dict contents become JSON, str becomes UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, content in members.items():
                if isinstance(content, dict):
                    data = json.dumps(content).encode()
                elif isinstance(content, str):
                    data = content.encode()
                else:
                    data = content
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def jpeg_bytes(colour: tuple[int, int, int] = (10, 200, 10)) -> bytes:
    """A 4x4 JPEG as bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="JPEG")
    return buf.getvalue()
