"""WebDataset shards (the OpenCLIP / img2dataset layout): `.tar` files of `<key>.<ext>` members.

    <root>/**/*.tar   e.g. train/00000.tar, val/00000.tar, or train-00000.tar, or class_3/00001.tar
        <key>.jpg|.jpeg|.png|.webp   image        <key>.txt   text (caption, tweet)
        <key>.json   {"label": 3 or "Hate", "split": ..., "entity": ..., "ctx_text": ..., "label_<task>": ...}
        <key>.cls    class index (when the json has no label)     <key>.mp4 / .wav / .flac / .mp3   video, audio

Image, video and audio members are unpacked once into `<root>/_unpacked/` (or `-o unpack_dir=DIR`) so
every decoder reads plain files; texts and labels are read straight from the shards. Only regular files
with a relative path that stays inside that folder are read: absolute or `..` paths, links, devices and
FIFOs are skipped with a warning naming the shard and member. The split of a
sample comes from its json `split`, else from a train/val/test folder or shard name, else a seeded
8:1:1 split (or `--fold`). The label comes from the json, else `.cls`, else a class folder name.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from mmcache.data.base import Dataset, LabelSpace, Sample, adapter_options, default_name, register_dataset
from mmcache.data.io import (
    IdCheck,
    as_bool,
    as_int,
    decode_bytes,
    fill_missing_splits,
    normalise_split,
    progress_bar,
    warn,
)
from mmcache.data.table import LABELS_FILE, PRIMARY_TASK, label_str, load_label_space, sorted_names
from mmcache.errors import MMCacheError
from mmcache.utils import atomic_write_text

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
VIDEO_EXTS = ("mp4", "avi", "webm", "mkv", "mov")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg", "m4a")
TEXT_EXTS = ("txt", "text", "caption")
SPLIT_NAMES = ("train", "val", "test")
UNPACK_DIR = "_unpacked"


def split_key(member: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name; the rest is the extension."""
    folder, _, fname = member.rpartition("/")
    stem, _, ext = fname.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def split_from_path(rel: Path) -> str | None:
    """A train/val/test split named by a folder of the shard or by the shard's name prefix (train-0001.tar)."""
    for part in rel.parts[:-1]:
        if normalise_split(part) in SPLIT_NAMES:
            return normalise_split(part)
    prefix = re.split(r"[-_.]", rel.name, maxsplit=1)[0]
    return normalise_split(prefix) if normalise_split(prefix) in SPLIT_NAMES else None


def class_from_path(rel: Path) -> str | None:
    """The shard's parent folder as a class name (class-per-folder layout), unless it names a split."""
    if len(rel.parts) < 2 or normalise_split(rel.parts[-2]) in SPLIT_NAMES:
        return None
    return rel.parts[-2]


def unsafe_member(m: tarfile.TarInfo, folder: Path, safe_dirs: dict[Path, bool] | None = None) -> str | None:
    """Why member `m` must not be read (a link, a device, a path leaving `folder`), or None if it is safe.

    The rules of tarfile's `data` filter, minus its per-member realpath: a folder's resolved path is
    checked once (in `safe_dirs`), so a link already on disk under `folder` cannot lead out either.
    """
    if not m.isreg():
        kinds = ((m.issym, "a symbolic link"), (m.islnk, "a hard link"), (m.isdev, "a device or FIFO"))
        return next((f"it is {what}" for test, what in kinds if test()), "it is not a regular file")
    path = PurePosixPath(m.name)
    if path.is_absolute() or ".." in path.parts:
        return "its path is absolute or climbs out of the shard with '..'"
    parent = (folder / m.name).parent
    safe_dirs = {} if safe_dirs is None else safe_dirs
    if parent not in safe_dirs:
        safe_dirs[parent] = parent.resolve().is_relative_to(folder.resolve())
    return None if safe_dirs[parent] else "its folder is a link that leads out of the unpack folder"


def _read_shard(shard: Path, rel: Path, unpack: Path) -> dict[str, dict[str, Any]]:
    """key -> {ext: text/json/path} for one shard; media members are written under `unpack`.

    Unsafe members (see `unsafe_member`) are skipped with a warning, so nothing lands outside `unpack`.
    """
    out: dict[str, dict[str, Any]] = {}
    folder = unpack / rel.with_suffix("")
    safe_dirs: dict[Path, bool] = {}
    try:
        with tarfile.open(shard, mode="r:*") as tar:
            for m in tar:
                if m.isdir():
                    continue
                why = unsafe_member(m, folder, safe_dirs)
                if why is not None:
                    warn(f"{shard}: member {m.name!r} skipped: {why}")
                    continue
                key, ext = split_key(m.name)
                if not ext:
                    continue
                entry = out.setdefault(key, {})
                last = ext.rsplit(".", 1)[-1]
                if last in IMAGE_EXTS or last in VIDEO_EXTS or last in AUDIO_EXTS:
                    dest = folder / m.name
                    if not (dest.is_file() and dest.stat().st_size == m.size):
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        src = tar.extractfile(m)
                        assert src is not None
                        # A temporary file of its own: processes that unpack the same shard at once (every
                        # rank of a torchrun job) each write whole files, and the last rename wins.
                        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
                        with os.fdopen(fd, "wb") as f:
                            f.write(src.read())
                        os.replace(tmp, dest)
                    kind = "image" if last in IMAGE_EXTS else "video" if last in VIDEO_EXTS else "audio"
                    entry[kind] = str(dest)
                elif last in TEXT_EXTS or last in ("json", "cls"):
                    src = tar.extractfile(m)
                    assert src is not None
                    text = decode_bytes(src.read())
                    if last == "json":
                        try:
                            entry["json"] = json.loads(text)
                        except json.JSONDecodeError as e:
                            raise MMCacheError(f"{shard}, member {m.name}: unreadable JSON ({e.msg}); fix the "
                                               "shard or remove the sample") from None
                        if not isinstance(entry["json"], dict):
                            raise MMCacheError(f"{shard}, member {m.name}: expected a JSON object")
                    elif last == "cls":
                        entry["cls"] = text.strip()
                    else:
                        entry["text"] = text.strip()
    except tarfile.ReadError:
        raise MMCacheError(f"{shard}: unreadable tar shard (not a tar file, or a damaged one); download it again "
                           "or remove it") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        reason = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the library wrote
        raise MMCacheError(f"{shard}: unreadable tar shard ({reason}); download it again or remove it") from None
    return out


