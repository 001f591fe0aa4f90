"""WebDataset shards read as a stream: tar members decoded from memory, never unpacked to disk.

For training sets too large to unpack (`finetune run --stream`). The shards are split across processes
(DDP ranks) and DataLoader workers, so each of them reads shards no other one reads; each draws its shards
with replacement (an endless stream) and mixes samples through a shuffle buffer. A sample is the
members of one key, as the `webdataset` adapter reads them: `<key>.jpg|png|...` (the image file's
bytes), `<key>.txt`, `<key>.json` (`label`, `label_<task>`, `entity`, `ctx_text`), `<key>.cls`.

A sample that cannot be used (an unreadable shard or member, no label, a label outside the label
space, or one the caller's `prepare` rejects, e.g. an undecodable image) is skipped and reported with
the next sample as a `(where, reason)` record: skips are counted by the consumer, never silent.

The webdataset library does the reading (`ResampledShards`, `tarfile_to_samples`, `shuffle`): it streams
tar files through tarfile's stream mode (also from `http(s)://` or `pipe:` URLs) and groups members by
key with the same rule as the adapter. Splitting shards by rank and worker is done here, before
resampling, so no two readers ever share a shard (webdataset's resampler draws from all shards in
every worker).
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from mmcache.data.base import LabelSpace
from mmcache.data.io import decode_bytes
from mmcache.data.table import LABELS_FILE, PRIMARY_TASK, label_str, load_label_space
from mmcache.data.webdataset import IMAGE_EXTS, TEXT_EXTS, UNPACK_DIR
from mmcache.errors import MMCacheError

SIZES_FILE = "sizes.json"  # shard file name -> sample count, beside the shards (as OpenCLIP reads it)
# A reader that skips this many samples in a row, with none usable, stops the run with an error.
MAX_SKIPPED_IN_A_ROW = 1000
_URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http://, s3://, pipe:... (webdataset's gopen opens them)

Skip = tuple[str, str]  # (where: shard and key, reason)


class BadSample(Exception):
    """A streamed sample that cannot be trained on; its message is the reason."""


@dataclass(frozen=True)
class StreamSample:
    """One streamed sample: the fields the decoders read (the image as the file's bytes) and its labels."""

    id: str  # "<shard>/<key>": unique per sample (keys may repeat across shards)
    where: str
    text: str | None = None
    image: bytes | None = None
    entity: str | None = None
    context: str | None = None
    video: None = None
    audio: None = None
    labels: dict[str, int] = field(default_factory=dict)


def is_url(shard: str) -> bool:
    """A shard webdataset opens by its scheme (http(s)://, pipe:, ...) rather than a local path."""
    return bool(_URL.match(shard)) and not Path(shard).exists()


def expand_shards(spec: str) -> list[str]:
    """The shards of `spec`: a brace pattern (`train-{000000..000099}.tar`), a glob, a folder (its .tar files,
    subfolders included) or a URL; local shards must exist. Order kept, repeats dropped."""
    from braceexpand import braceexpand

    out: list[str] = []
    for part in braceexpand(str(spec)):
        if is_url(part):
            out.append(part)
            continue
        path = Path(part).expanduser()
        if glob.has_magic(part):
            found = sorted(glob.glob(str(path)))
        elif path.is_dir():
            found = sorted(str(p) for pat in ("*.tar", "*.tar.gz", "*.tgz") for p in path.rglob(pat)
                           if UNPACK_DIR not in p.relative_to(path).parts)
        elif path.is_file():
            found = [str(path)]
        else:
            raise MMCacheError(f"{part}: shard not found; --data-dir takes shard files, a brace pattern such as "
                               "'shards/train-{000000..000099}.tar' (quoted), or a folder of shards")
        if not found:
            raise MMCacheError(f"{part}: no .tar shards there; point --data-dir at the training shards")
        out += found
    if not out:
        raise MMCacheError(f"{spec}: no shards; point --data-dir at the training shards")
    return list(dict.fromkeys(out))


def shards_of(shards: list[str], rank: int, world: int, worker: int, workers: int) -> list[str]:
    """The shards of one reader (a DataLoader worker of one process): every (rank, worker) its own share."""
    readers = world * workers
    if len(shards) < readers:
        raise MMCacheError(f"{len(shards)} shard(s) for {world} process(es) x {workers} DataLoader worker(s): each "
                           f"reader needs shards of its own; lower --num-workers or split the data into at least "
                           f"{readers} shards")
    return shards[rank * workers + worker::readers]


def index_size(shards: list[str]) -> int | None:
    """The samples in `shards` by the `sizes.json` beside them (shard file name -> count), or None when a shard
    is not listed there (or is a URL)."""
    total = 0
    sizes: dict[Path, dict[str, Any]] = {}
    for s in shards:
        if is_url(s):
            return None
        folder = Path(s).parent
        if folder not in sizes:
            f = folder / SIZES_FILE
            try:
                sizes[folder] = json.loads(f.read_text()) if f.is_file() else {}
            except (json.JSONDecodeError, OSError) as e:
                raise MMCacheError(f"{f}: unreadable ({e}); it maps each shard's file name to its sample count, "
                                   "e.g. {\"train-000000.tar\": 10000}") from None
        n = sizes[folder].get(Path(s).name)
        if n is None:
            return None
        try:
            total += int(n)
        except (TypeError, ValueError):
            raise MMCacheError(f"{folder / SIZES_FILE}: the count of {Path(s).name} is {n!r}, not a whole number") from None
    return total


def shard_label_space(shards: list[str]) -> LabelSpace | None:
    """The `labels.json` beside the first local shard (the adapter's label file), if any."""
    local = [s for s in shards if not is_url(s)]
    return load_label_space(Path(local[0]).parent / LABELS_FILE) if local else None


def parse_sample(raw: dict[str, Any], space: LabelSpace, label_key: str = "label") -> StreamSample:
    """A `StreamSample` from webdataset's grouped members `{"__key__", "__url__", ext: bytes}`; `BadSample` names
    why it cannot be trained on. Labels come from the json (`label_key`, `label_<task>`), else `.cls`; tasks
    outside `space` are not read."""
    key, url = str(raw.get("__key__")), str(raw.get("__url__"))
    where = f"{url}, sample {key!r}"
    image = text = meta = cls = None
    for ext, value in raw.items():
        if ext.startswith("__") or not isinstance(value, bytes):
            continue
        last = ext.rsplit(".", 1)[-1]
        if last in IMAGE_EXTS and image is None:
            image = value
        elif last in TEXT_EXTS:
            text = decode_bytes(value).strip()
        elif last == "cls":
            cls = decode_bytes(value).strip()
        elif last == "json":
            try:
                meta = json.loads(decode_bytes(value))
            except json.JSONDecodeError as e:
                raise BadSample(f"unreadable JSON member ({e.msg})") from None
            if not isinstance(meta, dict):
                raise BadSample("its JSON member is not an object")
    meta = meta or {}
    found: dict[str, Any] = {PRIMARY_TASK: meta.get(label_key, cls)}
    found.update({k[len("label_"):]: v for k, v in meta.items() if k.startswith("label_") and k != label_key})
    labels: dict[str, int] = {}
    for task, value in found.items():
        if task not in space.tasks or value is None or label_str(value) == "":
            continue
        name = label_str(value)
        if name not in space.tasks[task]:
            raise BadSample(f"label {name!r} of task {task!r} is not in the label space {space.tasks[task]}")
        labels[task] = space.tasks[task].index(name)
    if not labels:
        raise BadSample(f"no label (a json {label_key!r} key or a .cls member)")
    if image is None and text is None:
        raise BadSample("no image or text member")
    ctx = meta.get("ctx_text", meta.get("context"))
    return StreamSample(id=f"{url}/{key}", where=where, text=text if text is not None else meta.get("text"),
                        image=image, entity=None if meta.get("entity") is None else str(meta["entity"]),
                        context=None if ctx is None else str(ctx), labels=labels)


def stream_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, the same in every process (Python's str hash is not)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class ShardStream(IterableDataset):
    """An endless stream of `(prepare(sample), skips)` over one rank's shards; see the module docstring.

    `prepare(sample)` turns a `StreamSample` into what the consumer batches, or raises `BadSample`; `skips`
    are the `(where, reason)` records of the samples skipped since the previous item.
    """

    def __init__(self, shards: list[str], space: LabelSpace, prepare: Callable[[StreamSample], Any], *, rank: int = 0,
                 world: int = 1, seed: int = 0, buffer: int = 1000, label_key: str = "label") -> None:
        super().__init__()
        self.shards, self.space, self.prepare = shards, space, prepare
        self.rank, self.world, self.seed, self.buffer, self.label_key = rank, world, seed, buffer, label_key

    def __iter__(self) -> Iterator[tuple[Any, list[Skip]]]:
        import webdataset as wds
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = shards_of(self.shards, self.rank, self.world, worker, workers)
        seed = stream_seed(self.seed, self.rank * workers + worker)
        skips: list[Skip] = []
        in_a_row = 0  # samples (and shard reads) skipped since the last usable sample

        def skip(where: str, reason: str) -> None:
            nonlocal in_a_row
            skips.append((where, reason))
            in_a_row += 1
            if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise MMCacheError(f"{in_a_row} streamed samples or shard reads in a row could not be used (last: "
                                   f"{where}: {reason}); check the shards {mine[:3]}{' ...' if len(mine) > 3 else ''}")

        def handler(exn: Exception) -> bool:  # an unreadable shard or member: recorded, then the next one
            url = next((a for a in exn.args[1:] if isinstance(a, str)), None) or "a shard"
            reason = " ".join(str(exn.args[0] if exn.args else exn).split()).split(" @ <")[0]
            skip(url, f"{type(exn).__name__}: {reason}")
            return True

        opened: list[Any] = []  # the shard file being read, closed when the next opens or the stream stops

        def shard_files() -> Iterator[dict[str, Any]]:
            for source in url_opener(iter(urls), handler=handler):
                while opened:
                    opened.pop().close()
                opened.append(source["stream"])
                yield source

        # webdataset's tarfile_samples, with the shard files in reach of the finally below.
        urls = wds.ResampledShards(mine, seed=seed, worker_seed=lambda: 0, deterministic=True)
        raw = group_by_keys(tar_file_expander(shard_files(), handler=handler), handler=handler)
        samples = wds.shuffle(self.buffer, initial=min(self.buffer, 100), rng=random.Random(seed + 1))(raw)
        try:
            for r in samples:
                try:
                    item = self.prepare(parse_sample(r, self.space, self.label_key))
                except BadSample as e:
                    skip(f"{r.get('__url__')}, sample {r.get('__key__')!r}", str(e))
                    continue
                yield item, skips
                skips, in_a_row = [], 0
        finally:
            for f in opened:
                f.close()
