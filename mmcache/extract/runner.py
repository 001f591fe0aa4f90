"""The extraction runner: decode each raw field once, feed every requested extractor, write stores.

One pass over the samples that still miss a row in at least one requested store. In
DataLoader workers each needed raw field of a sample is decoded once (shared by every
extractor that reads it) and preprocessed per extractor; on the device each extractor
encodes its part of the batch under `torch.inference_mode` (autocast on GPU), and the
rows go to its FeatureStore. Inputs that fail to decode are recorded as failed rows,
never written as zeros, and every failed id of a store is listed with its reason in
`<name>.failed.csv` next to it. A retry of failed ids keeps each record until the id's row
is written. Under `torchrun` each rank writes its own part file of each store, and rank 0
merges the parts into the store at the end, under the same rules.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from mmcache.cache.store import (
    FeatureStore,
    StoreReader,
    failures_path,
    lock_path,
    manifest_path,
    partial_path,
    store_path,
)
from mmcache.cliutil import parse_kv, split_outside_brackets
from mmcache.data.base import Dataset, Sample
from mmcache.errors import MMCacheError
from mmcache.extract.base import DECODERS, FIELDS, MODALITIES, DecodeError, Extractor, build_extractor
from mmcache.manifest import check_replace, update
from mmcache.progress import bar as progress_bar
from mmcache.utils import init_distributed, pick_device, versions

MERGE_CHUNK = 4096  # rows per write when merging rank part files


@dataclass(frozen=True)
class Request:
    """One store to fill: modality, store name, preset and config overrides."""

    modality: str
    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class StoreSummary:
    """What one run did to one store."""

    modality: str
    name: str
    preset: str
    path: Path
    written: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # id -> reason, of this run
    kinds: dict[str, str] = field(default_factory=dict)  # id -> reason with the sample's paths taken out
    failed_total: int = 0  # failed ids recorded in the store after the run, earlier runs' included
    failed_file: Path | None = None  # every failed id of the store with its reason (None when there is none)


@dataclass(frozen=True)
class Failure:
    """A sample an extractor could not encode, and why (crosses the worker boundary)."""

    reason: str


_MEDIA = ("image", "video", "audio")
_NUMBER = re.compile(r"(?<![\w.])\d+(?![\w.])")


def failure_kind(reason: str, sample: Sample | None = None) -> str:
    """The kind of a failure: its reason with the sample's media paths (as `<image>`, ...) and numbers taken
    out, so the same problem with different files groups together."""
    spots: list[tuple[str, str]] = []
    for f in _MEDIA:
        value = getattr(sample, f, None) if sample is not None else None
        if not value:
            continue
        value = str(value)
        for form in {value, os.path.expanduser(value), str(Path(value).expanduser()), os.path.normpath(value)}:
            if len(form) >= 3:
                spots.append((form, f"<{f}>"))
    for form, tag in sorted(spots, key=lambda x: -len(x[0])):
        reason = reason.replace(form, tag)
    return _NUMBER.sub("N", reason)


def parse_requests(modality: str, values: Sequence[str] | str | None, flag: str | None = None) -> list[Request]:
    """`--image clip,res=resnet[arch=resnet101]` -> requests; `name=preset[key=value,...]`, name defaults to preset.

    `flag` names the option in errors for a store folder outside MODALITIES (e.g. `--caption` for `captions`).
    """
    if flag is None and modality not in MODALITIES:
        raise MMCacheError(f"unknown modality {modality!r}; use one of {list(MODALITIES)}")
    flag = flag or f"--{modality}"
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    out: list[Request] = []
    for item in items:
        for spec in split_outside_brackets(item):
            if spec.count("[") != spec.count("]"):
                raise MMCacheError(f"{flag} {spec!r}: the preset's options bracket is not closed; write "
                                   "PRESET[key=value,...], e.g. clip[tokens=false] (quoted in the shell)")
            overrides: dict[str, Any] = {}
            if spec.endswith("]") and "[" in spec:
                spec, opts = spec[:-1].split("[", 1)
                overrides = parse_kv(split_outside_brackets(opts), f"{flag} {spec.strip()}[...]", "clip[tokens=false]")
            name, preset = spec.split("=", 1) if "=" in spec.split(":", 1)[0] else (None, spec)
            preset = preset.strip()
            name = (name or preset).strip()
            if not name or not preset or os.sep in name or name.startswith("."):
                raise MMCacheError(
                    f"bad store spec {spec!r} in {flag}; write NAME=PRESET or PRESET (a preset with a path or "
                    "a colon needs a plain NAME=, e.g. clip=ViT-B-32:/weights/clip.bin)"
                )
            out.append(Request(modality, name, preset, overrides))
    return out


class DecodeDataset(TorchDataset):
    """Per sample: decode each needed raw field once, then preprocess it for each extractor that needs it."""

    def __init__(self, samples: list[Sample], needs: list[tuple[int, ...]], extractors: list[Extractor],
                 options: dict[str, int]) -> None:
        self.samples = samples
        self.needs = needs
        self.extractors = extractors
        self.options = options

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[str, dict[int, Any]]:
        sample, need = self.samples[i], self.needs[i]
        fields = sorted({f for k in need for f in self.extractors[k].inputs})
        decoded: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for f in fields:
            if f not in DECODERS:
                errors[f] = f"no decoder registered for field {f!r}"
                continue
            try:
                decoded[f] = DECODERS[f](getattr(sample, f), self.options)
            except DecodeError as e:
                errors[f] = str(e)
        items: dict[int, Any] = {}
        for k in need:
            ext = self.extractors[k]
            bad = [errors[f] for f in ext.inputs if f in errors]
            if bad:
                items[k] = Failure("; ".join(bad))
                continue
            try:
                # Only raw fields reach an extractor (never labels): teachers cannot see gold answers.
                items[k] = ext.preprocess({f: decoded[f] for f in ext.inputs})
            except DecodeError as e:
                items[k] = Failure(str(e))
        return sample.id, items


# One extractor's share of a batch: (ids, collated inputs or None, [(id, failure reason)]).
_Part = tuple[list[str], Any, list[tuple[str, str]]]


class BatchCollate:
    """Batch per extractor: (ids, collated inputs or None, failures); runs in the workers."""

    def __init__(self, extractors: list[Extractor]) -> None:
        self.extractors = extractors

    def __call__(self, batch: list[tuple[str, dict[int, Any]]]) -> dict[int, _Part]:
        out: dict[int, _Part] = {}
        for k, ext in enumerate(self.extractors):
            ids, items, fails = [], [], []
            for sid, per in batch:
                if k not in per:
                    continue
                if isinstance(per[k], Failure):
                    fails.append((sid, per[k].reason))
                else:
                    ids.append(sid)
                    items.append(per[k])
            if ids or fails:
                out[k] = (ids, ext.collate(items) if items else None, fails)
        return out


def to_device(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move tensors nested in dicts / lists / tuples to `device` (non-blocking; pinned when on CUDA)."""
    if isinstance(obj, torch.Tensor):
        t = obj.to(device, non_blocking=True)
        if channels_last and t.ndim == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    if isinstance(obj, dict):
        return {k: to_device(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, channels_last) for v in obj)
    return obj


