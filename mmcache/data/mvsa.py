"""MVSA-Single and MVSA-Multiple (image+text tweet sentiment) in their distributed layout.

    <root>/labelResultAll.txt     ID<TAB>text,image (Single; Multiple: three text,image columns)
    <root>/data/<id>.jpg, <id>.txt  (or images/<id>.jpg + texts/<id>.txt)

Label rule of the reference comparison (Cheema et al. 2021): keep pairs whose text and image
labels agree or where one is neutral; the label is the non-neutral one; positive/negative
conflicts are dropped. MVSA-Multiple first takes, per modality, the label at least two of the
three annotators gave; an item without such a majority in either modality is dropped
(`-o vote=pair` instead takes the text,image pair at least two annotators gave).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from mmcache.data.base import Dataset, LabelSpace, Sample, adapter_options, register_dataset
from mmcache.data.io import IdCheck, as_bool, as_int, assign_splits, locate, open_text, read_text
from mmcache.errors import MMCacheError

LABELS = ["negative", "neutral", "positive"]
LABEL_FILE = "labelResultAll.txt"


def combine(text_label: str, image_label: str) -> str | None:
    """Cheema et al.'s rule: agreeing or one-neutral pairs keep the non-neutral label; a conflict gives None."""
    if text_label == image_label:
        return text_label
    if text_label == "neutral":
        return image_label
    if image_label == "neutral":
        return text_label
    return None


def majority(votes: list[str]) -> str | None:
    """The label more than half of the annotators gave, or None."""
    if not votes:
        return None
    label, n = Counter(votes).most_common(1)[0]
    return label if n * 2 > len(votes) else None


def parse_label_file(path: Path) -> list[tuple[int, str, list[tuple[str, str]]]]:
    """Rows of labelResultAll.txt as (line, id, [(text_label, image_label) per annotator])."""
    lines = list(open_text(path))
    if not lines or "text" not in lines[0].lower():
        raise MMCacheError(f"{path}, line 1: expected the header 'ID<TAB>text,image'; is this labelResultAll.txt?")
    out = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cells = line.strip().split("\t")
        if len(cells) < 2:
            raise MMCacheError(f"{path}, line {n}: expected 'ID<TAB>text,image', got {line.strip()!r}; "
                               "fix or remove the row")
        pairs = []
        for cell in cells[1:]:
            parts = [p.strip().lower() for p in cell.split(",")]
            if len(parts) != 2:
                raise MMCacheError(f"{path}, line {n}: annotation {cell!r} is not 'text,image'; fix or remove the row")
            for p in parts:
                if p not in LABELS:
                    raise MMCacheError(f"{path}, line {n}: label {p!r} is not one of {LABELS}; fix the row")
            pairs.append((parts[0], parts[1]))
        out.append((n, cells[0].strip(), pairs))
    return out


def _media_dirs(root: Path) -> tuple[Path, Path]:
    data = locate(root, "data", kind="dir", required=False)
    if data is not None:
        return data, data
    images = locate(root, "images", kind="dir", required=False)
    texts = locate(root, "texts", kind="dir", required=False)
    if images is None or texts is None:
        raise MMCacheError(f"{root}: no data/ folder (data/<id>.jpg + data/<id>.txt) nor images/ + texts/; "
                           "unpack the MVSA archive there or pass --data-dir")
    return images, texts


def load_mvsa(root: Path, name: str, multiple: bool, seed: int = 0, fold: int | None = None,
              skip_missing: bool = False, vote: str = "modality") -> Dataset:
    """Load MVSA-Single or -Multiple: apply the label rule, then a seeded 8:1:1 split or 10-fold CV fold.

    `vote` (Multiple only): "modality" takes the majority of the text labels and of the image labels
    separately; "pair" takes the (text, image) pair that most annotators gave.
    """
    skip_missing = as_bool(skip_missing, "skip_missing")
    seed, fold = as_int(seed, "seed"), None if fold is None else as_int(fold, "fold")
    if vote not in ("modality", "pair"):
        raise MMCacheError(f"vote must be 'modality' or 'pair', got {vote!r}")
    label_file = locate(root, LABEL_FILE)
    base = label_file.parent
    images, texts = _media_dirs(base)
    rows = parse_label_file(label_file)
    ids = IdCheck()
    kept: list[tuple[str, str, str]] = []  # id, label, text
    dropped = Counter[str]()
    for line, sid, pairs in rows:
        where = f"{label_file}, line {line}"
        ids.add(sid, label_file, line)
        if multiple:
            if len(pairs) != 3:
                raise MMCacheError(f"{where}: MVSA-Multiple rows have three annotators, found {len(pairs)}; "
                                   "is this MVSA-Single? (use mvsa-single)")
            if vote == "pair":
                pair = majority([f"{p[0]},{p[1]}" for p in pairs])
                t, i = pair.split(",") if pair else (None, None)
            else:
                t, i = majority([p[0] for p in pairs]), majority([p[1] for p in pairs])
            if t is None or i is None:
                dropped["no annotator majority"] += 1
                continue
        else:
            if len(pairs) != 1:
                raise MMCacheError(f"{where}: MVSA-Single rows have one text,image pair, found {len(pairs)}; "
                                   "is this MVSA-Multiple? (use mvsa-multiple)")
            t, i = pairs[0]
        label = combine(t, i)
        if label is None:
            dropped["positive/negative conflict"] += 1
            continue
        txt_path = texts / f"{sid}.txt"
        if not txt_path.is_file():
            if skip_missing:
                dropped["text file missing"] += 1
                continue
            raise MMCacheError(f"{where}: text file {txt_path} is missing; restore it, or pass "
                               "-o skip_missing=true to drop such rows")
        kept.append((sid, label, read_text(txt_path)))
    if not kept:
        raise MMCacheError(f"{label_file}: no pair survives the label rule; check the file")
    y = [LABELS.index(lab) for _, lab, _ in kept]
    splits = assign_splits(y, seed=seed, fold=fold)
    samples = [
        Sample(id=sid, split=sp, text=text, image=str(images / f"{sid}.jpg"), labels={"sentiment": yi})
        for (sid, _, text), yi, sp in zip(kept, y, splits, strict=True)
    ]
    notes = [f"{len(rows)} rows in {label_file.name}; kept {len(kept)}"]
    notes += [f"dropped {n}: {why}" for why, n in sorted(dropped.items())]
    notes.append(f"splits: 10-fold CV, fold {fold}" if fold is not None else f"splits: 8:1:1 stratified, seed {seed}")
    return Dataset(name=name, samples=samples, labels=LabelSpace({"sentiment": LABELS}, metric="accuracy"),
                   root=base, notes=notes, fold=fold, seed=seed)


MVSA_OPTIONS = adapter_options(load_mvsa, exclude=("name", "multiple"))


@register_dataset("mvsa-single", "mvsa", "mvsa_single", options=MVSA_OPTIONS)
def load_mvsa_single(root: Path, **options: Any) -> Dataset:
    """MVSA-Single: 4,511 pairs after the label rule (2,683 positive / 470 neutral / 1,358 negative)."""
    return load_mvsa(root, "mvsa-single", multiple=False, **options)


@register_dataset("mvsa-multiple", "mvsa_multiple", options=MVSA_OPTIONS)
def load_mvsa_multiple(root: Path, **options: Any) -> Dataset:
    """MVSA-Multiple: per-modality annotator majority, then the Single label rule (17,025 pairs reported)."""
    return load_mvsa(root, "mvsa-multiple", multiple=True, **options)
