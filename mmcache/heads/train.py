"""The fast trainer: heads on cached tensors, batched by index in memory, with a run folder per run.

Stores are loaded once (on the GPU when there is one); each epoch draws one permutation and
slices it into batches, so there is no DataLoader and no per-sample Python. The best epoch is
chosen on the validation split; the run folder holds the safetensors checkpoint, the head's
JSON config, the run config, metrics, versions, per-epoch curves and confusion matrices.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from tqdm import tqdm

from mmcache.errors import MMCacheError
from mmcache.heads.base import HEADS, Head, build_head
from mmcache.heads.data import IGNORE, CachedData, load_cached
from mmcache.heads.losses import Criterion, build_criterion
from mmcache.heads.metrics import (
    LOWER_IS_BETTER,
    SELECT_METRICS,
    auroc,
    better,
    classification_metrics,
    failed_checks,
    softmax,
)
from mmcache.utils import pick_device, seed_everything, versions, write_json

if TYPE_CHECKING:
    from mmcache.heads.linear import LinearHead

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "plateau", "none")
SOLVERS = ("adam", "lbfgs")
# L2 penalties (on the mean loss) tried by the lbfgs probe, strongest first so each fit warm-starts the next.
LBFGS_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)
EVAL_BATCH = 8192
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}  # report order; other split names follow, sorted


@dataclass
class TrainConfig:
    """Everything that determines a training run (written to the run folder as config.json)."""

    dataset: str
    modalities: dict[str, str]  # modality -> store name, e.g. {"image": "clip", "text": "clip"}
    cache_dir: str = "cache"
    runs_dir: str = "runs"
    head: str = "linear"
    head_hparams: dict[str, Any] = field(default_factory=dict)  # D, dropout, ablation, l2norm, ...
    tasks: list[str] | None = None  # None = every task of the manifest's label space
    teacher: str | None = None  # store name under cache/<dataset>/teacher/
    loss: str = "ce"
    loss_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "cosine"
    class_weights: bool = False
    label_smoothing: float = 0.0
    oversample: bool = False
    early_stopping: int = 0  # patience in epochs without a better validation metric; 0 = off
    select_metric: str | None = None  # "[task:]metric"; None = the dataset's metric on the primary task
    seed: int = 0
    device: str | None = None
    threads: int | None = None  # torch intra-op CPU threads (None: torch's default)
    solver: str = "adam"  # "adam": minibatch training with `optimizer`; "lbfgs": full-batch linear probe
    lbfgs_grid: list[float] | None = None  # L2 penalties tried by the lbfgs solver (None = LBFGS_GRID)
    lbfgs_max_iter: int = 500
    lbfgs_tol: float = 1e-4  # max |gradient| at convergence, as scikit-learn's lbfgs `tol`
    val_fraction: float = 0.1  # carved from train when the manifest has no val split
    run_name: str | None = None
    overwrite: bool = False
    save: bool = True  # False: train and evaluate without writing a run folder
    quiet: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (inverse of `TrainConfig(**obj)`)."""
        return asdict(self)


@dataclass
class RunResult:
    """What `train` returns: the run folder, metrics per split and task, the chosen epoch, the curves."""

    run_dir: Path | None
    metrics: dict[str, dict[str, dict[str, Any]]]  # split -> task -> metric -> value
    best_epoch: int
    curves: list[dict[str, Any]]
    config: dict[str, Any]
    head: Head
    seconds: float  # the whole call: loading the stores, fitting, evaluating, writing
    select: dict[str, Any] = field(default_factory=dict)  # task, metric, value (+ l2 for lbfgs)
    fit_seconds: float = 0.0  # fitting alone (epochs with their validation, or the lbfgs grid)


def _log(cfg: TrainConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, file=sys.stderr)