def merge_decode_options(extractors: Sequence[Extractor]) -> dict[str, int]:
    """Element-wise max of the extractors' decode options (one decode serves them all)."""
    merged: dict[str, int] = {}
    for ext in extractors:
        for k, v in ext.decode_options.items():
            merged[k] = max(merged.get(k, v), v)
    return merged


def _check_batch(out: dict[str, torch.Tensor], n: int, where: str) -> dict[str, torch.Tensor]:
    # Tensors go to the store as they are: it casts to the store dtype before the copy to host.
    for key, t in out.items():
        if t.shape[0] != n:
            raise RuntimeError(f"{where}: output {key!r} has batch size {t.shape[0]}, expected {n}")
    return out


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 when not distributed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _part_path(path: Path, rank: int) -> Path:
    # Not ending in .h5, so store listings never mistake a part for a store.
    return path.with_name(f"{path.name}.part{rank}")


def merge_parts(path: Path, spec: dict[str, Any], dataset: str, dtype: str) -> int:
    """Move rows and failures of leftover rank part files of `path` into it; returns rows moved.

    The rules of a single-process run hold: a part's row of an id the store recorded as failed
    (a retry that succeeded) is written and supersedes the record; a part's failure updates the
    store's record unless the store has the id's row. A part is removed only once merged whole,
    so a merge cut short is redone by the next run.
    """
    parts = sorted(p for p in glob.glob(glob.escape(str(path)) + ".part*") if re.search(r"\.part\d+$", p))
    if not parts:
        return 0
    moved = 0
    readers = [StoreReader(p) for p in parts]
    rows, failed = _store_ids(path)
    cap = len(rows) + len(failed) + sum(len(r.ids) + len(r.failed) for r in readers)
    with FeatureStore(path, spec, dataset, dtype=dtype, versions=versions(), capacity=cap) as store:
        for part, reader in zip(parts, readers, strict=True):
            if reader.attrs.get("spec_hash") != store.hash:
                raise MMCacheError(f"{part} was written with another spec than {path}; remove the part file")
            committed = store.committed
            new = [i for i in reader.ids if i not in committed]
            for s in range(0, len(new), MERGE_CHUNK):
                ids = new[s:s + MERGE_CHUNK]
                store.write(ids, reader.load(ids))
                moved += len(ids)
            committed = store.committed
            for sid, reason in reader.failed.items():
                if sid not in committed:
                    store.fail(sid, reason)
            os.remove(part)
            lock_path(part).unlink(missing_ok=True)
    return moved


