"""End-to-end fine-tuning: the live extractors (contract 2) feed the very same heads (contract 4).

The extractors that `mmcache extract` runs frozen are trained here with gradients, either
fully or through LoRA adapters (peft), together with a head built by `build_head` (or started
from a `heads train` run, `init_head`). Raw inputs are decoded and preprocessed in DataLoader
workers exactly as for extraction. Under `torchrun` the model is wrapped in
DistributedDataParallel and each rank trains on its share of the training split; rank 0
evaluates and writes the run folder, which has the same files as a `heads train` run plus the
encoder weights that changed (`encoders.safetensors`).

A run checkpoints at each epoch end (with `epoch_checkpoint=False` at the last one only) and every
`save_every` optimizer steps (`checkpoint.py`): rerun with the same run name (or `resume`) and it continues
from the last checkpoint, on the same or another number of processes. Each epoch's sample order depends on
(seed, epoch) only, so the samples an interrupted epoch already trained on are skipped, not drawn again.

Hybrid runs: modalities named in `stores` are not encoded live but read by id from their feature stores
(`cache/<dataset>/<modality>/<name>.h5`; their raw inputs are never decoded). A stored modality feeds the
head directly, or, when a live encoder declares that it `consumes` it (VisualBERT over Faster R-CNN regions),
that encoder only.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from mmcache.cache.store import StoreReader, store_path
from mmcache.data.base import Dataset, Sample, load_dataset
from mmcache.data.combined import combined_name, epoch_pool, sources
from mmcache.engine import (
    EMA,
    IGNORE,
    RunResult,
    Schedule,
    Selector,
    TrainProgress,
    adjust_logits,
    logit_offsets,
    make_optimizer,
    named_run_dir,
    new_run_dir,
    param_groups,
    parse_select,
    progress_hook,
    val_metrics,
    warn_failed_checks,
    write_run,
)
from mmcache.engine.loop import (
    Callback,
    EpochRow,
    FitUnit,
    TaskBase,
    callback_states,
    fit,
    load_callback_states,
    step_end,
)
from mmcache.engine.metrics import split_metrics
from mmcache.errors import MMCacheError
from mmcache.extract.base import FAMILIES, FIELDS, MODALITIES, Extractor, build_extractor, resolve_preset
from mmcache.extract.runner import (
    BatchCollate,
    DecodeDataset,
    Request,
    autocast,
    index_batch,
    merge_decode_options,
    parse_requests,
    to_device,
)
from mmcache.finetune.checkpoint import (
    CKPT_DIR,
    latest_checkpoint,
    load_checkpoint,
    remove_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mmcache.finetune.config import FinetuneConfig, check_finetune  # noqa: F401
from mmcache.finetune.stream import open_stream
from mmcache.heads.base import HEADS, Head, build_head
from mmcache.heads.losses import ContrastiveLoss, build_criterion
from mmcache.progress import bar as progress_bar
from mmcache.utils import init_distributed, pick_device, seed_everything

# Linear layers LoRA adapts by default, per extractor family (attention output projections for
# CLIP as in the content-moderation reference; query/value for BERT-style encoders).
LORA_TARGETS: dict[str, list[str]] = {
    "clip": ["attn"],  # open_clip blocks' nn.MultiheadAttention (peft adapts its in/out projections)
    "roberta": ["query", "value"],
    "visualbert": ["query", "value"],
    "resnet": ["conv1", "conv2", "conv3"],  # every convolution of the stem and the residual blocks (peft's Conv2d)
}
# Options that may change when a run resumes (where and how it runs, not what it computes).
RESUME_FREE = ("num_workers", "device", "quiet", "overwrite", "resume", "save_every", "run_name", "runs_dir",
               "track", "epoch_checkpoint")
# Options left out of a checkpoint's config while at these values, so checkpoints written before they existed
# still continue.
RESUME_UNSET: dict[str, Any] = {"stores": {}, "upsample": {}, "contrastive_weight": 0.0, "contrastive_classes": None,
                                "stream": False, "val_data": None, "steps_per_epoch": None, "shuffle_buffer": 1000}
CHECKPOINT_VERSION = 1


def encoder_request(modality: str, value: str) -> Request:
    """`--image PRESET` or `NAME=PRESET[key=value,...]`, parsed as `mmcache extract` parses a store."""
    requests = parse_requests(modality, value)
    if len(requests) != 1:
        raise MMCacheError(f"--{modality} {value!r}: fine-tuning takes one encoder per modality")
    return requests[0]


def build_encoder(modality: str, value: str, **fixed: Any) -> Extractor:
    """The live encoder of `--image PRESET` or `NAME=PRESET[key=value,...]`; `fixed` options (set by the run,
    e.g. a region store's width) override the preset's and the user's."""
    r = encoder_request(modality, value)
    return build_extractor(r.preset, modality, **{**r.overrides, **fixed})


def encoder_consumes(modality: str, value: str) -> dict[str, tuple[str, ...]]:
    """What the encoder of `value` reads from other modalities' stores (its family's `consumes`)."""
    _, cfg = resolve_preset(encoder_request(modality, value).preset)
    return dict(getattr(FAMILIES[cfg["family"]], "consumes", {}) or {})


class CachedInputs:
    """The feature stores of a hybrid run: each batch's rows read by id (the page cache keeps them warm)."""

    def __init__(self, readers: dict[str, StoreReader], keys: dict[str, list[str]], to_head: list[str]) -> None:
        self.readers = readers  # modality -> its store
        self.keys = keys  # modality -> arrays read per row
        self.to_head = to_head  # modalities the head reads (the others feed an encoder that consumes them)

    def batch(self, ids: list[str], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
        """Rows `ids` of every store, floats as float32 (stores may be float16), on `device`."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for m, r in self.readers.items():
            arrays = r.load(ids, keys=self.keys[m])
            out[m] = {k: (t.float() if t.is_floating_point() else t).to(device)
                      for k, t in ((k, torch.from_numpy(np.ascontiguousarray(a))) for k, a in arrays.items())}
        return out


def encode(encoders: nn.ModuleDict | dict[str, Extractor], batches: dict[str, Any], cached: CachedInputs | None,
           ids: list[str] | None, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """The head's inputs: each live encoder's features (an encoder that consumes stored arrays gets the batch's rows
    under `batch["consumed"]`) plus the stored features the head reads."""
    stored = cached.batch(ids, device) if cached is not None and ids is not None else {}
    feats: dict[str, dict[str, torch.Tensor]] = {}
    for m, b in batches.items():
        enc = encoders[m]
        needs = getattr(enc, "consumes", {})
        if needs:
            b = {**b, "consumed": {cm: {k: stored[cm][k] for k in keys} for cm, keys in needs.items()}}
        feats[m] = {k: v.float() for k, v in enc(b).items()}
    for m in cached.to_head if cached is not None else ():
        feats[m] = stored[m]
    return feats


class LiveModel(nn.Module):
    """Encoders + head: raw batches per modality (+ stored features by id) -> {task: logits}; with `contrastive`
    (a loss over the pooled embeddings of the modality pair `pair`), also that loss when asked."""

    def __init__(self, encoders: dict[str, Extractor], head: Head, cached: CachedInputs | None = None,
                 contrastive: ContrastiveLoss | None = None, pair: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.head = head
        self.cached = cached
        self.contrastive = contrastive  # inside the model, so DDP averages its gradients with the others'
        self.pair = pair

    def forward(self, batches: dict[str, Any], ids: list[str] | None = None,  # type: ignore[override]
                keep: torch.Tensor | None = None) -> Any:
        """Encode each modality's batch, add the stored features of rows `ids`, then classify with the head.
        With `keep` (bool [B]: rows whose pairs count) and a contrastive loss: (logits, contrastive loss)."""
        device = next(self.parameters()).device
        feats = encode(self.encoders, batches, self.cached, ids, device)
        logits = self.head(feats)
        if keep is None or self.contrastive is None or self.pair is None:
            return logits
        a, b = self.pair
        return logits, self.contrastive(feats[a]["pooled"], feats[b]["pooled"], keep)


def _with_context(ds: Dataset, cfg: FinetuneConfig) -> tuple[Dataset, dict[str, Any] | None]:
    """The dataset with the context texts the context encoder reads (its own, or a captions store's), and
    where they came from (None: the dataset)."""
    if "context" not in cfg.encoders:
        if cfg.context_from:
            raise MMCacheError("--context-from chooses the text of the context encoder: add --context, e.g. "
                               "--context roberta")
        return ds, None
    from mmcache.extract.caption import context_source

    needed = [s.id for split in ("train", "val", "test") for s in _subset(ds, split, cfg.limit)]
    return context_source(ds, cfg.cache_dir, cfg.context_from, needed=needed)


def check_stores(cfg: FinetuneConfig) -> None:
    """A modality is either encoded live or read from a store; at least one encoder trains."""
    both = sorted(set(cfg.encoders) & set(cfg.stores))
    if both:
        raise MMCacheError(f"--{both[0]} and --{both[0]}-store both name the {both[0]} features; keep one (live "
                           "encoder or feature store)")
    if cfg.stores and not cfg.encoders:
        raise MMCacheError("every modality comes from a feature store: there is no encoder to fine-tune; train a "
                           "head on the stores with `heads train`, or name a live encoder, e.g. --text clip")


# Encoder options a hybrid run sets from the store an encoder consumes (a region store's feature width).
STORE_SET_OPTIONS = ("visual_dim",)


def open_stores(cfg: FinetuneConfig, head_name: str) -> tuple[CachedInputs | None, dict[str, dict[str, Any]]]:
    """The run's feature stores (None without any) and the options each live encoder takes from them (a
    region-reading encoder's `visual_dim` is its store's feature width)."""
    consumes = {m: encoder_consumes(m, value) for m, value in cfg.encoders.items()}
    for m, value in cfg.encoders.items():
        for cm, want in consumes[m].items():
            if cm not in cfg.stores:
                raise MMCacheError(f"--{m} {value} reads {cm} {', '.join(want)} from a feature store; pass "
                                   f"--{cm}-store NAME (a region store such as frcnn: `mmcache extract "
                                   f"{cfg.dataset} --{cm} frcnn`)")
    if not cfg.stores:
        return None, {}
    readers = {m: StoreReader(store_path(cfg.cache_dir, combined_name(cfg.dataset), m, n)) for m, n in cfg.stores.items()}
    keys: dict[str, set[str]] = {m: set() for m in readers}
    fixed: dict[str, dict[str, Any]] = {}
    consumed: set[str] = set()
    for m, value in cfg.encoders.items():
        for cm, want in consumes[m].items():
            r = readers[cm]
            lacking = [k for k in want if k not in r.keys]
            if lacking:
                raise MMCacheError(f"--{m} {value} reads {', '.join(want)} from {r.path}, which holds "
                                   f"{', '.join(r.keys)}; pass a region store (e.g. --{cm}-store frcnn)")
            consumed.add(cm)
            keys[cm] |= set(want)
            fixed[m] = {"visual_dim": int(r.shapes["tokens"][-1])} if "tokens" in want else {}
    uses = getattr(HEADS[head_name], "uses", None)
    to_head = [m for m in readers if m not in consumed]
    for m in to_head:
        r = readers[m]
        got = [k for k in r.keys if uses is None or k in uses]
        if not got:
            raise MMCacheError(f"{r.path} holds {', '.join(r.keys)}, none of the arrays head {head_name!r} reads "
                               f"({', '.join(uses or [])})")
        keys[m] |= set(got)
    order = {m: [k for k in r.keys if k in keys[m]] for m, r in readers.items()}
    return CachedInputs(readers, order, to_head), fixed


def drop_unstored(samples: list[Sample], cached: CachedInputs | None, split: str, quiet: bool) -> list[Sample]:
    """`samples` without the rows some store lacks (failed or not extracted), with a printed count."""
    if cached is None or not samples:
        return samples
    keep = samples
    for r in cached.readers.values():
        miss = [s.id for s in keep if s.id not in r.index]
        if miss and not quiet:
            failed = sum(1 for i in miss if i in r.failed)
            print(f"warning: {len(miss)} of {len(keep)} {split} rows are missing from {r.path} ({failed} failed, "
                  f"{len(miss) - failed} not extracted); dropped", file=sys.stderr)
        if miss:
            gone = set(miss)
            keep = [s for s in keep if s.id not in gone]
    return keep


def _subset(ds: Dataset, split: str, limit: int | None) -> list[Sample]:
    """The labelled rows of `split`; with `limit`, the first `limit` of them (of each source dataset's, when the
    dataset combines several)."""
    samples = [s for s in ds.split(split) if s.labels]
    if not limit:
        return samples
    taken: Counter[str | None] = Counter()
    out = []
    for s in samples:
        if taken[s.source] < limit:
            taken[s.source] += 1
            out.append(s)
    return out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training samples' order in `epoch`: a permutation that depends on (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _loader(samples: list[Sample], extractors: list[Extractor], cfg: FinetuneConfig, epoch: int = 0) -> DataLoader:
    needs = [tuple(range(len(extractors)))] * len(samples)
    ds = DecodeDataset(samples, needs, extractors, merge_decode_options(extractors))
    # The loader draws its workers' base seed from its own generator, never from the global one, so the
    # random stream the model uses (dropout) continues exactly when a run resumes.
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                      collate_fn=BatchCollate(extractors), pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, generator=gen)


PROBE_ROWS = 64  # validation rows tried for one that every encoder decodes (the head's input shapes)


def _probe(samples: list[Sample], extractors: list[Extractor], modalities: list[str], cfg: FinetuneConfig
           ) -> tuple[list[str], dict[str, Any]]:
    """A few validation rows that every encoder decodes, on the CPU; else one line naming a row and its reason."""
    failed: list[tuple[str, str]] = []
    for start in range(0, min(len(samples), PROBE_ROWS), 4):
        batch = next(iter(_loader(samples[start:start + 4], extractors, replace(cfg, batch_size=4))))
        got = _aligned(batch, modalities, torch.device("cpu"))
        if got is not None:
            return got
        failed += [(sid, f"{modalities[k]}: {why}") for k, part in sorted(batch.items()) for sid, why in part[2]]
    tried = min(len(samples), PROBE_ROWS)
    first = f" (row {failed[0][0]!r}: {failed[0][1]})" if failed else ""
    raise MMCacheError(f"the first {tried} validation row(s) of {cfg.dataset!r} could not be decoded by every "
                       f"encoder{first}; check the data's media files and columns")


def _aligned(batch: dict[int, tuple[list[str], Any, list[tuple[str, str]]]], modalities: list[str],
             device: torch.device) -> tuple[list[str], dict[str, Any]] | None:
    """Keep the rows every encoder could decode; returns (ids, per-modality device batches)."""
    if any(k not in batch or batch[k][1] is None for k in range(len(modalities))):
        return None
    common = set.intersection(*(set(batch[k][0]) for k in range(len(modalities))))
    ids = [i for i in batch[0][0] if i in common]
    if not ids:
        return None
    out: dict[str, Any] = {}
    for k, m in enumerate(modalities):
        kids, data, _ = batch[k]
        if len(kids) != len(ids):
            rows = torch.tensor([kids.index(i) for i in ids])
            data = index_batch(data, rows)
        out[m] = to_device(data, device)
    return ids, out


def contrastive_class_ids(cfg: FinetuneConfig, names: list[str], task: str) -> set[int] | None:
    """Class indices of the primary task whose rows' pairs the contrastive loss counts (None: every row)."""
    if cfg.contrastive_classes is None:
        return None
    asked = [str(c).strip() for c in cfg.contrastive_classes]
    if not asked or not all(asked):
        raise MMCacheError(f"--contrastive-classes {','.join(asked)!r}: name classes of task {task!r} separated by "
                           f"commas ({', '.join(names)}), or leave it unset for every row")
    unknown = [c for c in asked if c not in names]
    if unknown:
        raise MMCacheError(f"--contrastive-classes: unknown class {unknown[0]!r} of task {task!r}; known: "
                           f"{', '.join(names)}")
    return {names.index(c) for c in asked}


def build_contrastive(cfg: FinetuneConfig, feats: dict[str, dict[str, torch.Tensor]]
                      ) -> tuple[ContrastiveLoss | None, tuple[str, str] | None]:
    """The contrastive loss of a run (None when its weight is 0) and the modality pair it reads: image and text
    when both give pooled embeddings, else the first two in the order of MODALITIES. `feats`: one probe batch
    of the head's inputs."""
    if not cfg.contrastive_weight:
        return None, None
    pooled = sorted((m for m, f in feats.items() if "pooled" in f), key=MODALITIES.index)
    if len(pooled) < 2:
        raise MMCacheError(f"--contrastive-weight pairs the pooled embeddings of two modalities; this run has "
                           f"{', '.join(pooled) or 'none'}; add a second encoder (e.g. --image clip --text clip) "
                           "or set --contrastive-weight 0")
    pair = ("image", "text") if {"image", "text"} <= set(pooled) else (pooled[0], pooled[1])
    with torch.random.fork_rng(devices=[]):  # the rest of the run draws the same random numbers
        torch.manual_seed(cfg.seed)
        loss = ContrastiveLoss(int(feats[pair[0]]["pooled"].shape[-1]), int(feats[pair[1]]["pooled"].shape[-1]))
    return loss, pair


def contrastive_groups(loss: ContrastiveLoss | None) -> list[dict[str, Any]]:
    """Optimizer groups of the contrastive loss (at the head's learning rate): the temperature without weight
    decay, the projections (when there are any) with it."""
    if loss is None:
        return []
    proj = [p for n, p in loss.named_parameters() if n != "logit_scale"]
    return [{"params": [loss.logit_scale], "weight_decay": 0.0}] + ([{"params": proj}] if proj else [])


def _pair_rows(ids: list[str], by_id: dict[str, Sample], task: str, classes: set[int] | None,
               device: torch.device) -> torch.Tensor:
    """Rows whose image-text pair the contrastive loss counts: those of `classes` of `task` (all when None)."""
    if classes is None:
        return torch.ones(len(ids), dtype=torch.bool, device=device)
    return torch.tensor([by_id[i].labels.get(task, IGNORE) in classes for i in ids], dtype=torch.bool, device=device)


def _targets(ids: list[str], by_id: dict[str, Sample], tasks: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    return {t: torch.tensor([by_id[i].labels.get(t, IGNORE) for i in ids], device=device) for t in tasks}


def apply_lora(enc: Extractor, cfg: FinetuneConfig) -> int:
    """Inject LoRA adapters into `enc` (peft) and freeze everything else; returns trainable parameter count."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise MMCacheError("--lora needs peft: pip install 'mmcache[lora]'") from None
    targets = cfg.lora_targets or LORA_TARGETS.get(enc.family)
    if not targets:
        raise MMCacheError(f"no default LoRA target modules for {enc.family!r}; pass --lora-targets NAME[,NAME]")
    present = {n.rsplit(".", 1)[-1] for n, m in enc.named_modules()
               if isinstance(m, (nn.Linear, nn.MultiheadAttention, nn.Conv2d))}
    if not set(targets) & present:
        raise MMCacheError(f"--lora-targets {targets} match no Linear / attention / convolution layer of {enc.preset!r}; "
                           f"its layer names include {sorted(present)[:12]}")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets)
    inject_adapter_in_model(lcfg, enc)
    n = 0
    for name, p in enc.named_parameters():
        p.requires_grad = "lora_" in name
        n += p.numel() if p.requires_grad else 0
    return n


@contextmanager
def _adapters_used(encoders: dict[str, Extractor], cfg: FinetuneConfig) -> Iterator[None]:
    """Around one forward pass: an encoder whose LoRA adapters all sit on layers its features never pass through
    (a classifier the extractor drops) would train nothing, and is refused naming the layers."""
    hooks, called = [], set()
    for m, enc in encoders.items():
        for name, module in enc.named_modules():
            if hasattr(module, "lora_A") and not any(True for _ in module.children() if hasattr(_, "lora_A")):
                hooks.append(module.register_forward_hook(lambda *_, key=(m, name): called.add(key)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
    for m, enc in encoders.items():
        adapted = sorted({name.rsplit(".", 1)[-1] for name, module in enc.named_modules() if hasattr(module, "lora_A")})
        if adapted and not any(k[0] == m for k in called):
            raise MMCacheError(f"--lora on {cfg.encoders[m]}: its adapted layers ({', '.join(adapted)}) are not on the "
                               "path to its features, so nothing would train; pass --lora-targets with layers the "
                               "encoder runs")


def enable_grad_checkpointing(enc: Extractor) -> None:
    """Recompute `enc`'s activations in the backward pass: open_clip's `set_grad_checkpointing` on its towers,
    Hugging Face's `gradient_checkpointing_enable` (non-reentrant, so LoRA's frozen inputs still pass gradients)."""
    found = False
    modules: list[Any] = list(enc.modules())
    for m in modules:
        if hasattr(m, "gradient_checkpointing_enable") and getattr(m, "supports_gradient_checkpointing", False):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            found = True
        elif hasattr(m, "set_grad_checkpointing") and m is not enc:
            try:
                m.set_grad_checkpointing(True)
                found = True
            except (AttributeError, TypeError):  # a whole CLIP whose other tower was dropped
                pass
        elif hasattr(m, "grad_checkpointing") and isinstance(m.grad_checkpointing, bool):
            m.grad_checkpointing = True  # an open_clip text Transformer
            found = True
    if not found:
        raise MMCacheError(f"--grad-checkpointing: {enc.preset!r} ({enc.family}) has no gradient checkpointing; "
                           "drop the flag for this encoder")


@torch.no_grad()
def evaluate(model: LiveModel, samples: list[Sample], cfg: FinetuneConfig, tasks: list[str],
             device: torch.device, desc: str = "eval") -> tuple[list[str], dict[str, np.ndarray]]:
    """Logits of `samples` (rows that fail to decode are left out), as numpy per task."""
    model.eval()
    mods = list(model.encoders)
    ids_all: list[str] = []
    outs: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    loader = _loader(samples, cast("list[Extractor]", list(model.encoders.values())), cfg)
    for batch in progress_bar(loader, desc=desc, disable=cfg.quiet):
        got = _aligned(batch, mods, device)
        if got is None:
            continue
        ids, inputs = got
        with autocast(device, cfg.amp, fp16=False):
            logits = model(inputs, ids)
        ids_all += ids
        for t in tasks:
            outs[t].append(logits[t].float().cpu().numpy())
    return ids_all, {t: np.concatenate(v) if v else np.zeros((0, 0)) for t, v in outs.items()}


def split_select(spec: str | None, srcs: list[str]) -> tuple[str | None, str | None]:
    """`--select SOURCE/[task:]metric` -> (SOURCE, the rest); without `SOURCE/` (None, spec): all val rows."""
    if not spec or "/" not in spec:
        return None, spec
    src, _, rest = spec.partition("/")
    if src not in srcs:
        raise MMCacheError(f"--select {spec!r}: {src!r} is not a source dataset of this run"
                           + (f"; its sources are {', '.join(srcs)}" if srcs else
                              "; SOURCE/ selects on one dataset of a run over several (--dataset a,b)"))
    return src, rest or None


def rows_metrics(ids: list[str], logits: dict[str, np.ndarray], by_id: dict[str, Sample], labels: dict[str, list[str]],
                 by_source: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics of rows `ids` (and per source dataset with `by_source`), as `engine.metrics.split_metrics`."""
    targets = {t: np.array([by_id[i].labels.get(t, IGNORE) for i in ids]) for t in logits}
    return split_metrics(targets, logits, labels, [by_id[i].source for i in ids] if by_source else None)


# ---------------------------------------------------------------- run folder, resume and the initial head


def _stem(cfg: FinetuneConfig) -> list[str]:
    # Each encoder's NAME, never its options: a weights path must not nest folders.
    parts = [f"{m}-{encoder_request(m, p).name}" for m, p in cfg.encoders.items()]
    return ["finetune", str(cfg.head), "+".join(parts + [f"{m}-store-{n}" for m, n in cfg.stores.items()])]


def resolve_run_dir(cfg: FinetuneConfig) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to continue from or None). The run's name is taken for this process until its
    folder is written (`mmcache.runfolder`): a second run given the same name is refused. A named run with a
    checkpoint continues it (unless `overwrite`, which starts over); a named run killed before its first checkpoint
    was complete starts again; `resume` without a name continues the newest run of the same stem. The checkpoints
    live in `<run>/checkpoints/` until the finished run folder, written whole beside it, replaces that folder."""
    from mmcache.runfolder import busy_error, check_name, release, take

    base = Path(cfg.runs_dir) / check_name(combined_name(cfg.dataset), "--dataset", "demo")
    if cfg.run_name:
        d = named_run_dir(base, cfg.run_name)
        if not take(d):
            raise busy_error(d, "--run-name")
        finished = (d / "metrics.json").is_file()
        ckpt = None if cfg.overwrite else latest_checkpoint(d)
        if ckpt is not None:
            return d, ckpt
        if cfg.resume:
            release(d)
            if finished:
                raise MMCacheError(f"--resume: {d} is a finished run (its checkpoints go once the run folder is "
                                   "written); choose another --run-name, or pass --overwrite instead of --resume to "
                                   "train it again")
            raise MMCacheError(f"--resume: {d} holds no checkpoint to continue; drop --resume to start the run")
        other = [p.name for p in d.iterdir() if p.name != CKPT_DIR] if d.is_dir() else []
        if d.is_file() or (other and not cfg.overwrite):
            release(d)
            raise MMCacheError(f"run folder {d} already exists; choose another --run-name or pass --overwrite")
        remove_checkpoints(d)  # --overwrite, or a first checkpoint that was cut short: the run starts over
        return d, None
    if cfg.resume:
        prefix = "_".join(_stem(cfg)) + "_"
        found = [(p, c) for p in sorted(base.glob(prefix + "*")) if p.is_dir() and (c := latest_checkpoint(p))]
        if not found:
            raise MMCacheError(f"--resume: no run folder {base / prefix}* holds a checkpoint; name the run to "
                               "continue with --run-name")
        d, ckpt = max(found, key=lambda pc: pc[1].stat().st_mtime)
        if not take(d):
            raise busy_error(d, "--run-name")
        return d, ckpt
    return new_run_dir(cfg.runs_dir, combined_name(cfg.dataset), cfg.run_name, _stem(cfg), cfg.overwrite), None


def _resume_key(cfg: FinetuneConfig) -> dict[str, Any]:
    # `stores` only when set, so checkpoints written before hybrid runs existed still continue.
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE
                                  and not (k in RESUME_UNSET and v == RESUME_UNSET[k])}, default=str))


def check_resume_config(saved: dict[str, Any], cfg: FinetuneConfig, where: Path) -> None:
    """Refuse to continue a checkpoint written with other options, naming them."""
    saved = FinetuneConfig.upgrade(saved)
    now = _resume_key(cfg)
    full = json.loads(json.dumps(asdict(cfg), default=str))
    default = json.loads(json.dumps(asdict(FinetuneConfig(dataset=cfg.dataset, encoders=cfg.encoders)), default=str))
    # An option added after the checkpoint was written is absent there: at its default it is the same run;
    # an option this version no longer has is not compared.
    diff = [k for k in sorted(set(saved) | set(now)) if k in full and saved.get(k, default[k]) != full[k]]
    if diff:
        shown = "; ".join(f"{k}={json.dumps(saved.get(k, default[k]))} there, {json.dumps(full[k])} here"
                          for k in diff[:4])
        raise MMCacheError(f"{where} was written by a run with other options ({shown}); rerun with the same options "
                           "to continue it, or pass --overwrite to start the run over")


def read_head_run(path: str | Path) -> dict[str, Any]:
    """A run folder's head: name, input shapes, tasks, hyperparameters, label space and weights (for `init_head`),
    after the one check of a run folder that is read (`mmcache.runfolder.read_head_state`)."""
    from mmcache.runfolder import read_head_state

    d = Path(path)
    if not d.is_dir():
        raise MMCacheError(f"--init-head {d}: not a run folder; pass a run folder written by `heads train`")
    try:
        hc, cfg, state = read_head_state(d)
    except MMCacheError as e:
        raise MMCacheError(f"--init-head {e}") from None
    return {"path": str(d), "name": hc["name"], "inputs": hc["inputs"], "tasks": hc["tasks"],
            "hparams": hc["hparams"], "labels": cfg.get("resolved", {}).get("labels", {}).get("tasks", {}),
            "stores": cfg.get("resolved", {}).get("stores", {}), "state": state,
            "finetuned": isinstance(cfg.get("encoders"), dict) and not cfg.get("freeze_encoders")}


def _shapes(inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[int]]]:
    return {m: {k: [int(s) for s in v] for k, v in a.items()} for m, a in inputs.items()}


def check_init_head_name(init: dict[str, Any], name: str) -> None:
    """The head of `init` must be head `name`."""
    if init["name"] != name:
        raise MMCacheError(f"--init-head {init['path']}: the run's head is {init['name']!r}, this one {name!r}; pass "
                           f"--head {init['name']} (or leave --head unset)")


def check_init_head(init: dict[str, Any], head: Head, labels: dict[str, list[str]]) -> None:
    """The head of `init` must equal `head` in name, hyperparameters, input shapes and classes; else one line
    naming the first difference and what to do."""
    p = f"--init-head {init['path']}"
    check_init_head_name(init, head.name)
    for k in sorted(set(init["hparams"]) | set(head.hparams)):
        a, b = init["hparams"].get(k), head.hparams.get(k)
        if json.dumps(a) != json.dumps(b):
            raise MMCacheError(f"{p}: head hyperparameter {k}={json.dumps(a)} in the run, {json.dumps(b)} here; "
                               f"leave {k} unset to take the run's")
    got, want = _shapes(head.inputs), _shapes(init["inputs"])
    for m in sorted(set(got) | set(want)):
        for k in sorted(set(got.get(m, {})) | set(want.get(m, {}))):
            a, b = want.get(m, {}).get(k), got.get(m, {}).get(k)
            if a != b:
                raise MMCacheError(
                    f"{p}: the run's head reads {m} {k} of shape {a or 'none'}, these encoders give {b or 'none'}; "
                    "fine-tune the encoders whose stores the run was trained on"
                    + (f" ({', '.join(init['stores'])})" if init["stores"] else ""))
    if {t: int(n) for t, n in init["tasks"].items()} != dict(head.tasks):
        raise MMCacheError(f"{p}: the run's head predicts {init['tasks']} (task: classes), this one {head.tasks}; "
                           "fine-tune the same tasks")
    for t, names in labels.items():
        if t not in init["labels"] or init["labels"][t] != names:
            raise MMCacheError(f"{p}: task {t!r} has classes {names} here, {init['labels'].get(t)} in the run; start "
                               "from a run trained on the same label space")


# ---------------------------------------------------------------- training


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 1  # the epoch to run or continue
    done: int = 0  # training samples of `epoch` already trained on, all processes together
    epoch_steps: int = 0  # optimizer-step boundaries passed in `epoch`
    global_step: int = 0
    loss_sum: float = 0.0  # rank 0's running train loss of `epoch`
    loss_batches: int = 0
    contrastive_sum: float = 0.0  # rank 0's running contrastive loss of `epoch` (over the same batches)
    fit_seconds: float = 0.0
    train_seconds: float = 0.0  # forward/backward/step time, evaluation excluded
    samples: int = 0  # training samples trained on so far, all processes together


def _state_keys(model: LiveModel, frozen: bool) -> list[str]:
    """State keys that training changes: the head's, trainable encoder parameters, and the encoders' buffers
    (BatchNorm statistics) unless the encoders are frozen (then kept in eval mode)."""
    params = dict(model.named_parameters())
    return [k for k in model.state_dict() if k.startswith("head.") or (k in params and params[k].requires_grad)
            or (not frozen and k not in params)]


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _steps_per_epoch(n: int, cfg: FinetuneConfig, world: int) -> int:
    return -(-n // (cfg.batch_size * world * cfg.grad_accum))


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory": "cuda allocated"}
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"peak_memory_bytes": int(kb) * 1024, "peak_memory": "process resident set (CPU)"}
    except (ImportError, OSError):
        return {}


def validate_config(cfg: FinetuneConfig, given: Collection[str] = ()) -> None:
    """Refuse options out of range, and options that contradict each other or that this run would not use, in one
    line naming the flag (before any data or model is loaded): the engine's per-field checks, then
    `check_finetune`. `given`: the flags typed on the command line (set even at their default value)."""
    cfg.validate(given)


def check_config(cfg: FinetuneConfig, given: Collection[str] = ()) -> None:
    """Every check `finetune` makes before it reads anything, in its order: the store flags, the tracking backend
    (a missing one stops the run before any training), then `validate_config` (`given`: the typed flags)."""
    check_stores(cfg)
    validate_config(cfg, given)


def finetune(cfg: FinetuneConfig) -> RunResult | None:
    """Fine-tune `cfg.encoders` with `cfg.head` end to end on the shared engine (optimizer, schedule, selection,
    early stopping, run folder); returns the same result type as `heads train` on rank 0 (None on other ranks).
    Continues the run's last checkpoint when there is one (see `resolve_run_dir`). The run's name is held until
    its folder is written, or the call fails."""
    from mmcache.runfolder import releasing

    with releasing():
        return _finetune(cfg)


@dataclass(eq=False)
class Prepared:
    """What a fine-tuning run reads before any encoder loads: its rows, stores, classes and criterion."""

    ds: Dataset
    context_from: dict[str, Any] | None
    tasks: list[str]
    pair_classes: set[int] | None
    cached: CachedInputs | None
    fixed: dict[str, dict[str, Any]]
    stream: Any
    train_s: list[Sample]
    val_s: list[Sample]
    test_s: list[Sample]
    by_id: dict[str, Sample]
    srcs: list[str]
    pool: list[Sample]
    n_train: int
    n_classes: dict[str, int]
    counts: dict[str, torch.Tensor]
    crit: Any


def _prepare(cfg: FinetuneConfig, world: int, rank: int) -> Prepared:
    """The run's dataset, rows of each split, stores and criterion, each refused in one line when unusable."""
    stream, data = open_stream(cfg, world, rank == 0 and not cfg.quiet) if cfg.stream else (None, None)  # data: val
    ds, context_from = _with_context(data or load_dataset(cfg.dataset, cfg.data_dir, progress=rank == 0 and not cfg.quiet,
                                                          **cfg.dataset_options), cfg)
    tasks = cfg.tasks or list(ds.labels.tasks)
    unknown = [t for t in tasks if t not in ds.labels.tasks]
    if unknown:
        raise MMCacheError(f"unknown task(s) {unknown}; {cfg.dataset!r} has {list(ds.labels.tasks)}")
    pair_classes = contrastive_class_ids(cfg, ds.labels.tasks[ds.labels.primary], ds.labels.primary)
    cached, fixed = open_stores(cfg, cast(str, cfg.head))
    quiet = cfg.quiet or rank != 0
    train_s = [] if stream else drop_unstored(_subset(ds, "train", cfg.limit), cached, "train", quiet)
    val_s = drop_unstored(_subset(ds, "val", cfg.limit) or _subset(ds, "test", cfg.limit), cached, "val", quiet)
    test_s = drop_unstored(_subset(ds, "test", cfg.limit), cached, "test", quiet)
    if not (train_s or stream) or not val_s:
        where = f" that every store ({', '.join(cfg.stores.values())}) holds" if cached is not None else ""
        raise MMCacheError(f"{cfg.dataset!r} needs labelled train and val (or test) rows{where} to fine-tune"
                           + ("; run `mmcache extract` for them" if where else ""))
    if not stream and len(train_s) < 2:  # a batch of one is skipped (BatchNorm cannot train on one row)
        raise MMCacheError(f"{cfg.dataset!r} has {len(train_s)} train row(s) to fine-tune on; a head needs at least 2"
                           + (" (raise --limit)" if cfg.limit else ""))
    for m, spec in cfg.encoders.items():  # an encoder of a field no row has would fail every row: refuse up front
        if m in FIELDS and all(getattr(s, m) is None for s in train_s + val_s):
            raise MMCacheError(f"--{m} {spec}: no row of {cfg.dataset!r} has {'an' if m[0] in 'aeiou' else 'a'} {m} "
                               f"field; drop --{m} (this dataset's adapter provides none)")
    pool = epoch_pool(train_s, cfg.upsample)  # an epoch's training rows: a source's K times with --upsample
    # The criterion needs only the classes and their train counts: built before any encoder loads, so a loss
    # option out of range fails in seconds, not after the models are read.
    n_classes = {t: len(ds.labels.tasks[t]) for t in tasks}
    counts = {t: torch.bincount(torch.tensor([s.labels[t] for s in pool or val_s if t in s.labels], dtype=torch.long),
                                minlength=n) for t, n in n_classes.items()}
    crit = build_criterion(cfg.loss, n_classes, class_counts=counts, **cfg.loss_options)
    return Prepared(ds=ds, context_from=context_from, tasks=tasks, pair_classes=pair_classes, cached=cached,
                    fixed=fixed, stream=stream, train_s=train_s, val_s=val_s, test_s=test_s, by_id=ds.by_id(),
                    srcs=sources(ds.samples), pool=pool, n_train=stream.epoch_samples if stream else len(pool),
                    n_classes=n_classes, counts=counts, crit=crit)


def _build_encoders(cfg: FinetuneConfig, prep: Prepared) -> tuple[dict[str, Extractor], int]:
    """The live encoders, trainable as the run asks (full, LoRA, frozen), and their trainable parameter count."""
    encoders = {m: build_encoder(m, p, **prep.fixed.get(m, {})) for m, p in cfg.encoders.items()}
    if prep.context_from is not None:
        encoders["context"].config["context_from"] = prep.context_from  # the spec says which texts it read
    trainable = 0
    for enc in encoders.values():
        if cfg.freeze_encoders:
            enc.requires_grad_(False)
        elif cfg.lora:
            trainable += apply_lora(enc, cfg)
        else:
            enc.requires_grad_(True)
            trainable += sum(p.numel() for p in enc.parameters())
        if cfg.grad_checkpointing and not cfg.freeze_encoders:
            enable_grad_checkpointing(enc)
    augmented = [m for m, enc in encoders.items() if enc.augment]
    if augmented and cfg.freeze_encoders:
        raise MMCacheError(f"--{augmented[0]} {cfg.encoders[augmented[0]]}: augment=true augments what a training "
                           "encoder sees, and frozen encoders (--freeze-encoders) run in evaluation mode; drop one")
    return encoders, trainable


def _build_model(cfg: FinetuneConfig, prep: Prepared, encoders: dict[str, Extractor], init: dict[str, Any] | None,
                 rank: int) -> LiveModel:
    """Encoders + the head (its input shapes from one real batch through the encoders, or the `init` run's head) +
    the contrastive loss, when the run has one."""
    for enc in encoders.values():
        enc.eval()  # the probe below trains nothing: no augmented views
    got = _probe(prep.val_s, list(encoders.values()), list(encoders), cfg)
    with torch.no_grad(), _adapters_used(encoders if cfg.lora and not cfg.freeze_encoders else {}, cfg):
        feats = encode(encoders, got[1], prep.cached, got[0], torch.device("cpu"))
    head_name = cast(str, cfg.head)
    keys = getattr(HEADS[head_name], "uses", None)
    inputs = {m: {k: tuple(v.shape[1:]) for k, v in f.items() if keys is None or k in keys} for m, f in feats.items()}
    seed_everything(cfg.seed)
    head = build_head(head_name, inputs, prep.n_classes, cfg.head_hparams)
    if init is not None:
        check_init_head(init, head, {t: prep.ds.labels.tasks[t] for t in prep.tasks})
        head.load_state_dict(init["state"])
        for m, enc in encoders.items():
            store = next((h for tag, h in init["stores"].items() if tag.split("/", 1)[0] == m), None)
            if store and store != enc.spec_hash() and rank == 0:
                print(f"warning: --init-head: its head was trained on {m} features of spec {store}; --{m} "
                      f"{cfg.encoders[m]} gives spec {enc.spec_hash()} (another model or preprocessing)", file=sys.stderr)
    contrastive, pair = build_contrastive(cfg, feats)
    return LiveModel(encoders, head, prep.cached, contrastive, pair)


class FinetuneTask(TaskBase):
    """A fine-tuning run on the engine's fit loop (`mmcache.engine.loop`): one selection unit; its epochs decode raw
    inputs in DataLoader workers, rank 0 validates, and every process agrees on stopping."""

    def __init__(self, cfg: FinetuneConfig, prep: Prepared, model: LiveModel, device: torch.device, world: int,
                 rank: int) -> None:
        self.cfg, self.prep, self.model, self.device, self.world, self.rank = cfg, prep, model, device, world, rank
        self.crit = prep.crit.to(device)
        self.tasks = prep.tasks
        from mmcache.heads.train import reference_tau

        self.tau = reference_tau(model.head.hparams) if cfg.logit_adjust is None else float(cfg.logit_adjust)
        self.offsets = logit_offsets(prep.counts, self.tau, prep.ds.labels.tasks)  # subtracted at evaluation
        # Head (and learned loss weights) at lr, trained encoder weights at encoder_lr: the engine's parameter groups.
        # The contrastive temperature and projections train at lr, the temperature undecayed (as open_clip).
        self.opt = make_optimizer(cfg.optimizer, param_groups(model.head, self.crit, model.encoders,
                                                              encoder_lr=cfg.encoder_lr)
                                  + contrastive_groups(model.contrastive), cfg.lr, cfg.weight_decay)
        self.clip_params = [p for g in self.opt.param_groups for p in g["params"]]
        self.steps = cfg.epochs * _steps_per_epoch(prep.n_train, cfg, world)
        self.sel_source, sel_spec = split_select(cfg.select_metric, prep.srcs)
        self.sel_task, self.metric = parse_select(sel_spec, self.tasks, prep.ds.labels.metric)
        selector = Selector(self.metric, cfg.early_stopping)
        sched = Schedule(cfg.schedule, self.opt, max(1, self.steps), int(cfg.warmup * self.steps), selector.mode)
        # The trained weights' average, evaluated and saved instead.
        self.unit = FitUnit(selector, sched, EMA(model, cfg.ema) if cfg.ema else None)
        self.units = [self.unit]
        self.tell = progress_hook(model, self.crit)  # the step reaches the loss's warm-ups and the head's schedules
        self.state_keys = _state_keys(model, cfg.freeze_encoders)
        self.prog = Progress()
        self.net: nn.Module = model
        self.mods = list(model.encoders)
        self.t_epoch = 0.0
        self.save: Callable[[str], None] = lambda tag: None  # the checkpoint writer (`Checkpoints`)

    def wrap(self) -> None:
        """Under torchrun: the model in DistributedDataParallel."""
        if self.world > 1:
            # Each CLIP tower holds the other tower's unused parameters only if present; be permissive.
            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=True)

    def step(self) -> None:
        """One optimizer step (gradients clipped), the schedule's and the weight average's."""
        cfg = self.cfg
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.clip_params, cfg.max_grad_norm)
        self.opt.step()
        if self.model.contrastive is not None:
            self.model.contrastive.clamp_()
        step_end(self.unit)
        self.opt.zero_grad(set_to_none=True)
        self.prog.global_step += 1

    def epoch_loader(self, epoch: int) -> tuple[Any, int, int]:
        """This rank's loader of `epoch` (its rest, when resumed mid-epoch), its full batches and the samples it
        covers, all processes together."""
        cfg, prog, world, encs = self.cfg, self.prog, self.world, list(self.model.encoders.values())
        stream = self.prep.stream
        if stream is not None:  # every rank draws the same number of full batches from its own shards
            loader: Any = stream.epoch(encs, cfg, epoch, prog.done, self.rank, world)
            return loader, len(loader), len(loader) * cfg.batch_size * world
        pool = self.prep.pool
        rest = epoch_order(len(pool), cfg.seed, epoch)[prog.done:]
        mine = [pool[i] for i in rest[self.rank::world]]  # each rank its own slice, no padded duplicates
        full_batches = (len(rest) // world) // cfg.batch_size  # every rank has this many full batches
        return _loader(mine, cast("list[Extractor]", encs), cfg, epoch), full_batches, len(rest)

    def train_epoch(self, epoch: int, active: list[Any]) -> None:
        cfg, prog, model = self.cfg, self.prog, self.model
        self.t_epoch = time.perf_counter()
        model.train()
        self.crit.train()
        for encoder in model.encoders.values():
            if cfg.freeze_encoders:
                encoder.eval()  # frozen encoders keep their normalisation statistics
        loader, full_batches, n_rest = self.epoch_loader(epoch)
        bar = progress_bar(loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=cfg.quiet or self.rank != 0)
        self.opt.zero_grad(set_to_none=True)
        pending = 0
        t_train = time.perf_counter()
        # Ranks may see different numbers of batches (uneven slices, undecodable rows): DDP's join
        # lets a rank that runs out early keep answering the others' all-reduces.
        with self.net.join() if isinstance(self.net, DDP) else nullcontext():
            for i, batch in enumerate(bar, start=1):
                if self.batch(epoch, batch):
                    pending += 1
                    bar.set_postfix(loss=f"{prog.loss_sum / prog.loss_batches:.4f}")
                if i % cfg.grad_accum:
                    continue
                if pending:
                    self.step()
                    pending = 0
                prog.epoch_steps += 1
                if cfg.save_every and prog.epoch_steps % cfg.save_every == 0 and i <= full_batches:
                    base, covered = prog.done, i * cfg.batch_size * self.world
                    prog.done = base + covered
                    prog.train_seconds += time.perf_counter() - t_train
                    prog.samples = prog.samples + covered
                    self.save(f"epoch{epoch}-step{prog.global_step}")
                    prog.done, prog.samples = base, prog.samples - covered
                    t_train = time.perf_counter()
        if pending:  # the epoch's last, partial accumulation still counts
            self.step()
        prog.train_seconds += time.perf_counter() - t_train
        prog.samples += n_rest
        if self.prep.stream is not None:
            self.prep.stream.end_epoch(epoch, self.rank, self.world)

    def batch(self, epoch: int, batch: Any) -> bool:
        """Forward and backward of one batch (its loss over `grad_accum`); False when no two rows decoded."""
        cfg, prog, prep, device = self.cfg, self.prog, self.prep, self.device
        if prep.stream is not None:  # the batch's rows stand in by_id until the next batch
            prep.stream.take(batch, self.rank, prep.by_id)
        step_rows = _aligned(batch, self.mods, device)
        if step_rows is None or len(step_rows[0]) < 2:
            return False  # BatchNorm cannot train on one row (an epoch's last row, or one left undecoded)
        ids, inputs_b = step_rows
        self.tell(TrainProgress(epoch - 1, prog.global_step, self.steps))
        with autocast(device, cfg.amp, fp16=False):
            if self.model.contrastive is not None:
                logits, pair_loss = self.net(inputs_b, ids, keep=_pair_rows(ids, prep.by_id, prep.ds.labels.primary,
                                                                            prep.pair_classes, device))
            else:
                logits, pair_loss = self.net(inputs_b, ids), None
        loss, _ = self.crit(logits, _targets(ids, prep.by_id, self.tasks, device), None)
        total = loss if pair_loss is None else loss + cfg.contrastive_weight * pair_loss.float()
        (total / cfg.grad_accum).backward()
        prog.loss_sum += float(loss.detach())
        prog.loss_batches += 1
        if pair_loss is not None:
            prog.contrastive_sum += float(pair_loss.detach())
        return True

    def validate(self, epoch: int, active: list[Any], seconds: float) -> list[EpochRow | None]:
        if self.rank != 0:
            return [None]
        prep, tasks, device = self.prep, self.tasks, self.device
        ids, lg = evaluate(self.model, prep.val_s, self.cfg, tasks, device, desc="val")
        if self.sel_source is not None:  # `--select SOURCE/...`: that source dataset's val rows choose the epoch
            keep = [k for k, i in enumerate(ids) if prep.by_id[i].source == self.sel_source]
            ids, lg = [ids[k] for k in keep], {t: v[keep] for t, v in lg.items()}
        y = {t: torch.tensor([prep.by_id[i].labels.get(t, IGNORE) for i in ids], dtype=torch.long) for t in tasks}
        logits_t = {t: torch.from_numpy(lg[t]).float() for t in tasks}
        vm = val_metrics(y[self.sel_task], adjust_logits(logits_t, self.offsets)[self.sel_task], self.metric) \
            if ids else {}
        if ids:
            self.crit.eval()  # the validation loss of the task logits alone (no auxiliary outputs, no warm-up step)
            with torch.no_grad():
                vm["loss"] = float(self.crit({t: v.to(device) for t, v in logits_t.items()},
                                             {t: v.to(device) for t, v in y.items()}, None, epoch - 1)[0])
        prog = self.prog
        train_loss = prog.loss_sum / max(1, prog.loss_batches)
        extra = {}
        contrastive = self.model.contrastive
        if contrastive is not None:  # the unweighted term, beside the criterion's train loss
            extra = {"train_contrastive": prog.contrastive_sum / max(1, prog.loss_batches),
                     "contrastive_scale": float(contrastive.scale.detach())}
        if not self.cfg.quiet:
            print(f"epoch {epoch}: train loss {train_loss:.4f}, val {self.metric} "
                  f"{vm.get(self.metric, float('nan')):.4f}", file=sys.stderr)
        return [EpochRow(vm, train_loss, self.opt.param_groups[0]["lr"], time.perf_counter() - self.t_epoch, extra)]

    def state(self, unit: Any) -> dict[str, Any]:
        keys = set(self.state_keys)
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if k in keys}

    def agree_stop(self, stop: bool) -> bool:
        if self.world > 1:  # every rank stops together
            import torch.distributed as dist

            stop_flag = [stop]
            dist.broadcast_object_list(stop_flag, src=0)
            stop = bool(stop_flag[0])
            self.unit.selector.stopped = stop
        return stop

    def epoch_done(self, epoch: int) -> None:
        prog = self.prog
        prog.fit_seconds += time.perf_counter() - self.t_epoch
        prog.epoch, prog.done, prog.epoch_steps, prog.loss_sum, prog.loss_batches = epoch + 1, 0, 0, 0.0, 0
        prog.contrastive_sum = 0.0

    def note(self, unit: Any, message: str) -> None:
        if self.rank == 0 and not self.cfg.quiet:
            print(message, file=sys.stderr)


