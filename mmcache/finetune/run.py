"""End-to-end fine-tuning: the live extractors (contract 2) feed the very same heads (contract 4).

The extractors that `mmcache extract` runs frozen are trained here with gradients, either
fully or through LoRA adapters (peft), together with a head built by `build_head`. Raw inputs
are decoded and preprocessed in DataLoader workers exactly as for extraction. Under `torchrun`
the model is wrapped in DistributedDataParallel and each rank trains on its share of the
training split; rank 0 evaluates and writes the run folder, which has the same files as a
`heads train` run plus the encoder weights that changed (`encoders.safetensors`).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from mmcache.data.base import Dataset, Sample, load_dataset
from mmcache.engine import (
    IGNORE,
    RunResult,
    Schedule,
    Selector,
    curve_row,
    make_optimizer,
    new_run_dir,
    param_groups,
    parse_select,
    val_metrics,
    warn_failed_checks,
    write_run,
)
from mmcache.errors import MMCacheError
from mmcache.extract.base import Extractor, build_extractor
from mmcache.extract.runner import BatchCollate, DecodeDataset, Request, merge_decode_options, parse_requests, to_device
from mmcache.heads.base import HEADS, Head, build_head
from mmcache.heads.losses import build_criterion
from mmcache.heads.metrics import classification_metrics
from mmcache.utils import pick_device, seed_everything

# Linear layers LoRA adapts by default, per extractor family (attention output projections for
# CLIP as in the content-moderation reference; query/value for BERT-style encoders).
LORA_TARGETS: dict[str, list[str]] = {
    "clip": ["attn"],  # open_clip blocks' nn.MultiheadAttention (peft adapts its in/out projections)
    "roberta": ["query", "value"],
    "resnet": ["fc"],
}


def encoder_request(modality: str, value: str) -> Request:
    """`--image PRESET` or `NAME=PRESET[key=value,...]`, parsed as `mmcache extract` parses a store."""
    requests = parse_requests(modality, value)
    if len(requests) != 1:
        raise MMCacheError(f"--{modality} {value!r}: fine-tuning takes one encoder per modality")
    return requests[0]


def build_encoder(modality: str, value: str) -> Extractor:
    """The live encoder of `--image PRESET` or `NAME=PRESET[key=value,...]`."""
    r = encoder_request(modality, value)
    return build_extractor(r.preset, modality, **r.overrides)


@dataclass
class FinetuneConfig:
    """Everything that determines a fine-tuning run (written to the run folder as config.json)."""

    dataset: str
    encoders: dict[str, str]  # modality -> extractor preset, e.g. {"image": "clip", "text": "rob=roberta[pooling=cls]"}
    data_dir: str | None = None
    runs_dir: str = "runs"
    head: str = "linear"
    head_hparams: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] | None = None
    loss: str = "ce"
    loss_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-5  # encoder (or LoRA) learning rate
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the optimizer steps warming the learning rates up (then cosine decay)
    early_stopping: int = 0  # patience in epochs without a better validation metric; 0 = off
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None = LORA_TARGETS of the family
    freeze_encoders: bool = False  # train the head only, on live features
    grad_accum: int = 1
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    num_workers: int = 2
    limit: int | None = None  # first N samples per split (smoke runs)
    select_metric: str | None = None  # "[task:]metric"; None = the dataset's metric on the primary task
    seed: int = 0
    device: str | None = None
    run_name: str | None = None
    overwrite: bool = False
    dataset_options: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False


class LiveModel(nn.Module):
    """Encoders + head: raw batches per modality -> {task: logits}."""

    def __init__(self, encoders: dict[str, Extractor], head: Head) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.head = head

    def forward(self, batches: dict[str, Any]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Encode each modality's batch, then classify with the head."""
        feats = {m: {k: v.float() for k, v in self.encoders[m](b).items()} for m, b in batches.items()}
        return self.head(feats)