def _validate(cfg: TrainConfig) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        raise MMCacheError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise MMCacheError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if cfg.solver not in SOLVERS:
        raise MMCacheError(f"unknown solver {cfg.solver!r}; choose one of {', '.join(SOLVERS)}")
    if cfg.solver == "lbfgs" and cfg.head != "linear":
        raise MMCacheError(f"--solver lbfgs fits the linear probe only (--head linear), not {cfg.head!r}")
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise MMCacheError(f"--epochs must be >= 1 and --batch-size >= 2 (got {cfg.epochs}, {cfg.batch_size})")


def parse_select(spec: str | None, tasks: list[str], default_metric: str) -> tuple[str, str]:
    """`[task:]metric` -> (task, metric); the task defaults to the primary (first) one."""
    spec = spec or default_metric
    task, _, metric = spec.rpartition(":")
    task = task or tasks[0]
    if task not in tasks:
        raise MMCacheError(f"--select {spec!r}: unknown task {task!r}; tasks are {tasks}")
    if metric not in SELECT_METRICS:
        raise MMCacheError(f"--select {spec!r}: unknown metric {metric!r}; choose one of {', '.join(SELECT_METRICS)}")
    return task, metric


def quick_metrics(y: torch.Tensor, logits: torch.Tensor, metric: str) -> dict[str, float]:
    """Per-epoch validation metrics: accuracy and macro F1 from a confusion matrix (no sklearn per epoch),
    plus `metric` itself when it needs more (AUROC, top-2)."""
    keep = y != IGNORE
    y, logits = y[keep], logits[keep].float()
    n, c = logits.shape
    out: dict[str, float] = {}
    if n == 0:
        return out
    pred = logits.argmax(1)
    cm = torch.bincount(y * c + pred, minlength=c * c).reshape(c, c).double()
    tp = cm.diag()
    denom = cm.sum(0) + cm.sum(1)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    support = cm.sum(1)
    out["accuracy"] = float(tp.sum() / n)
    out["macro_f1"] = float(f1.mean())
    out["weighted_f1"] = float((f1 * support).sum() / n)
    if metric == "top2_accuracy" and c > 2:
        out[metric] = float((logits.topk(2, dim=1).indices == y[:, None]).any(1).double().mean())
    elif metric == "auroc":
        v = auroc(y.cpu().numpy(), softmax(logits.cpu().numpy()))
        out[metric] = float("nan") if v is None else v
    return out


@torch.no_grad()
def predict_logits(head: Head, data: CachedData, idx: torch.Tensor, batch: int = EVAL_BATCH) -> dict[str, torch.Tensor]:
    """Logits per task for rows `idx`, in eval mode, in large chunks."""
    was = head.training
    head.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(idx), batch):
        out = head(data.batch(idx[s:s + batch]))
        for t in data.tasks:
            chunks.setdefault(t, []).append(out[t].float())
    head.train(was)
    n = len(idx)
    return {t: torch.cat(chunks[t]) if chunks.get(t) else torch.zeros(n, c) for t, c in data.tasks.items()}


def _eval_loss(crit: Criterion, logits: dict[str, torch.Tensor], data: CachedData, idx: torch.Tensor,
               epoch: int) -> float:
    with torch.no_grad():
        targets = {t: data.targets[t][idx] for t in data.tasks}
        teacher = data.teacher[idx] if data.teacher is not None else None
        loss, _ = crit(logits, targets, teacher, epoch)
    return float(loss)


