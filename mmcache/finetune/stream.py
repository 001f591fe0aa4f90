"""`finetune run --stream`: training batches from WebDataset shards read as a stream (`mmcache.data.stream`).

The training split is never listed nor unpacked: each process reads its share of the shards through DataLoader
workers, decodes each sample's members from memory with the shared decoders and the extractors' own
preprocessing (as the file-based path does), and batches the samples that decode. An epoch is a number of
optimizer steps: `--steps-per-epoch`, else the samples a `sizes.json` beside the shards counts. Validation and
test rows come from `--val-data`, shards small enough for the `webdataset` adapter to read as usual.
Skipped samples are warned about (the first few of each process, with the shard, key and reason) and counted
per epoch; the run's `metrics.json` reports the total under `train.stream_skipped`.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from mmcache.data.base import DATASETS, Dataset, LabelSpace, Sample, load_dataset
from mmcache.data.io import warn
from mmcache.data.stream import (
    SIZES_FILE,
    BadSample,
    ShardStream,
    Skip,
    StreamSample,
    expand_shards,
    index_size,
    shard_label_space,
    shards_of,
    stream_seed,
)
from mmcache.errors import MMCacheError
from mmcache.extract.base import Extractor
from mmcache.extract.runner import BatchCollate, DecodeDataset, Failure, merge_decode_options

if TYPE_CHECKING:
    from mmcache.finetune.run import FinetuneConfig

STREAM_FIELDS = ("image", "text", "context", "entity")  # raw fields a streamed sample carries
SHOWN_SKIPS = 5  # skipped samples each process names one by one; the rest are counted


class DecodeStreamed:
    """A streamed sample -> (id, {extractor index: its input}); a field that fails to decode raises `BadSample`."""

    def __init__(self, extractors: list[Extractor]) -> None:
        self.extractors = extractors
        self.options = merge_decode_options(extractors)
        self.need = tuple(range(len(extractors)))

    def __call__(self, sample: StreamSample) -> tuple[str, dict[int, Any], dict[str, int]]:
        # The file-based path's decoding of one sample: its decoders read the fields by name (image bytes too).
        sid, items = DecodeDataset([sample], [self.need], self.extractors, self.options)[0]  # type: ignore[list-item]
        bad = [item.reason for item in items.values() if isinstance(item, Failure)]
        if bad:
            raise BadSample("; ".join(dict.fromkeys(bad)))
        return sid, items, sample.labels


class StreamCollate:
    """The file-based path's batch (`BatchCollate`) plus `rows` (id -> Sample with its labels) and `skipped`."""

    def __init__(self, extractors: list[Extractor]) -> None:
        self.collate = BatchCollate(extractors)

    def __call__(self, batch: list[tuple[tuple[str, dict[int, Any], dict[str, int]], list[Skip]]]) -> dict[Any, Any]:
        out: dict[Any, Any] = self.collate([(sid, items) for (sid, items, _), _ in batch])
        out["rows"] = {sid: Sample(id=sid, split="train", labels=labels) for (sid, _, labels), _ in batch}
        out["skipped"] = [s for _, skips in batch for s in skips]
        return out


class EpochBatches:
    """`n` batches of an endless loader; its workers stop when the epoch's batches are drawn."""

    def __init__(self, loader: DataLoader, n: int) -> None:
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        if self.n <= 0:
            return
        it = iter(self.loader)
        try:
            for _ in range(self.n):
                yield next(it)
        except MMCacheError as e:
            # Raised in a worker, it arrives with the worker's traceback: keep the one-line message.
            raise MMCacheError(str(e).strip().splitlines()[-1].split("MMCacheError: ", 1)[-1]) from None
        finally:
            del it  # shuts the workers down