def _store_ids(path: Path) -> tuple[set[str], dict[str, str]]:
    """(committed ids, failed id -> reason) of a store; empty when it does not exist yet."""
    if not path.exists():
        return set(), {}
    reader = StoreReader(path)
    return set(reader.ids), reader.failed


def write_failures(path: Path, by_id: dict[str, Sample] | None = None) -> Path | None:
    """Write every failed id of the store at `path` with its kind and reason to `<name>.failed.csv` (atomically);
    remove that file when nothing failed. Returns the file, or None."""
    out = failures_path(path)
    failed = _store_ids(path)[1]
    if not failed:
        out.unlink(missing_ok=True)
        return None
    by_id = by_id or {}
    tmp = partial_path(out)
    with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "kind", "reason"])
        for sid, reason in failed.items():
            w.writerow([sid, failure_kind(reason, by_id.get(sid)), reason])
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def select_samples(ds: Dataset, split: str | None = None, limit: int | None = None) -> list[Sample]:
    """Samples of one split (or all), the first `limit` of them."""
    samples = ds.samples if split is None else ds.split(split)
    if split is not None and not samples:
        raise MMCacheError(f"dataset {ds.name!r} has no split {split!r}; its splits are {ds.splits}")
    return samples[:limit] if limit is not None else samples


def write_manifest(ds: Dataset, cache_dir: Path | str, selected: Sequence[Sample]) -> Path:
    """Write the manifest of the selected samples plus those an earlier run listed (so heads train from the cache)."""
    return update(manifest_path(cache_dir, ds.name), ds, [s.id for s in selected])


def extract(
    ds: Dataset,
    requests: Sequence[Request],
    cache_dir: Path | str = "cache",
    device: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str = "float16",
    strict: bool = False,
    limit: int | None = None,
    split: str | None = None,
    amp: bool = True,
    progress: bool = True,
    extractors: Sequence[Extractor] | None = None,
    retry_failed: bool = False,
    force: bool = False,
    context_from: dict[str, Any] | None = None,
) -> list[StoreSummary]:
    """Fill the requested stores of `ds` (resumable); returns a summary per store.

    `extractors` may be given pre-built (aligned with `requests`); otherwise each request's
    preset is built for its modality. Teachers get the dataset's class names as config.
    Ids recorded as failed count as done unless `retry_failed` (e.g. after fixing the files).
    A manifest under the same name listing ids `ds` lacks is refused up front unless `force`.
    `context_from` says where the samples' context texts came from when not from the dataset (a captions
    store); it becomes part of the spec of every context store, so texts of two sources never share a store.
    """
    _check_distinct(requests)
    check_replace(manifest_path(cache_dir, ds.name), ds, force=force)
    rank, world, dev = _extraction_device(device)
    distributed = world > 1
    selected = select_samples(ds, split, limit)
    _check_fields(ds, requests, selected)
    extractors = _resolve_extractors(ds, requests, extractors, context_from)
    paths = [store_path(cache_dir, ds.name, r.modality, r.name) for r in requests]
    summaries = [StoreSummary(r.modality, r.name, r.preset, p) for r, p in zip(requests, paths, strict=True)]

    def barrier() -> None:
        if distributed:
            torch.distributed.barrier()

    # Parts left by an interrupted multi-process run count as done once merged.
    if rank == 0:
        _merge_all_parts(extractors, paths, ds.name, dtype)
    barrier()
    # A retry never erases a failure record: an id's record goes only when its row is written.
    state = [_store_ids(p) for p in paths]
    done = [rows if retry_failed else rows | set(failed) for rows, failed in state]
    barrier()
    todo, need_per_sample = _plan(selected, done, summaries, rank, world)
    _place_extractors(extractors, dev)

    by_id = ds.by_id()
    writers: list[FeatureStore | None] = [None] * len(extractors)
    finished = False
    try:
        _open_writers(writers, extractors, paths, need_per_sample, state, ds.name, dtype, rank, distributed,
                      retry_failed)
        if todo:
            _run_loop(todo, need_per_sample, extractors, writers, summaries, dev, batch_size, num_workers,
                      strict, amp, progress and rank == 0, world, by_id)
        finished = True
    finally:
        for w in writers:
            if w is not None:
                w.close()
        if not distributed:
            try:  # also when --strict (or anything) stopped the run, so the lists stay true
                _list_failures(summaries, by_id)
            except (MMCacheError, OSError):
                if finished:
                    raise  # otherwise the error that stopped the run is the one to report
    barrier()
    if distributed:
        _gather_counts(summaries, world)
        if rank == 0:
            _merge_all_parts(extractors, paths, ds.name, dtype)
        barrier()
    if rank == 0:
        if distributed:
            _list_failures(summaries, by_id)
        write_manifest(ds, cache_dir, selected)
    return summaries


