"""Fakeddit (Nakamura et al. 2020): multimodal fake news from Reddit, 2-, 3- and 6-way labels.

    <root>/multimodal_train.tsv  multimodal_validate.tsv  multimodal_test_public.tsv
        columns include id, clean_title, 2_way_label, 3_way_label, 6_way_label
    <root>/public_image_set/<id>.jpg   (or images/ or img/; the dataset's image download names them by id)

Without the image archive, `mmcache data fetch fakeddit` downloads the `image_url` of every row into
public_image_set/ once (`mmcache.data.fetch`).

Class meanings (from the dataset authors): 2-way 0 fake / 1 true; 3-way 0 true / 1 fake with
true text / 2 fake with false text; 6-way 0 true / 1 satire-parody / 2 false connection /
3 imposter content / 4 manipulated content / 5 misleading content.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmcache.data.base import Dataset, LabelSpace, Sample, register_dataset
from mmcache.data.fetch import FetchPlan, Job, fetch_command, is_url, register_fetch, summary_note
from mmcache.data.io import IdCheck, iter_delimited, locate, order_tasks, progress_bar
from mmcache.errors import MMCacheError

TASKS = {
    "2_way": ["fake", "true"],
    "3_way": ["true", "fake_with_true_text", "fake_with_false_text"],
    "6_way": ["true", "satire_parody", "false_connection", "imposter_content", "manipulated_content",
              "misleading_content"],
}
SPLITS = (("train", "multimodal_train.tsv"), ("val", "multimodal_validate.tsv"),
          ("test", "multimodal_test_public.tsv"))
IMAGE_DIRS = ("public_image_set", "images", "img")


def _label(value: str, task: str, path: Path, line: int) -> int:
    try:
        idx = int(value) if value.isdigit() else int(float(value))
    except ValueError:
        where = f"{path}, line {line}"
        raise MMCacheError(f"{where}: {task}_label {value!r} is not a class number; fix the row") from None
    if not 0 <= idx < len(TASKS[task]):
        where = f"{path}, line {line}"
        raise MMCacheError(f"{where}: {task}_label {idx} is outside 0..{len(TASKS[task]) - 1} {TASKS[task]}; "
                           "fix the row")
    return idx


@register_dataset("fakeddit")
def load_fakeddit(root: Path, seed: int = 0, task: str | None = None, text_column: str = "clean_title",
                  image_ext: str = ".jpg") -> Dataset:
    """Load the three multimodal splits; tasks 2_way (primary unless `task`), 3_way, 6_way."""
    space = LabelSpace(order_tasks(dict(TASKS), task, "fakeddit"), metric="accuracy")
    train = locate(root, SPLITS[0][1])
    base = train.parent
    image_dir = find_image_dir(root)
    if image_dir is None:
        raise MMCacheError(f"{root}: no image folder ({', '.join(IMAGE_DIRS)}); unpack the dataset's images (named "
                           f"<id>.jpg) into {base / IMAGE_DIRS[0]}, or download them from the image_url column once "
                           f"with `{fetch_command('fakeddit', root)}`")
    image_prefix = f"{image_dir}{os.sep}"  # string concatenation: Path joins dominate the load time
    required = ("id", text_column, *(f"{t}_label" for t in TASKS))
    ids = IdCheck()
    samples: list[Sample] = []
    for split, fname in SPLITS:
        path = base / fname
        rows = iter_delimited(path, "\t", required=required, stream=True)
        for line, row in progress_bar(rows, desc=f"fakeddit {split}", unit="row"):
            sid = row["id"].strip()
            if not sid:
                raise MMCacheError(f"{path}, line {line}: empty id; fix or remove the row")
            ids.add(sid, path, line)
            labels = {t: _label(row[f"{t}_label"], t, path, line) for t in TASKS}
            samples.append(Sample(id=sid, split=split, text=row[text_column].strip(),
                                  image=f"{image_prefix}{sid}{image_ext}", labels=labels))
    note = summary_note(image_dir, "image_url", fetch_command("fakeddit", root))
    return Dataset(name="fakeddit", samples=samples, labels=space, root=base, notes=[note] if note else [])


def find_image_dir(root: Path) -> Path | None:
    """The image folder of a Fakeddit copy (public_image_set/, images/ or img/), or None."""
    return next((d for d in (locate(root, n, kind="dir", required=False) for n in IMAGE_DIRS) if d), None)


@register_fetch("fakeddit")
def plan_fakeddit(root: Path, seed: int = 0, task: str | None = None, text_column: str = "clean_title",
                  image_ext: str = ".jpg") -> FetchPlan:
    """The `image_url` of every row of the three TSVs, each to <image folder>/<id><image_ext>."""
    train = locate(root, SPLITS[0][1])
    base = train.parent
    image_dir = find_image_dir(root) or base / IMAGE_DIRS[0]
    jobs, no_url = [], 0
    for _, fname in SPLITS:
        path = base / fname
        for line, row in iter_delimited(path, "\t", required=("id", "image_url"), stream=True):
            sid, url = row["id"].strip(), row["image_url"].strip()
            if not sid:
                raise MMCacheError(f"{path}, line {line}: empty id; fix or remove the row")
            if is_url(url):
                jobs.append(Job(url, image_dir / f"{sid}{image_ext}", f"{path}, line {line}"))
            else:
                no_url += 1
    return FetchPlan(jobs, image_dir, [f"{no_url} rows without an http(s) image_url"] if no_url else [])
