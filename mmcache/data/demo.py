"""The demo dataset: coloured shapes and short texts whose label needs both modalities.

Each image carries a sentiment score s_img in {-1, 0, +1} in the colour of its shape
(red-ish negative, grey/blue-ish neutral, green-ish positive); each text carries
s_txt in {-1, 0, +1} in its verb ("hate" / "saw" / "love", with synonyms). The label is
the sign of s_img + s_txt (negative / neutral / positive). Either modality alone caps
accuracy at about 5/9; together they determine the label, up to `noise`.
Shape kind, size, position, background and the nouns are distractors.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmcache.data.base import Dataset, adapter_options, register_dataset
from mmcache.data.table import load_table
from mmcache.errors import MMCacheError
from mmcache.progress import bar as progress_bar

LABELS = ["negative", "neutral", "positive"]
WORDS = {
    -1: ["hate", "despise", "loathe", "cannot stand", "am sick of"],
    0: ["saw", "noticed", "walked past", "looked at", "found"],
    1: ["love", "adore", "really like", "am thrilled by", "enjoy"],
}
SUBJECTS = ["i", "honestly i", "today i", "my friend and i", "we"]
NOUNS = ["shape", "picture", "drawing", "poster", "sticker", "sign", "logo", "painting"]
TAILS = ["", " today", " again", " at the station", " online", " this morning"]
# Hue centres (degrees) of the shape colour per image score; saturation separates neutral.
HUES = {-1: [0, 20, 340], 0: [210, 230, 0], 1: [100, 120, 140]}
SHAPES = ["circle", "square", "triangle", "diamond"]
DEMO_SIZE = 64


def _colour(score: int, rng: np.random.Generator) -> tuple[int, int, int]:
    import colorsys

    hue = (rng.choice(HUES[score]) + rng.uniform(-12, 12)) % 360
    sat = rng.uniform(0.05, 0.25) if score == 0 and rng.random() < 0.5 else rng.uniform(0.6, 1.0)
    val = rng.uniform(0.55, 0.95)
    r, g, b = colorsys.hsv_to_rgb(hue / 360, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


def _draw(score: int, rng: np.random.Generator, size: int) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    fill = _colour(score, rng)
    kind = SHAPES[rng.integers(len(SHAPES))]
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], fill=fill)
    return img


def _text(score: int, rng: np.random.Generator) -> str:
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    return f"{pick(SUBJECTS)} {pick(WORDS[score])} this {pick(NOUNS)}{pick(TAILS)}"


def generate_demo(root: Path | str, n: int = 3000, seed: int = 0, noise: float = 0.03, size: int = DEMO_SIZE) -> Path:
    """Write the demo dataset (JPEG images + data.csv) under `root`; deterministic by seed."""
    if n < 30:
        raise MMCacheError(f"the demo needs at least 30 rows (got n={n})")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    s_img = rng.integers(-1, 2, n)
    s_txt = rng.integers(-1, 2, n)
    label = np.sign(s_img + s_txt) + 1
    flip = rng.random(n) < noise
    label[flip] = rng.integers(0, 3, int(flip.sum()))
    split = rng.choice(["train", "val", "test"], size=n, p=[0.8, 0.1, 0.1])
    rows = []
    for i in progress_bar(range(n), desc="demo images", unit="img"):
        sid = f"demo{i:05d}"
        # One generator per row: a row's content does not depend on n.
        r = np.random.default_rng([seed, i])
        _draw(int(s_img[i]), r, size).save(root / "images" / f"{sid}.jpg", quality=90)
        rows.append({"id": sid, "split": split[i], "image": f"images/{sid}.jpg",
                     "text": _text(int(s_txt[i]), r), "label": LABELS[label[i]]})
    with (root / "data.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "split", "image", "text", "label"])
        w.writeheader()
        w.writerows(rows)
    (root / "labels.json").write_text(json.dumps({"tasks": {"label": LABELS}, "metric": "accuracy"}, indent=1))
    return root


@register_dataset("demo", options=adapter_options(load_table, exclude=("name", "label_names")))
def load_demo(root: Path, **options: Any) -> Dataset:
    """Load the demo dataset (generic table layout); `mmcache data demo` generates it."""
    if not (root / "data.csv").exists():
        raise MMCacheError(f"{root / 'data.csv'} not found; run `mmcache data demo --out {root}` first")
    return load_table(root / "data.csv", name="demo", label_names=LABELS, **options)