def _check_distinct(requests: Sequence[Request]) -> None:
    """Refuse an empty request list and a store requested twice."""
    if not requests:
        raise MMCacheError("nothing to extract: name at least one store, e.g. --image clip --text clip")
    names = [(r.modality, r.name) for r in requests]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise MMCacheError(f"store {dup[0][0]}/{dup[0][1]} requested twice; give one of them another NAME=")


def _extraction_device(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process: under torchrun each rank takes the GPU of its local rank."""
    rank, world, local_rank = init_distributed(cpu=device is not None and not device.startswith("cuda"))
    distributed = world > 1
    if device is None and distributed and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    dev = torch.device(pick_device(device))
    if dev.type == "cuda" and dev.index is None and distributed:
        dev = torch.device("cuda", local_rank)
    return rank, world, dev


def _check_fields(ds: Dataset, requests: Sequence[Request], selected: Sequence[Sample]) -> None:
    """Refuse training-only options and a store no selected sample has the field for (before loading any model)."""
    for r in requests:
        if r.overrides.get("augment") not in (None, False):
            raise MMCacheError(f"--{r.modality} {r.name}: augment is a training option of `finetune run`; extraction "
                               "always uses the reference preprocessing: drop augment")
    for r in requests:  # a whole store of failed rows helps no one: refuse before loading any model
        if r.modality in FIELDS and selected and all(getattr(s, r.modality) is None for s in selected):
            hint = " or generate captions as context with --caption blip" if r.modality == "context" else ""
            article = "an" if r.modality[0] in "aeiou" else "a"
            raise MMCacheError(f"--{r.modality} {r.name}: no selected sample of {ds.name!r} has {article} {r.modality} field; "
                               f"drop --{r.modality} (this dataset's adapter provides none){hint}")


def _resolve_extractors(ds: Dataset, requests: Sequence[Request], extractors: Sequence[Extractor] | None,
                        context_from: dict[str, Any] | None) -> list[Extractor]:
    """The given extractors, or each request's preset built for its modality (teachers get the class names);
    context extractors carry `context_from` in their config."""
    if extractors is None:
        built = []
        for r in requests:
            extra = dict(r.overrides)
            if r.modality == "teacher":
                extra.setdefault("label_space", ds.labels.tasks)
            built.append(build_extractor(r.preset, r.modality, **extra))
        extractors = built
    extractors = list(extractors)
    if context_from is not None:
        for r, ext in zip(requests, extractors, strict=True):
            if r.modality == "context":
                ext.config["context_from"] = dict(context_from)
    return extractors


def _merge_all_parts(extractors: Sequence[Extractor], paths: Sequence[Path], dataset: str, dtype: str) -> None:
    """Merge the leftover rank part files of every store."""
    for ext, p in zip(extractors, paths, strict=True):
        merge_parts(p, ext.spec, dataset, dtype)


def _plan(selected: Sequence[Sample], done: list[set[str]], summaries: list[StoreSummary], rank: int,
          world: int) -> tuple[list[Sample], list[tuple[int, ...]]]:
    """This rank's samples to do with the stores each one still misses; counts the skips in `summaries`."""
    need_per_sample: list[tuple[int, ...]] = []
    todo: list[Sample] = []
    for s in selected:
        need = tuple(k for k in range(len(done)) if s.id not in done[k])
        for k in range(len(done)):
            if s.id in done[k]:
                summaries[k].skipped += 1
        if need:
            todo.append(s)
            need_per_sample.append(need)
    # Each rank takes its own strided slice: no padding, no duplicates, nothing dropped.
    todo, need_per_sample = todo[rank::world], need_per_sample[rank::world]
    if world > 1:
        # Skips were counted on every rank; report them once.
        for sm in summaries:
            sm.skipped = sm.skipped if rank == 0 else 0
    return todo, need_per_sample


def _place_extractors(extractors: Sequence[Extractor], dev: torch.device) -> None:
    """Extractors in eval mode on `dev` (channels-last on CUDA for those that ask for it)."""
    channels_last = dev.type == "cuda"
    for ext in extractors:
        ext.eval()
        ext.to(dev)
        if channels_last and getattr(ext, "channels_last", False):
            ext.to(memory_format=torch.channels_last)


def _open_writers(writers: list[FeatureStore | None], extractors: Sequence[Extractor], paths: Sequence[Path],
                  need_per_sample: list[tuple[int, ...]], state: list[tuple[set[str], dict[str, str]]], dataset: str,
                  dtype: str, rank: int, distributed: bool, retry_failed: bool) -> None:
    """Open into `writers` one store (this rank's part file under torchrun) per extractor with rows to write; the
    others stay None. Filled in place, so the caller closes the stores opened before an error."""
    for k, (ext, p) in enumerate(zip(extractors, paths, strict=True)):
        if any(k in n for n in need_per_sample) or not distributed:
            target = _part_path(p, rank) if distributed else p
            # Rows to come + rows and records already there (+ room for retried records whose reason changes).
            cap = sum(k in n for n in need_per_sample)
            if not distributed:
                cap += len(state[k][0]) + len(state[k][1]) * (2 if retry_failed else 1)
            writers[k] = FeatureStore(target, ext.spec, dataset, dtype=dtype, versions=versions(),
                                      capacity=max(cap, 1))


def _gather_counts(summaries: list[StoreSummary], world: int) -> None:
    """Every rank's written / failed counts gathered into `summaries`, so rank 0 reports the whole run."""
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, [(s.written, s.failed, s.kinds) for s in summaries])
    for k, sm in enumerate(summaries):
        sm.written = sum(g[k][0] for g in gathered)
        sm.failed = {sid: r for g in gathered for sid, r in g[k][1].items()}
        sm.kinds = {sid: r for g in gathered for sid, r in g[k][2].items()}