@dataclass
class TrainStream:
    """The streamed training split: its shards, label space and epoch length, and the skips seen so far."""

    shards: list[str]
    space: LabelSpace
    epoch_samples: int  # training samples per epoch, all processes together
    buffer: int = 1000
    label_key: str = "label"
    epoch_skips: Counter[str] = field(default_factory=Counter)  # reason -> count, this process, this epoch
    skipped: int = 0  # all epochs, all processes (summed at each epoch end)
    shown: int = 0
    in_by_id: list[str] = field(default_factory=list)  # ids of the batch put in the loop's by_id

    def batches_per_rank(self, cfg: FinetuneConfig, world: int) -> int:
        """Batches each process draws in an epoch: whole optimizer steps covering `epoch_samples`."""
        steps = -(-self.epoch_samples // (cfg.batch_size * world * cfg.grad_accum))
        return steps * cfg.grad_accum

    def epoch(self, extractors: list[Extractor], cfg: FinetuneConfig, epoch: int, done: int, rank: int,
              world: int) -> EpochBatches:
        """The rest of `epoch` for process `rank` when `done` samples (all processes) are trained on already; the
        stream's randomness depends on (seed, epoch, done), so a resumed epoch draws fresh samples."""
        left = self.batches_per_rank(cfg, world) - done // (cfg.batch_size * world)
        seed = stream_seed(cfg.seed, epoch, done)
        data = ShardStream(self.shards, self.space, DecodeStreamed(extractors), rank=rank, world=world, seed=seed,
                           buffer=self.buffer, label_key=self.label_key)
        # The workers' seeds come from the loader's own generator, never from the global one (as in the file-based
        # path), so the model's random stream continues exactly when a run resumes.
        loader = DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            collate_fn=StreamCollate(extractors), pin_memory=torch.cuda.is_available(),
                            persistent_workers=False, generator=torch.Generator().manual_seed(seed))
        return EpochBatches(loader, left)

    def take(self, batch: dict[Any, Any], rank: int, by_id: dict[str, Sample]) -> None:
        """Count a streamed batch's skipped samples (naming the first few) and put its labelled rows in `by_id` in
        place of the previous batch's (the training loop reads targets by id)."""
        for where, why in batch.pop("skipped", []):
            self.epoch_skips[why.split(" (", 1)[0][:120]] += 1
            if self.shown < SHOWN_SKIPS:
                self.shown += 1
                warn(f"{where}: skipped ({why})" + (f" [rank {rank}]" if rank else ""))
        for sid in self.in_by_id:
            by_id.pop(sid, None)
        rows: dict[str, Sample] = batch.pop("rows", {})
        self.in_by_id = [sid for sid in rows if sid not in by_id]
        by_id.update({sid: rows[sid] for sid in self.in_by_id})

    def end_epoch(self, epoch: int, rank: int, world: int) -> None:
        """Sum this epoch's skips over the processes (every process calls this) and report them on rank 0."""
        counts = self.epoch_skips
        if world > 1:
            import torch.distributed as dist

            got: list[Any] = [None] * world
            dist.all_gather_object(got, dict(counts))
            counts = sum((Counter(c) for c in got), Counter())
        n = sum(counts.values())
        self.skipped += n
        self.epoch_skips = Counter()
        if n and rank == 0:
            top = "; ".join(f"{c} x {why}" for why, c in counts.most_common(3))
            print(f"warning: epoch {epoch}: {n} streamed training samples skipped ({top})", file=sys.stderr)