def _dist() -> tuple[int, int, int]:
    """(rank, world size, local rank), initialising the process group under torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _subset(ds: Dataset, split: str, limit: int | None) -> list[Sample]:
    samples = [s for s in ds.split(split) if s.labels]
    return samples[:limit] if limit else samples


def _loader(samples: list[Sample], extractors: list[Extractor], cfg: FinetuneConfig, shuffle: bool,
            rank: int = 0, world: int = 1, epoch: int = 0) -> DataLoader:
    if shuffle:
        g = np.random.default_rng([cfg.seed, epoch])
        order = g.permutation(len(samples))
        samples = [samples[i] for i in order[rank::world]]  # each rank its own slice, no padded duplicates
    needs = [tuple(range(len(extractors)))] * len(samples)
    ds = DecodeDataset(samples, needs, extractors, merge_decode_options(extractors))
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                      collate_fn=BatchCollate(extractors), pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)


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
            data = _index(data, rows)
        out[m] = to_device(data, device)
    return ids, out


def _index(data: Any, rows: torch.Tensor) -> Any:
    if isinstance(data, torch.Tensor):
        return data[rows]
    if isinstance(data, dict):
        return {k: _index(v, rows) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_index(v, rows) for v in data)
    return data


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
    present = {n.rsplit(".", 1)[-1] for n, m in enc.named_modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))}
    if not set(targets) & present:
        raise MMCacheError(f"--lora-targets {targets} match no Linear / attention layer of {enc.preset!r}; "
                           f"its layer names include {sorted(present)[:12]}")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets)
    inject_adapter_in_model(lcfg, enc)
    n = 0
    for name, p in enc.named_parameters():
        p.requires_grad = "lora_" in name
        n += p.numel() if p.requires_grad else 0
    return n


@torch.no_grad()
def evaluate(model: LiveModel, samples: list[Sample], cfg: FinetuneConfig, tasks: list[str],
             device: torch.device, desc: str = "eval") -> tuple[list[str], dict[str, np.ndarray]]:
    """Logits of `samples` (rows that fail to decode are left out), as numpy per task."""
    model.eval()
    mods = list(model.encoders)
    ids_all: list[str] = []
    outs: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    loader = _loader(samples, cast("list[Extractor]", list(model.encoders.values())), cfg, shuffle=False)
    for batch in tqdm(loader, desc=desc, leave=False, disable=cfg.quiet):
        got = _aligned(batch, mods, device)
        if got is None:
            continue
        ids, inputs = got
        with _autocast(device, cfg.amp):
            logits = model(inputs)
        ids_all += ids
        for t in tasks:
            outs[t].append(logits[t].float().cpu().numpy())
    return ids_all, {t: np.concatenate(v) if v else np.zeros((0, 0)) for t, v in outs.items()}


def _autocast(device: torch.device, amp: bool) -> Any:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _metrics(ids: list[str], logits: dict[str, np.ndarray], by_id: dict[str, Sample],
             labels: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    out = {}
    for t, lg in logits.items():
        y = np.array([by_id[i].labels.get(t, IGNORE) for i in ids])
        keep = y != IGNORE
        if keep.any():
            out[t] = classification_metrics(y[keep], lg[keep], labels[t])
    return out


def finetune(cfg: FinetuneConfig) -> RunResult | None:
    """Fine-tune `cfg.encoders` with `cfg.head` end to end on the shared engine (optimizer, schedule, selection,
    early stopping, run folder); returns the same result type as `heads train` on rank 0 (None on other ranks)."""
    t0 = time.perf_counter()
    rank, world, local_rank = _dist()
    HEADS.get(cfg.head)  # an unknown head is refused before any data is read
    if not cfg.encoders:
        raise MMCacheError("name at least one encoder, e.g. --image clip --text clip")
    run_dir = new_run_dir(cfg.runs_dir, cfg.dataset, cfg.run_name,
                          # Each encoder's NAME, never its options: a weights path must not nest folders.
                          ["finetune", cfg.head, "+".join(f"{m}-{encoder_request(m, p).name}"
                                                          for m, p in cfg.encoders.items())], cfg.overwrite)
    device = torch.device(pick_device(cfg.device) if world == 1 or not torch.cuda.is_available()
                          else f"cuda:{local_rank}")
    seed_everything(cfg.seed)
    ds = load_dataset(cfg.dataset, cfg.data_dir, **cfg.dataset_options)
    tasks = cfg.tasks or list(ds.labels.tasks)
    unknown = [t for t in tasks if t not in ds.labels.tasks]
    if unknown:
        raise MMCacheError(f"unknown task(s) {unknown}; {cfg.dataset!r} has {list(ds.labels.tasks)}")
    train_s = _subset(ds, "train", cfg.limit)
    val_s = _subset(ds, "val", cfg.limit) or _subset(ds, "test", cfg.limit)
    test_s = _subset(ds, "test", cfg.limit)
    if not train_s or not val_s:
        raise MMCacheError(f"{cfg.dataset!r} needs labelled train and val (or test) rows to fine-tune")
    by_id = ds.by_id()

    encoders = {m: build_encoder(m, p) for m, p in cfg.encoders.items()}
    trainable = 0
    for enc in encoders.values():
        if cfg.freeze_encoders:
            enc.requires_grad_(False)
        elif cfg.lora:
            trainable += apply_lora(enc, cfg)
        else:
            enc.requires_grad_(True)
            trainable += sum(p.numel() for p in enc.parameters())
    mods = list(encoders)
    # The head's input shapes come from one real batch through the encoders.
    probe = next(iter(_loader(val_s[: min(len(val_s), 4)], list(encoders.values()), cfg, shuffle=False)))
    got = _aligned(probe, mods, torch.device("cpu"))
    if got is None:
        raise MMCacheError(f"the first validation rows of {cfg.dataset!r} could not be decoded; check the data")
    with torch.no_grad():
        feats = {m: encoders[m](b) for m, b in got[1].items()}
    keys = getattr(HEADS[cfg.head], "uses", None)
    inputs = {m: {k: tuple(v.shape[1:]) for k, v in f.items() if keys is None or k in keys} for m, f in feats.items()}
    n_classes = {t: len(ds.labels.tasks[t]) for t in tasks}
    seed_everything(cfg.seed)
    head = build_head(cfg.head, inputs, n_classes, cfg.head_hparams)
    model = LiveModel(encoders, head).to(device)
    counts = {t: torch.bincount(torch.tensor([s.labels[t] for s in train_s if t in s.labels], dtype=torch.long),
                                minlength=n) for t, n in n_classes.items()}
    crit = build_criterion(cfg.loss, n_classes, class_counts=counts, **cfg.loss_options).to(device)
    # Head (and learned loss weights) at head_lr, trained encoder weights at lr: the engine's parameter groups.
    opt = make_optimizer("adamw", param_groups(head, crit, model.encoders, encoder_lr=cfg.lr), cfg.head_lr,
                         cfg.weight_decay)
    steps = cfg.epochs * -(-len(train_s) // (cfg.batch_size * world * cfg.grad_accum))
    sel_task, metric = parse_select(cfg.select_metric, tasks, ds.labels.metric)
    selector = Selector(metric, cfg.early_stopping)
    sched = Schedule("cosine", opt, max(1, steps), int(cfg.warmup * steps), selector.mode)
    net: nn.Module = model
    if world > 1:
        # Each CLIP tower holds the other tower's unused parameters only if present; be permissive.
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    if rank == 0 and not cfg.quiet:
        print(f"{cfg.dataset}: train {len(train_s)}, val {len(val_s)}, test {len(test_s)}; encoders "
              f"{cfg.encoders} ({'LoRA' if cfg.lora else 'frozen' if cfg.freeze_encoders else 'full'}, "
              f"{trainable:,} trainable encoder parameters); head {cfg.head}; {world} process(es) on {device}; "
              f"select val {sel_task}:{metric}", file=sys.stderr)
    curves: list[dict[str, Any]] = []
    t_fit = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        for encoder in model.encoders.values():
            if cfg.freeze_encoders:
                encoder.eval()  # frozen encoders keep their normalisation statistics
        loader = _loader(train_s, list(encoders.values()), cfg, shuffle=True, rank=rank, world=world, epoch=epoch)
        total, nb = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=cfg.quiet or rank != 0)
        opt.zero_grad(set_to_none=True)
        pending = 0
        # Ranks may see different numbers of batches (uneven slices, undecodable rows): DDP's join
        # lets a rank that runs out early keep answering the others' all-reduces.
        with net.join() if isinstance(net, DDP) else nullcontext():
            for batch in bar:
                got = _aligned(batch, mods, device)
                if got is None:
                    continue
                ids, inputs = got
                with _autocast(device, cfg.amp):
                    logits = net(inputs)
                loss, _ = crit(logits, _targets(ids, by_id, tasks, device), None, epoch - 1)
                (loss / cfg.grad_accum).backward()
                pending += 1
                if pending == cfg.grad_accum:
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    pending = 0
                total += float(loss.detach())
                nb += 1
                bar.set_postfix(loss=f"{total / nb:.4f}")
        if pending:  # the epoch's last, partial accumulation still counts
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        stop = False
        if rank == 0:
            ids, lg = evaluate(model, val_s, cfg, tasks, device, desc="val")
            y = {t: torch.tensor([by_id[i].labels.get(t, IGNORE) for i in ids], dtype=torch.long) for t in tasks}
            logits_t = {t: torch.from_numpy(lg[t]).float() for t in tasks}
            vm = val_metrics(y[sel_task], logits_t[sel_task], metric) if ids else {}
            if ids:
                with torch.no_grad():
                    vm["loss"] = float(crit({t: v.to(device) for t, v in logits_t.items()},
                                            {t: v.to(device) for t, v in y.items()}, None, epoch - 1)[0])
            value = vm.get(metric, float("nan"))
            curves.append(curve_row(epoch, total / max(1, nb), vm, opt.param_groups[0]["lr"],
                                    time.perf_counter() - t_epoch))
            if not cfg.quiet:
                print(f"epoch {epoch}: train loss {total / max(1, nb):.4f}, val {metric} {value:.4f}", file=sys.stderr)
            selector.update(epoch, value, lambda: {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                                                   if k.startswith("head.") or _trainable(model, k)})
            sched.epoch_end(value)
            stop = selector.stopped
        if world > 1:  # every rank stops together
            import torch.distributed as dist

            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = bool(flag[0])
        if stop:
            if rank == 0 and not cfg.quiet:
                print(f"early stop after epoch {epoch}: no better val {metric} for {selector.stale} epochs",
                      file=sys.stderr)
            break
    fit_seconds = time.perf_counter() - t_fit
    result: RunResult | None = None
    if rank == 0:
        best_epoch, best_value, best_state = selector.result()
        model.load_state_dict(best_state, strict=False)
        metrics = {}
        for split, ss in (("val", val_s), ("test", test_s)):
            if ss:
                ids, lg = evaluate(model, ss, cfg, tasks, device, desc=split)
                metrics[split] = _metrics(ids, lg, by_id, ds.labels.tasks)
        warn_failed_checks(metrics)
        n_params = sum(p.numel() for p in model.head.parameters())
        select = {"task": sel_task, "metric": metric, "value": best_value}
        config = {**asdict(cfg), "resolved": {
            "device": str(device), "world_size": world, "head_hparams": model.head.hparams,
            "labels": ds.labels.to_json(), "specs": {m: e.spec for m, e in model.encoders.items()},
            "rows": {"train": len(train_s), "val": len(val_s), "test": len(test_s)}, "select": select,
            "best_epoch": best_epoch, "n_params": n_params, "trainable_encoder_params": trainable}}
        result = RunResult(run_dir=None, metrics=metrics, best_epoch=best_epoch, curves=curves, config=config,
                           head=model.head, seconds=time.perf_counter() - t0, select=select, fit_seconds=fit_seconds)
        # Only encoder weights that were trained (LoRA adapters or the full towers): the rest is the public preset.
        enc_state = {k: v for k, v in model.encoders.state_dict().items() if _trainable(model.encoders, k)}
        result.run_dir = write_run(run_dir, result, ds.labels.tasks, cfg.dataset, criterion=crit, encoders=enc_state)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result


def _trainable(model: nn.Module, key: str) -> bool:
    params = dict(model.named_parameters())
    return key in params and params[key].requires_grad