def _list_failures(summaries: list[StoreSummary], by_id: dict[str, Sample]) -> None:
    """Rewrite each store's list of failed ids and count them in its summary."""
    for sm in summaries:
        if sm.path.exists():
            sm.failed_file = write_failures(sm.path, by_id)
            sm.failed_total = len(_store_ids(sm.path)[1])


def autocast(dev: torch.device, amp: bool, fp16: bool = True) -> Any:
    """Mixed precision on CUDA with `amp`, else off: bf16, or fp16 where the GPU has no bf16 (with `fp16`, as
    extraction runs it; training passes `fp16=False`, as fp16 gradients would need loss scaling)."""
    if dev.type != "cuda" or not amp:
        return nullcontext()
    dtype = torch.bfloat16 if not fp16 or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def index_batch(data: Any, rows: torch.Tensor) -> Any:
    """Rows `rows` of a collated batch (tensors, and dicts, lists or tuples of them; anything else as it is)."""
    if isinstance(data, torch.Tensor):
        return data[rows]
    if isinstance(data, dict):
        return {k: index_batch(v, rows) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(index_batch(v, rows) for v in data)
    return data


def _run_loop(todo: list[Sample], needs: list[tuple[int, ...]], extractors: list[Extractor],
              writers: list[FeatureStore | None], summaries: list[StoreSummary], dev: torch.device,
              batch_size: int, num_workers: int, strict: bool, amp: bool, progress: bool, world: int,
              by_id: dict[str, Sample]) -> None:
    if num_workers > 0:
        # Tokenizers used in the parent before the fork would warn in every worker and drop to one thread anyway.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = DecodeDataset(todo, needs, extractors, merge_decode_options(extractors))
    pin = dev.type == "cuda"
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=BatchCollate(extractors), pin_memory=pin,
                        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)
    bar = progress_bar(total=len(todo) * world, desc="extract", unit="item", leave=True, disable=not progress)
    threads = torch.get_num_threads()
    if dev.type == "cpu" and num_workers > 0:
        # Decoding workers need cores too; oversubscribed intra-op threads spin and slow the forward down.
        torch.set_num_threads(max(1, min(threads, usable_cores() - num_workers)))
    try:
        _loop(loader, extractors, writers, summaries, dev, strict, amp, bar, world, by_id)
    finally:
        torch.set_num_threads(threads)