def open_stream(cfg: FinetuneConfig, world: int, progress: bool = True) -> tuple[TrainStream, Dataset]:
    """The training stream of `cfg.data_dir` and the dataset of `cfg.val_data` (its validation and test rows), in
    one label space: a `labels.json` beside the training shards, else the validation data's."""
    if importlib.util.find_spec("webdataset") is None:
        raise MMCacheError("--stream reads shards with the webdataset library: pip install 'mmcache[stream]'")
    if DATASETS.canonical(cfg.dataset) != "webdataset":
        raise MMCacheError(f"--stream reads WebDataset shards; --dataset {cfg.dataset} is another layout: pass "
                           "--dataset webdataset, or drop --stream")
    if not cfg.data_dir or not cfg.val_data:
        raise MMCacheError("--stream needs the training shards (--data-dir 'shards/train-{000000..000099}.tar') and "
                           "validation shards (--val-data FOLDER, read unpacked as the webdataset adapter does)")
    if cfg.stores or cfg.context_from:
        raise MMCacheError("--stream trains on live encoders over the shards' own members; drop --*-store and "
                           "--context-from")
    fields = sorted({m for m in cfg.encoders if m not in STREAM_FIELDS})
    if fields:
        raise MMCacheError(f"--stream decodes image and text members; --{fields[0]} needs the unpacked shards: "
                           "drop --stream (the webdataset adapter unpacks them once)")
    if cfg.limit:
        raise MMCacheError("--limit cuts a listed split; a stream's epoch is --steps-per-epoch, so pass that instead")
    if cfg.steps_per_epoch is not None and cfg.steps_per_epoch < 1:
        raise MMCacheError(f"--steps-per-epoch must be a whole number >= 1, got {cfg.steps_per_epoch!r}")
    if cfg.shuffle_buffer < 1:
        raise MMCacheError(f"--shuffle-buffer must be a whole number >= 1, got {cfg.shuffle_buffer!r}")
    shards = expand_shards(cfg.data_dir)
    shards_of(shards, 0, world, 0, max(1, cfg.num_workers))  # too few shards for the readers: an error up front
    if cfg.steps_per_epoch is not None:
        epoch_samples = cfg.steps_per_epoch * cfg.batch_size * world * cfg.grad_accum
    else:
        size = index_size(shards)
        if size is None:
            raise MMCacheError(f"an endless stream needs an epoch length: pass --steps-per-epoch N, or put sizes.json "
                               f"(shard file name -> sample count) beside the shards ({shards[0]})")
        if size < 1:
            raise MMCacheError(f"{Path(shards[0]).parent / SIZES_FILE} counts no samples in these shards; fix it or "
                               "pass --steps-per-epoch N")
        epoch_samples = size
    options = dict(cfg.dataset_options)
    val = eval_data(cfg.val_data, cfg.dataset, None, options, progress)
    unused = sum(s.split not in ("val", "test") for s in val.samples)
    if unused and progress:
        warn(f"{cfg.val_data}: {unused} rows of split(s) {sorted({s.split for s in val.samples} - {'val', 'test'})} "
             "are not used (with --stream, training reads --data-dir only)")
    space = shard_label_space(shards) or val.labels
    return TrainStream(shards, space, epoch_samples, cfg.shuffle_buffer, str(options.get("label_key", "label"))), \
        relabel(val, space)


def eval_data(path: str | Path, dataset: str, space: LabelSpace | None, options: dict[str, Any],
              progress: bool = True) -> Dataset:
    """The validation and test rows of the shards of `path` (`--val-data`), unpacked by the webdataset adapter:
    shards that name no split are all validation rows. With `space`, labels are indices of its classes (by name)."""
    if not Path(path).exists():
        raise MMCacheError(f"--val-data {path}: not found; pass the folder of the validation (and test) shards")
    val = load_dataset(dataset, path, progress=progress, **options)
    if val.seed is not None:  # shards that name no split: every row validates
        val = replace(val, samples=[replace(s, split="val") for s in val.samples], seed=None, fold=None)
    return val if space is None else relabel(val, space)


def relabel(ds: Dataset, space: LabelSpace) -> Dataset:
    """`ds` with its labels as indices of `space` (same class names); a class `space` lacks is an error."""
    if ds.labels.tasks == space.tasks:
        return ds
    samples = []
    for s in ds.samples:
        labels = {}
        for t, i in s.labels.items():
            if t in space.tasks:
                labels[t] = space.index(t, ds.labels.tasks[t][i], f"{ds.root}, sample {s.id!r}: ")
        samples.append(replace(s, labels=labels))
    return replace(ds, samples=samples, labels=LabelSpace(dict(space.tasks), metric=ds.labels.metric))