class Checkpoints(Callback):
    """Checkpoints of a fine-tuning run (`finetune/checkpoint.py`): at every epoch end (with `epoch_checkpoint`
    off, at the last one and at an early stop only) and every `save_every` optimizer steps. Each holds every
    rank's random streams and buffers, the progress, curves, selection, weights, optimizer, schedule, weight
    average, and the other callbacks' state."""

    name = "checkpoints"

    def __init__(self, task: FinetuneTask, run_dir: Path, others: list[Callback] | None = None) -> None:
        self.task, self.run_dir, self.others = task, run_dir, others or []
        params = {n for n, _ in task.model.named_parameters()}
        self.buffer_keys = {k for k in task.state_keys if k not in params}
        task.save = self.save

    def save(self, tag: str) -> None:
        t = self.task
        model, unit = t.model, t.unit
        # Every rank's random streams and buffers: under DDP's join the BatchNorm statistics each forward
        # starts from are another rank's, so ranks' buffers differ and each is saved.
        own = {"rng": rng_state(t.device), "buffers": {k: v for k, v in model.state_dict().items()
                                                       if k in self.buffer_keys}}
        ranks = _gather(own, t.world)
        if t.rank != 0:
            return
        selector = unit.selector
        state = {"version": CHECKPOINT_VERSION, "config": _resume_key(t.cfg), "world": t.world,
                 "progress": asdict(t.prog), "curves": unit.curves, "rng": [r["rng"] for r in ranks],
                 "buffers": [r["buffers"] for r in ranks],
                 "selector": {"best_value": selector.best_value, "best_epoch": selector.best_epoch,
                              "stale": selector.stale, "stopped": selector.stopped},
                 "best_state": selector.best_state or {},
                 "weights": {k: v for k, v in model.state_dict().items() if k in set(t.state_keys)},
                 "criterion": t.crit.state_dict(), "optimizer": t.opt.state_dict(),
                 "schedule": cast(Schedule, unit.sched).state_dict(),
                 "ema": unit.ema.state_dict() if unit.ema is not None else None,
                 "callbacks": callback_states(self.others)}
        save_checkpoint(self.run_dir, state, tag)

    def on_epoch_end(self, task: Any, epoch: int) -> None:
        t = self.task
        stop = t.unit.selector.stopped
        if t.cfg.epoch_checkpoint or stop or t.prog.epoch > t.cfg.epochs:  # the last epoch's end always: resumable
            self.save(f"epoch{epoch}-end-step{t.prog.global_step}")