def _loop(loader: DataLoader, extractors: list[Extractor], writers: list[FeatureStore | None],
          summaries: list[StoreSummary], dev: torch.device, strict: bool, amp: bool, bar: Any, world: int,
          by_id: dict[str, Sample]) -> None:
    with bar, torch.inference_mode():
        for batch in loader:
            for k, (ids, inputs, fails) in batch.items():
                writer, sm = writers[k], summaries[k]
                assert writer is not None
                for sid, reason in fails:
                    if strict:
                        # Nothing is recorded: a new id stays to do, a retried id keeps its old record.
                        raise MMCacheError(f"sample {sid!r} ({sm.modality}/{sm.name}): {reason} (--strict stops here; "
                                           "drop --strict to record it as failed and go on)")
                    writer.fail(sid, reason)
                    sm.failed[sid] = reason
                    sm.kinds[sid] = failure_kind(reason, by_id.get(sid))
                if ids:
                    ext = extractors[k]
                    cl = dev.type == "cuda" and getattr(ext, "channels_last", False)
                    x = to_device(inputs, dev, channels_last=cl)
                    with autocast(dev, amp):
                        out = ext(x)
                    writer.write(ids, _check_batch(out, len(ids), f"{sm.modality}/{sm.name}"))
                    sm.written += len(ids)
            n_items = len({sid for ids, _, fails in batch.values() for sid in [*ids, *(f[0] for f in fails)]})
            bar.update(n_items * world)


def format_summary(summaries: Sequence[StoreSummary], max_kinds: int = 10, max_ids: int = 5) -> str:
    """A small table of rows written / skipped / failed per store; then, per store, this run's failures counted
    by kind with example ids, and the file that lists every failed id of the store with its reason."""
    from mmcache.tables import render

    lines = [render(["store", "written", "skipped", "failed", "path"],
                    [[f"{s.modality}/{s.name}", s.written, s.skipped, len(s.failed), s.path] for s in summaries],
                    right=("written", "skipped", "failed"))]
    for s in summaries:
        earlier = max(0, s.failed_total - len(s.failed))
        if not s.failed and not earlier:
            continue
        if s.failed:
            lines.append(f"{s.modality}/{s.name}: {len(s.failed)} ids failed in this run "
                         "(recorded in the store, never written as data)")
        else:
            lines.append(f"{s.modality}/{s.name}:")
        by_kind: dict[str, list[str]] = {}
        for sid, reason in s.failed.items():
            by_kind.setdefault(s.kinds.get(sid) or failure_kind(reason), []).append(sid)
        ranked = sorted(by_kind.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        for kind, ids in ranked[:max_kinds]:
            more = f" and {len(ids) - max_ids} more" if len(ids) > max_ids else ""
            lines.append(f"  {len(ids):>5} x {kind}  ({', '.join(map(repr, ids[:max_ids]))}{more})")
        if len(ranked) > max_kinds:
            rest = ranked[max_kinds:]
            lines.append(f"  ... {len(rest)} other kinds ({sum(len(ids) for _, ids in rest)} ids)")
        if earlier:
            lines.append(f"  {earlier}{' more' if s.failed else ''} ids are recorded as failed by earlier runs "
                         "(skipped; --retry-failed tries them again)")
        if s.failed_file is not None:
            lines.append(f"  every failed id with its reason: {s.failed_file}")
    return "\n".join(lines)


__all__ = ["FIELDS", "Failure", "Request", "StoreSummary", "extract", "failure_kind", "format_summary",
           "merge_decode_options", "merge_parts", "parse_requests", "select_samples", "to_device", "write_failures",
           "write_manifest"]