def load_webdataset(root: Path, name: str | None = None, seed: int = 0, fold: int | None = None,
                    label_key: str = "label", unpack_dir: str | None = None, prefix_shard: bool = False,
                    metric: str | None = None) -> Dataset:
    """Load every `.tar` shard under `root`; labels mapped to indices and saved in `labels.json`.

    The dataset is named `name`, else after the shards' folder.
    """
    prefix_shard = as_bool(prefix_shard, "prefix_shard")
    root = Path(root)
    name = name or default_name(root, "webdataset")
    shards = sorted(p for pat in ("*.tar", "*.tar.gz", "*.tgz") for p in root.rglob(pat)
                    if UNPACK_DIR not in p.relative_to(root).parts)
    if not shards:
        raise MMCacheError(f"{root}: no .tar shards found (searched all subfolders); point --data-dir at the "
                           "folder holding the shards")
    unpack = Path(unpack_dir) if unpack_dir else root / UNPACK_DIR
    ids = IdCheck()
    raw: list[tuple[str, str | None, dict[str, str], dict[str, Any], str]] = []  # id, split, labels, entry, where
    for shard in progress_bar(shards, desc="webdataset shards", unit="shard"):
        rel = shard.relative_to(root)
        path_split, path_class = split_from_path(rel), class_from_path(rel)
        for key, entry in _read_shard(shard, rel, unpack).items():
            where = f"{shard}, sample {key!r}"
            meta = entry.get("json", {})
            if not any(k in entry for k in ("image", "text", "video", "audio")):
                raise MMCacheError(f"{where}: no image, text, video or audio member; fix the shard or remove "
                                   "the sample")
            sid = label_str(meta.get("id", key))
            if prefix_shard:
                sid = f"{rel.with_suffix('')}/{sid}"
            try:
                ids.add(sid, where)
            except MMCacheError as e:
                raise MMCacheError(f"{e}; if keys repeat across shards, pass -o prefix_shard=true") from None
            labels: dict[str, str] = {}
            primary = meta.get(label_key)
            if primary is None:
                primary = entry.get("cls") or path_class
            if primary is not None and str(primary).strip() != "":
                labels[PRIMARY_TASK] = label_str(primary)
            for k, v in meta.items():
                if k.startswith("label_") and k != label_key and v is not None:
                    labels[k[len("label_"):]] = label_str(v)
            split = meta.get("split")
            raw.append((sid, normalise_split(split) if split else path_split, labels, entry, where))

    labels_path = root / LABELS_FILE
    saved = load_label_space(labels_path)
    tasks_seen = list(dict.fromkeys(t for _, _, labs, _, _ in raw for t in labs))
    if not tasks_seen:
        raise MMCacheError(f"{root}: no sample has a label (a json {label_key!r} key, a .cls member or a class "
                           "folder); add labels, or pass -o label_key=NAME if the json calls it otherwise")
    tasks = {t: (saved.tasks[t] if saved and t in saved.tasks
                 else sorted_names({labs[t] for _, _, labs, _, _ in raw if t in labs})) for t in tasks_seen}
    space = LabelSpace(tasks, metric=metric or (saved.metric if saved else "accuracy"))
    if tasks and (saved is None or saved.tasks != tasks):
        try:
            atomic_write_text(labels_path, json.dumps(space.to_json(), indent=1))  # processes may load at once
        except OSError:
            pass  # read-only shards folder: indices follow the sorted names
    samples = []
    for sid, split, labs, entry, where in raw:
        meta = entry.get("json", {})
        ctx = meta.get("ctx_text", meta.get("context"))
        samples.append(Sample(
            id=sid, split=split or "", text=entry.get("text", meta.get("text")), image=entry.get("image"),
            video=entry.get("video"), audio=entry.get("audio"),
            entity=None if meta.get("entity") is None else str(meta["entity"]),
            context=None if ctx is None else str(ctx),
            labels={t: space.index(t, v, f"{where}: ") for t, v in labs.items()},
        ))
    notes = [f"{len(shards)} shards; media unpacked under {unpack}"]
    samples, note = fill_missing_splits(samples, str(root), next(iter(tasks), None), seed=seed, fold=fold)
    if note:
        notes.append(note)
    elif fold is not None:
        raise MMCacheError(f"{root}: the shards name their splits; --fold applies only to shards without splits")
    generated = note is not None
    return Dataset(name=name, samples=samples, labels=space, root=root, notes=notes,
                   fold=as_int(fold, "fold") if generated and fold is not None else None,
                   seed=as_int(seed, "seed") if generated else None)


register_dataset("webdataset", "wds", options=adapter_options(load_webdataset, exclude=("name",)))(load_webdataset)