def _resume(task: FinetuneTask, ckpt: dict[str, Any] | None, run_dir: Path, callbacks: list[Callback]) -> None:
    """Continue `ckpt` (None: a fresh run): the model, optimizer, schedule, selection, weight average, curves and
    callbacks' state as saved; this rank's buffers once DDP wrapped the model."""
    if ckpt is not None:
        task.prog, task.unit.curves = _restore(ckpt, task.model, task.crit, task.opt, cast(Schedule, task.unit.sched),
                                               task.unit.selector, task.state_keys, task.cfg, task.world, task.rank,
                                               task.device, task.prep.n_train)
        prog = task.prog
        if task.rank == 0 and not task.cfg.quiet:
            at = f"epoch {prog.epoch}" + (f", {prog.done} samples in" if prog.done else "")
            print(f"resuming {run_dir} from its checkpoint ({at}; step {prog.global_step})", file=sys.stderr)
        if task.unit.ema is not None:
            task.unit.ema.load_state_dict(ckpt["ema"])
        load_callback_states(callbacks, ckpt.get("callbacks"))
    task.wrap()
    if ckpt is not None:  # after DDP, which sets every rank's buffers to rank 0's
        task.model.load_state_dict(ckpt["buffers"][task.rank % len(ckpt["buffers"])], strict=False)