def _make_optimizer(cfg: TrainConfig, params: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _fit_minibatch(cfg: TrainConfig, head: Head, crit: Criterion, data: CachedData, sel_task: str,
                   sel_metric: str) -> tuple[list[dict[str, Any]], int, float]:
    """Minibatch training; returns curves, best epoch (1-based) and its validation metric value."""
    device = data.targets[sel_task].device
    # Learned loss weights (log-variances) are not decayed toward 0: that would bias the weighting.
    params: list[dict[str, Any]] = [{"params": [p for p in head.parameters() if p.requires_grad]},
                                    {"params": [p for p in crit.parameters() if p.requires_grad], "weight_decay": 0.0}]
    opt = _make_optimizer(cfg, [g for g in params if g["params"]])
    mode: Literal["min", "max"] = "min" if sel_metric in LOWER_IS_BETTER else "max"
    sched: Any = None
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    elif cfg.schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=3)

    train_idx = data.split_index["train"]
    labeled = torch.zeros(len(train_idx), dtype=torch.bool, device=device)
    for t in data.tasks:
        labeled |= data.targets[t][train_idx] != IGNORE
    train_idx = train_idx[labeled]  # rows without any label teach nothing
    val_idx = data.split_index["val"]
    n = len(train_idx)
    gen = torch.Generator().manual_seed(cfg.seed)
    weights = None
    if cfg.oversample:
        # Each row drawn with probability 1/count(its class in the selection task): classes come up equally often.
        y = data.targets[sel_task][train_idx].cpu()
        counts = torch.bincount(y[y != IGNORE], minlength=data.tasks[sel_task]).double()
        weights = torch.where(y != IGNORE, 1.0 / counts[y.clamp(min=0)].clamp(min=1), torch.zeros(n).double())
    teacher = data.teacher
    curves: list[dict[str, Any]] = []
    best_val: float | None = None
    best_epoch = 0
    best_state = copy.deepcopy(head.state_dict())
    stale = 0
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="ep", leave=False, disable=cfg.quiet)
    for epoch in bar:
        t0 = time.perf_counter()
        head.train()
        crit.train()
        order = torch.multinomial(weights, n, replacement=True, generator=gen) if weights is not None \
            else torch.randperm(n, generator=gen)
        order = train_idx[order.to(device)]
        total = torch.zeros((), device=device)
        steps = 0
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on one row
                continue
            logits = head(data.batch(idx))
            targets = {t: data.targets[t][idx] for t in data.tasks}
            loss, _ = crit(logits, targets, teacher[idx] if teacher is not None else None, epoch - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
        crit.eval()
        vlog = predict_logits(head, data, val_idx)
        vloss = _eval_loss(crit, vlog, data, val_idx, epoch - 1)
        vm = quick_metrics(data.targets[sel_task][val_idx], vlog[sel_task], sel_metric)
        vm["loss"] = vloss
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(total) / max(1, steps), "val_loss": vloss,
                               **{f"val_{k}": v for k, v in vm.items() if k != "loss"},
                               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        curves.append(row)
        value = vm.get(sel_metric, float("nan"))
        if not math.isnan(value) and better(sel_metric, value, best_val):
            best_val, best_epoch, stale = value, epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            stale += 1
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", **{f"val_{sel_metric}": f"{value:.4f}"})
        if sched is not None:
            if cfg.schedule == "plateau":
                sched.step(value)
            else:
                sched.step()
        if cfg.early_stopping and stale >= cfg.early_stopping:
            _log(cfg, f"early stop after epoch {epoch}: no better val {sel_metric} for {stale} epochs")
            break
    head.load_state_dict(best_state)
    if best_val is None:
        raise MMCacheError(f"validation {sel_metric} was undefined in every epoch (e.g. AUROC with one class "
                           "in the val split); choose another --select metric")
    return curves, best_epoch, best_val


def _lbfgs_closure(opt: torch.optim.Optimizer, crit: Criterion, clfs: torch.nn.ModuleDict, z: torch.Tensor,
                   targets: dict[str, torch.Tensor], teacher: torch.Tensor | None, weights: list[torch.Tensor],
                   lam: float, state: dict[str, Any]) -> Any:
    """The full-batch objective: the criterion's mean loss + lam/2 * ||W||^2 (biases unpenalised, as sklearn)."""

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss, _ = crit({t: c(z) for t, c in clfs.items()}, targets, teacher, 0)
        loss = loss + 0.5 * lam * sum((w * w).sum() for w in weights)
        loss.backward()
        state["loss"] = loss.detach()
        return loss

    return closure


def _fit_lbfgs(cfg: TrainConfig, head: Head, crit: Criterion, data: CachedData, sel_task: str,
               sel_metric: str) -> tuple[list[dict[str, Any]], int, float, float]:
    """Full-batch L-BFGS logistic regression, one fit per L2 penalty (warm-started, strongest first);
    keeps the penalty with the best validation metric. Returns curves, best index, its value, the penalty."""
    train_idx, val_idx = data.split_index["train"], data.split_index["val"]
    head.eval()
    probe = cast("LinearHead", head)  # train() allows the lbfgs solver with --head linear only
    with torch.no_grad():  # D=0: the fused features carry no parameters, so compute them once
        z_train = probe.fused(data.batch(train_idx))
        z_val = probe.fused(data.batch(val_idx))
    targets = {t: data.targets[t][train_idx] for t in data.tasks}
    teacher = data.teacher[train_idx] if data.teacher is not None else None
    clfs = probe.classifiers
    params = list(clfs.parameters())
    with torch.no_grad():  # start at zero, as scikit-learn does: the fit does not depend on the seed
        for p in params:
            p.zero_()
    weights = [cast(torch.Tensor, c.weight) for c in clfs.values()]  # each classifier is an nn.Linear
    grid = list(cfg.lbfgs_grid or LBFGS_GRID)
    curves: list[dict[str, Any]] = []
    best: tuple[float, int, float, dict[str, torch.Tensor]] | None = None
    crit.eval()
    for i, lam in enumerate(tqdm(grid, desc="lbfgs", unit="fit", leave=False, disable=cfg.quiet)):
        t0 = time.perf_counter()
        opt = torch.optim.LBFGS(params, lr=1, max_iter=cfg.lbfgs_max_iter, history_size=10,
                                tolerance_grad=cfg.lbfgs_tol, tolerance_change=1e-9, line_search_fn="strong_wolfe")
        state: dict[str, Any] = {}
        opt.step(_lbfgs_closure(opt, crit, clfs, z_train, targets, teacher, weights, lam, state))
        iters = int(opt.state[params[0]].get("n_iter", 0))
        with torch.no_grad():
            vlog = {t: c(z_val) for t, c in clfs.items()}
        vm = quick_metrics(data.targets[sel_task][val_idx], vlog[sel_task], sel_metric)
        vm["loss"] = _eval_loss(crit, vlog, data, val_idx, 0)
        value = vm.get(sel_metric, float("nan"))
        curves.append({"fit": i + 1, "l2": lam, "iters": iters, "train_loss": float(state["loss"]),
                       "val_loss": vm["loss"], **{f"val_{k}": v for k, v in vm.items() if k != "loss"},
                       "seconds": time.perf_counter() - t0})
        if not math.isnan(value) and (best is None or better(sel_metric, value, best[0])):
            best = (value, i + 1, lam, copy.deepcopy(head.state_dict()))
    if best is None:
        raise MMCacheError(f"validation {sel_metric} was undefined for every penalty; choose another --select metric")
    if len(grid) > 1 and best[2] in (grid[0], grid[-1]):
        _log(cfg, f"warning: the best L2 penalty {best[2]:g} is at the end of the grid {grid}; "
                  "extend it (--l2-grid) to be sure the optimum is inside")
    head.load_state_dict(best[3])
    return curves, best[1], best[0], best[2]


def _run_dir(cfg: TrainConfig) -> Path:
    base = Path(cfg.runs_dir) / cfg.dataset
    if cfg.run_name:
        d = base / cfg.run_name
        if d.exists() and any(d.iterdir()) and not cfg.overwrite:
            raise MMCacheError(f"run folder {d} already exists; choose another --run-name or pass --overwrite")
        return d
    parts = [cfg.head, "+".join(f"{m}-{s}" for m, s in cfg.modalities.items())]
    hp = cfg.head_hparams
    # Name the variants an ablation grid varies, so run folders tell them apart at a glance.
    if hp.get("modalities"):
        parts.append("use-" + "+".join(hp["modalities"]))
    elif hp.get("ablation"):
        parts.append(f"ablation{hp['ablation']}")
    if cfg.solver != "adam":
        parts.append(cfg.solver)
    stem = "_".join([*parts, time.strftime("%Y%m%d-%H%M%S")])
    d, k = base / stem, 1
    while d.exists():  # never overwrite a run silently
        k += 1
        d = base / f"{stem}-{k}"
    return d


def train(cfg: TrainConfig) -> RunResult:
    """Train `cfg.head` on the cached features of `cfg.dataset`; evaluate, write the run folder, return results."""
    t_start = time.perf_counter()
    _validate(cfg)
    run_dir = _run_dir(cfg) if cfg.save else None  # refuse an existing run folder before training, not after
    import mmcache.heads.builtin  # noqa: F401  (heads register on import)

    if cfg.head not in HEADS:
        raise MMCacheError(f"unknown head {cfg.head!r}; known heads: {', '.join(sorted(HEADS))}")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    if cfg.threads:
        # Small heads gain little from many threads, and on a shared CPU extra threads mostly wait.
        torch.set_num_threads(cfg.threads)
    keys = getattr(HEADS[cfg.head], "uses", None)
    data = load_cached(cfg.dataset, cfg.modalities, cfg.cache_dir, keys=keys, tasks=cfg.tasks, teacher=cfg.teacher,
                       device=device, val_fraction=cfg.val_fraction, seed=cfg.seed)
    task_names = list(data.tasks)
    sel_task, sel_metric = parse_select(cfg.select_metric, task_names, data.labels.metric)
    hparams = dict(cfg.head_hparams)
    if cfg.solver == "lbfgs":
        # The probe is a logistic regression on the (optionally L2-normalised) concatenated features.
        hparams.setdefault("D", 0)
        if hparams["D"] != 0:
            raise MMCacheError("--solver lbfgs fits a logistic regression on the features: leave --D unset (or 0)")
        hparams["dropout"] = 0.0
    seed_everything(cfg.seed)  # the head's initialisation does not depend on what loading consumed
    head = build_head(cfg.head, data.inputs, data.tasks, hparams).to(device)
    counts = data.class_counts("train")
    crit = build_criterion(cfg.loss, data.tasks, class_counts=counts, class_weights=cfg.class_weights,
                           label_smoothing=cfg.label_smoothing, **cfg.loss_options).to(device)
    n_params = sum(p.numel() for p in head.parameters())
    _log(cfg, f"{cfg.dataset}: {', '.join(f'{s} {len(i)}' for s, i in data.split_index.items())} rows; "
              f"head {cfg.head} ({n_params:,} parameters) on {device}; select val {sel_task}:{sel_metric}")
    t_fit = time.perf_counter()
    select: dict[str, Any] = {"task": sel_task, "metric": sel_metric}
    if cfg.solver == "lbfgs":
        curves, best_epoch, best_val, lam = _fit_lbfgs(cfg, head, crit, data, sel_task, sel_metric)
        select["l2"] = lam
        # The same objective in scikit-learn's terms: LogisticRegression(C=1 / (l2 * n_train)).
        select["sklearn_C"] = 1.0 / (lam * len(data.split_index["train"]))
    else:
        curves, best_epoch, best_val = _fit_minibatch(cfg, head, crit, data, sel_task, sel_metric)
    fit_seconds = time.perf_counter() - t_fit
    select["value"] = best_val

    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    order = sorted(data.split_index, key=lambda sp: (SPLIT_ORDER.get(sp, len(SPLIT_ORDER)), sp))
    for split in order:
        idx = data.split_index[split]
        logits = predict_logits(head, data, idx)
        per_task = {}
        for t in task_names:
            m = classification_metrics(data.targets[t][idx].cpu().numpy(), logits[t].cpu().numpy(),
                                       data.labels.tasks[t])
            if m["n"]:  # a hidden (unlabeled) split has no metrics
                per_task[t] = m
        if per_task:
            metrics[split] = per_task
    seconds = time.perf_counter() - t_start
    run_cfg = {**cfg.to_json(), "resolved": {
        "device": device, "head_hparams": head.hparams, "labels": data.labels.to_json(),
        "rows": {s: len(i) for s, i in data.split_index.items()}, "dropped": data.dropped,
        "stores": data.specs, "select": select, "best_epoch": best_epoch, "n_params": n_params}}
    result = RunResult(run_dir=None, metrics=metrics, best_epoch=best_epoch, curves=curves, config=run_cfg,
                       head=head, seconds=seconds, select=select, fit_seconds=fit_seconds)
    for split, per_task in metrics.items():
        for t, m in per_task.items():
            for msg in failed_checks(m):
                print(f"warning: {split} {t}: check failed: {msg}", file=sys.stderr)
    if cfg.save:
        result.run_dir = write_run(result, run_dir or _run_dir(cfg), cfg, data, crit)
    if not cfg.quiet:
        print(results_table(result))
        if result.run_dir is not None:
            print(f"run folder: {result.run_dir}")
    return result


def write_run(result: RunResult, d: Path, cfg: TrainConfig, data: CachedData, crit: Criterion) -> Path:
    """Write model.safetensors, head.json, config.json, metrics.json, versions.json, curves, confusion PNGs."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    head = result.head
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(d / "model.safetensors"), metadata={"head": json.dumps(head.config)})
    crit_state = {k: v.detach().contiguous().cpu() for k, v in crit.state_dict().items()}
    if crit_state:  # learned loss weights (e.g. uncertainty) and class weights
        save_file(crit_state, str(d / "criterion.safetensors"))
    write_json(d / "head.json", head.config)
    write_json(d / "config.json", result.config)
    write_json(d / "metrics.json", {"best_epoch": result.best_epoch, "select": result.select,
                                    "fit_seconds": result.fit_seconds, "seconds": result.seconds,
                                    "splits": result.metrics})
    write_json(d / "versions.json", versions())
    write_curves(d, result.curves)
    plot_confusions(d, result.metrics, data.labels.tasks, cfg.dataset)
    return d


def write_curves(d: Path, curves: list[dict[str, Any]]) -> None:
    """Per-epoch curves as curves.json and curves.csv (one row per epoch)."""
    write_json(d / "curves.json", curves)
    if curves:
        cols = list(dict.fromkeys(k for row in curves for k in row))
        with (d / "curves.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(curves)


def plot_confusions(d: Path, metrics: dict[str, dict[str, dict[str, Any]]], tasks: dict[str, list[str]],
                    dataset: str) -> None:
    """confusion_<task>.png of the test split (val when test has no labels), one per task."""
    split = "test" if metrics.get("test") else "val"
    for t, m in metrics.get(split, {}).items():
        plot_confusion(np.asarray(m["confusion_matrix"]), tasks[t], d / f"confusion_{t}.png",
                       f"{dataset} {split} {t}: acc {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")


def plot_confusion(cm: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """Save a confusion matrix (rows true, columns predicted) as a PNG with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.7 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] > top / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_table(result: RunResult) -> str:
    """A small text table: one row per split and task."""
    cols = ["accuracy", "macro_f1", "weighted_f1", "auroc", "top2_accuracy"]
    head = f"{'split':<6} {'task':<12} {'n':>6} " + " ".join(f"{c:>13}" for c in cols)
    lines = [head, "-" * len(head)]
    for split, per_task in result.metrics.items():
        for t, m in per_task.items():
            vals = " ".join(f"{m[c]:>13.4f}" if isinstance(m.get(c), float) else f"{'-':>13}" for c in cols)
            lines.append(f"{split:<6} {t:<12} {m['n']:>6} {vals}")
    sel = result.select
    extra = f", l2 {sel['l2']:g}" if "l2" in sel else ""
    lines.append(f"best {'fit' if 'l2' in sel else 'epoch'} {result.best_epoch}: val {sel['task']}:{sel['metric']} "
                 f"{sel['value']:.4f}{extra}; {result.seconds:.1f} s")
    return "\n".join(lines)