def _announce(task: FinetuneTask, trainable: int) -> None:
    cfg, prep = task.cfg, task.prep
    if task.rank == 0 and not cfg.quiet:
        shown = f"a stream of {len(prep.stream.shards)} shards" if prep.stream else len(prep.train_s)
        print(f"{cfg.dataset}: train {shown}, val {len(prep.val_s)}, test {len(prep.test_s)}; encoders "
              f"{cfg.encoders} ({'LoRA' if cfg.lora else 'frozen' if cfg.freeze_encoders else 'full'}, "
              + (f"stores {cfg.stores}, " if cfg.stores else "") +
              f"{trainable:,} trainable encoder parameters); head {cfg.head}; {task.world} process(es) on "
              f"{task.device}; select val {task.sel_task}:{task.metric}", file=sys.stderr)


def _final_metrics(task: FinetuneTask) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of the chosen epoch on val and test, and per source dataset (several datasets)."""
    prep = task.prep
    metrics: dict[str, Any] = {}
    by_source: dict[str, dict[str, Any]] = {}  # split -> source dataset -> task -> metrics
    for split, ss in (("val", prep.val_s), ("test", prep.test_s)):
        if ss:
            ids, lg = evaluate(task.model, ss, task.cfg, task.tasks, task.device, desc=split)
            lg = adjust_logits(lg, task.offsets)
            metrics[split], per_source = rows_metrics(ids, lg, prep.by_id, prep.ds.labels.tasks, bool(prep.srcs))
            if prep.srcs:
                by_source[split] = per_source
    warn_failed_checks(metrics)
    return metrics, by_source


def _train_stats(task: FinetuneTask, trainable_total: tuple[int, int]) -> dict[str, Any]:
    prog, cfg, contrastive = task.prog, task.cfg, task.model.contrastive
    stats = {"trainable_params": trainable_total[0], "total_params": trainable_total[1],
             "samples_per_s": prog.samples / prog.train_seconds if prog.train_seconds else None,
             "train_seconds": prog.train_seconds, "samples": prog.samples, "world_size": task.world,
             "device": str(task.device), **_peak_memory(task.device)}
    if task.prep.stream is not None:
        stats["stream_skipped"] = task.prep.stream.skipped
    if contrastive is not None and task.model.pair is not None:
        stats["contrastive"] = {
            "weight": cfg.contrastive_weight, "classes": cfg.contrastive_classes, "modalities": list(task.model.pair),
            "scale": float(contrastive.scale.detach()),  # exp(logit_scale) of the chosen epoch
            "loss": [c.get("train_contrastive") for c in task.unit.curves]}
    return stats


def _run_config(task: FinetuneTask, select: dict[str, Any], best_epoch: int, trainable: int,
                train_stats: dict[str, Any]) -> dict[str, Any]:
    """config.json: the config and what it resolved to."""
    cfg, prep, model, cached = task.cfg, task.prep, task.model, task.prep.cached
    train_s, val_s, test_s = prep.train_s, prep.val_s, prep.test_s
    return {**asdict(cfg), "resolved": {
        "device": str(task.device), "world_size": task.world, "head_hparams": model.head.hparams,
        "labels": prep.ds.labels.to_json(), "specs": {m: e.spec for m, e in model.encoders.items()},
        "stores": {f"{m}/{n}": str(cached.readers[m].attrs.get("spec_hash", "")) for m, n in cfg.stores.items()}
        if cached is not None else {},
        # Each store's full spec and dtype: prediction rebuilds its extractor without the training stores.
        "store_specs": {f"{m}/{n}": {"spec": cached.readers[m].spec,
                                     "dtype": str(cached.readers[m].attrs.get("dtype", "float32"))}
                        for m, n in cfg.stores.items()} if cached is not None else {},
        "context_from": prep.context_from, "logit_adjust": {"tau": task.tau, "offsets": task.offsets},
        "rows": {"train": len(train_s), "val": len(val_s), "test": len(test_s)}, "select": select,
        **({"epoch_rows": len(prep.pool), "sources": {n: {sp: sum(s.source == n for s in ss) for sp, ss in
                                                          (("train", train_s), ("val", val_s), ("test", test_s))}
                                                      for n in prep.srcs}} if prep.srcs else {}),
        "best_epoch": best_epoch, "n_params": sum(p.numel() for p in model.head.parameters()),
        "trainable_encoder_params": trainable,
        # The layers each encoder's LoRA adapted, so `finetuned:RUN` rebuilds them whatever the defaults become.
        **({"lora_targets": {m: list(cfg.lora_targets or LORA_TARGETS.get(str(e.family), []))
                             for m, e in model.encoders.items()}} if cfg.lora else {}),
        "train": train_stats}}


def _write_result(task: FinetuneTask, run_dir: Path, t0: float, trainable: int,
                  trainable_total: tuple[int, int]) -> RunResult:
    """Rank 0: the chosen epoch's weights evaluated, the run folder written whole over its checkpoints, the run
    tracked."""
    cfg, model = task.cfg, task.model
    best_epoch, best_value, best_state = task.unit.selector.result()
    model.load_state_dict(best_state, strict=False)
    metrics, by_source = _final_metrics(task)
    select = {"task": task.sel_task, "metric": task.metric, "value": best_value,
              **({"source": task.sel_source} if task.sel_source else {})}
    train_stats = _train_stats(task, trainable_total)
    result = RunResult(run_dir=None, metrics=metrics, best_epoch=best_epoch, curves=task.unit.curves,
                       config=_run_config(task, select, best_epoch, trainable, train_stats), head=model.head,
                       seconds=time.perf_counter() - t0, select=select, fit_seconds=task.prog.fit_seconds,
                       by_source=by_source)
    # Only encoder state that training changed (LoRA adapters or the full towers, and their BatchNorm
    # statistics): the rest is the public preset named in `config.json`.
    keys = set(task.state_keys)
    enc_state = {k.removeprefix("encoders."): v for k, v in model.state_dict().items()
                 if k.startswith("encoders.") and k in keys}
    # Written whole beside the folder holding the checkpoints, then renamed over it (`mmcache.runfolder`); the
    # trained encoders' sha256 goes into config.json, so a file replaced since is refused when loading the run.
    result.run_dir = write_run(run_dir, result, task.prep.ds.labels.tasks, cfg.dataset, criterion=task.crit,
                               encoders=enc_state, metrics_extra={"train": train_stats})
    if by_source and not cfg.quiet:
        for split, per in by_source.items():
            for n, m in per.items():
                got = m.get(task.sel_task, {})
                print(f"{split} {n}: {task.sel_task} {task.metric} {got.get(task.metric, float('nan')):.4f} "
                      f"(n={got.get('n', 0)})", file=sys.stderr)
    remove_checkpoints(run_dir)  # the run folder now holds the result
    if cfg.track:
        from mmcache.tracking import track

        tags = {"kind": "finetune", "dataset": cfg.dataset, "seed": str(cfg.seed)}
        track(cfg.track, cfg.dataset, cfg.runs_dir, [(run_dir.name, result, tags)])
    return result


def _finetune(cfg: FinetuneConfig) -> RunResult | None:
    t0 = time.perf_counter()
    rank, world, local_rank = init_distributed()
    check_config(cfg)
    init = read_head_run(cfg.init_head) if cfg.init_head else None
    head_name: str = cfg.head or (init["name"] if init else "linear")
    if init is not None:
        check_init_head_name(init, head_name)
        if init["finetuned"] and rank == 0 and not cfg.quiet:
            print(f"warning: --init-head {init['path']} is a `finetune run`: its head was trained on its own "
                  "fine-tuned encoders' features, and these encoders start from their presets", file=sys.stderr)
    cfg = replace(cfg, head=head_name, head_hparams={**(init["hparams"] if init else {}), **cfg.head_hparams})
    HEADS.get(head_name)  # an unknown head is refused before any data is read
    run_dir, ckpt_path = resolve_run_dir(cfg)
    if ckpt_path is None and not cfg.run_name and rank == 0 and not cfg.quiet:
        print(f"run folder {run_dir}; if the run stops, continue it with --run-name {run_dir.name}", file=sys.stderr)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    if ckpt is not None:
        check_resume_config(ckpt["config"], cfg, ckpt_path)  # type: ignore[arg-type]
    device = torch.device(pick_device(cfg.device) if world == 1 or not torch.cuda.is_available()
                          else f"cuda:{local_rank}")
    if device.type == "cuda" and world > 1:
        torch.cuda.set_device(device)
    seed_everything(cfg.seed)
    prep = _prepare(cfg, world, rank)
    encoders, trainable = _build_encoders(cfg, prep)
    model = _build_model(cfg, prep, encoders, init, rank).to(device)
    task = FinetuneTask(cfg, prep, model, device, world, rank)
    checkpoints = Checkpoints(task, run_dir)
    callbacks: list[Callback] = [checkpoints]
    _resume(task, ckpt, run_dir, callbacks)
    n_total = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in task.crit.parameters())
    n_trainable = sum(p.numel() for p in task.clip_params)
    _announce(task, trainable)
    fit(task, cfg.epochs, start=task.prog.epoch, callbacks=callbacks)
    result = _write_result(task, run_dir, t0, trainable, (n_trainable, n_total)) if rank == 0 else None
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result


def _restore(ckpt: dict[str, Any], model: LiveModel, crit: nn.Module, opt: torch.optim.Optimizer, sched: Schedule,
             selector: Selector, state_keys: list[str], cfg: FinetuneConfig, world: int, rank: int,
             device: torch.device, n_train: int) -> tuple[Progress, list[dict[str, Any]]]:
    """Load a checkpoint into the freshly built model, criterion, optimizer, schedule and selector; set this
    rank's random streams (its buffers are loaded once DDP wraps the model). On another number of processes
    the schedule is rebuilt at the same progress (and rank r takes saved rank r mod the saved count's streams)."""
    weights = ckpt["weights"]
    missing = [k for k in state_keys if k not in weights]
    if missing:
        raise MMCacheError(f"the checkpoint lacks {len(missing)} trained weights (e.g. {missing[0]}); it does not "
                           "fit this model: pass --overwrite to start the run over")
    model.load_state_dict(weights, strict=False)
    crit.load_state_dict(ckpt["criterion"])
    saved_world = int(ckpt["world"])
    prog = Progress(**ckpt["progress"])
    if saved_world == world:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["schedule"])
    else:
        # The planned number of steps depends on the process count: continue the schedule at the same share.
        k = round(prog.global_step * _steps_per_epoch(n_train, cfg, world) / _steps_per_epoch(n_train, cfg, saved_world))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stepping a scheduler before its optimizer, on purpose
            for _ in range(k):
                sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        opt.load_state_dict(ckpt["optimizer"])
        for g, lr in zip(opt.param_groups, lrs, strict=True):
            g["lr"] = lr
        if rank == 0 and not cfg.quiet:
            print(f"note: the checkpoint was written by {saved_world} process(es), this run has {world}; the "
                  f"learning-rate schedule continues at step {k} of the new plan", file=sys.stderr)
    sel = ckpt["selector"]
    selector.best_value, selector.best_epoch = sel["best_value"], int(sel["best_epoch"])
    selector.stale, selector.stopped = int(sel["stale"]), bool(sel["stopped"])
    selector.best_state = dict(ckpt["best_state"]) or None
    rngs = ckpt["rng"]
    set_rng_state(rngs[rank % len(rngs)], device)
    return prog, list(ckpt["curves"])