def load_run(run_dir: Path | str, device: str = "cpu") -> tuple[Head, dict[str, Any]]:
    """Rebuild a trained head from its run folder (head.json + model.safetensors; nothing unpickled)."""
    from safetensors.torch import load_file

    d = Path(run_dir)
    for name in ("head.json", "config.json", "model.safetensors"):
        if not (d / name).exists():
            raise MMCacheError(f"{d / name} not found; is {d} a run folder written by `heads train`?")
    hc = json.loads((d / "head.json").read_text())
    head = build_head(hc["name"], {m: {k: tuple(v) for k, v in a.items()} for m, a in hc["inputs"].items()},
                      hc["tasks"], hc["hparams"])
    head.load_state_dict(load_file(str(d / "model.safetensors"), device="cpu"))
    head.to(device).eval()
    return head, json.loads((d / "config.json").read_text())


def predict(run_dir: Path | str, dataset: str | None = None, split: str = "test", cache_dir: str | None = None,
            out: Path | str | None = None, device: str | None = None) -> Path:
    """Write predictions of a trained run on `split` (or "all") as CSV: id, label, predicted, p_<class>...

    With several tasks the columns are prefixed by the task (`<task>_label`, `<task>_p_<class>`).
    """
    device = pick_device(device)
    head, cfg = load_run(run_dir, device)
    if "modalities" not in cfg or "cache_dir" not in cfg:
        raise MMCacheError(f"{run_dir} is not a `heads train` run (a `finetune run` folder?): `heads predict` reads "
                           "cached features; predict with a run trained by `heads train`")
    dataset = dataset or cfg["dataset"]
    cache = cache_dir or cfg["cache_dir"]
    labels = cfg["resolved"]["labels"]["tasks"]
    data = load_cached(dataset, cfg["modalities"], cache, keys=getattr(type(head), "uses", None),
                       tasks=list(labels), device=device, seed=cfg["seed"], val_fraction=cfg["val_fraction"])
    for t, names in labels.items():
        if data.labels.tasks[t] != names:
            raise MMCacheError(f"dataset {dataset!r} has classes {data.labels.tasks[t]} for task {t!r}, the run was "
                               f"trained on {names}; predict with a run of the same label space")
    for tag, h in cfg["resolved"].get("stores", {}).items():
        if data.specs.get(tag) and h and data.specs[tag] != h:
            print(f"warning: store {tag} was rebuilt with another spec since training (hash {data.specs[tag]} vs "
                  f"{h}); predictions use the new features", file=sys.stderr)
    if split == "all":
        idx = torch.arange(len(data.ids), device=device)
    elif split in data.split_index:
        idx = data.split_index[split]
    else:
        raise MMCacheError(f"split {split!r} not in {dataset!r} (splits: {', '.join(data.split_index)}, all)")
    logits = predict_logits(head, data, idx)
    out = Path(out) if out else Path(run_dir) / f"predictions_{dataset}_{split}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    multi = len(labels) > 1
    rows_idx = idx.cpu().numpy()
    cols = ["id"]
    for t, names in labels.items():
        p = f"{t}_" if multi else ""
        cols += [f"{p}label", f"{p}predicted", *(f"{p}p_{n}" for n in names)]
    probs = {t: torch.softmax(logits[t].double(), dim=1).cpu().numpy() for t in labels}
    ys = {t: data.targets[t][idx].cpu().numpy() for t in labels}
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r, i in enumerate(rows_idx):
            row: list[Any] = [data.ids[i]]
            for t, names in labels.items():
                y = int(ys[t][r])
                row += [names[y] if y != IGNORE else "", names[int(probs[t][r].argmax())],
                        *(f"{v:.6f}" for v in probs[t][r])]
            w.writerow(row)
    return out
