"""The training core shared by `heads train`, `heads sweep` and `finetune run`.

One place for what every trainer does the same way:

- parameter groups and the optimizer (`param_groups`, `make_optimizer`): learned loss weights are
  never decayed; encoders may train at their own learning rate;
- the learning-rate schedule (`Schedule`, torch's schedulers): cosine per step with an optional
  linear warm-up, plateau per epoch on the selection metric, or none;
- per-epoch validation metrics (`val_metrics`) and the curve row layout (`curve_row`);
- best-epoch selection on a validation metric and early stopping (`Selector`): an undefined
  metric (NaN) never wins, and a run whose metric is undefined in every epoch is an error;
- the result type (`RunResult`) and the run folder (`new_run_dir`, `write_run`): one set of files
  and one `metrics.json` layout, whether the features came from the cache or from live encoders;
- where training stands (`TrainProgress`, `progress_hook`): one call per training step tells the criterion
  (warm-ups, late decays) and the head (a gradient-reversal schedule) the step, epoch and share of the run;
- an exponential moving average of the trainable weights (`EMA`), evaluated, selected and saved in their place;
- post-hoc logit adjustment (`logit_offsets`, `adjust_logits`): tau * log(class prior) subtracted from
  the logits at evaluation and prediction.

The data side differs by trainer (index batches over cached tensors in `mmcache.heads.train`,
DataLoader workers decoding raw inputs in `mmcache.finetune.run`) and stays there.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.heads.metrics import LOWER_IS_BETTER, SELECT_METRICS, auroc, better, failed_checks, softmax
from mmcache.utils import versions, write_json

IGNORE = -100  # target of a row without a label for a task (cross_entropy's ignore_index)
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "plateau", "none")
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}  # report order; other split names follow, sorted


@dataclass
class RunResult:
    """What every trainer returns: run folder, metrics per split and task, the chosen epoch, the curves."""

    run_dir: Path | None
    metrics: dict[str, dict[str, dict[str, Any]]]  # split -> task -> metric -> value
    best_epoch: int
    curves: list[dict[str, Any]]
    config: dict[str, Any]
    head: nn.Module
    seconds: float  # the whole call: loading, fitting, evaluating, writing
    select: dict[str, Any] = field(default_factory=dict)  # task, metric, value (+ l2, sklearn_C for lbfgs)
    fit_seconds: float = 0.0  # fitting alone (epochs with their validation, or the lbfgs grid)
    # split -> source dataset -> task -> metrics, for a dataset combined from several (else empty)
    by_source: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)
    predictions: Any = None  # the selection task's per-row test predictions (mmcache.stats.Predictions), if any
    cost: dict[str, Any] = field(default_factory=dict)  # params, fit_seconds, peak_mem_mb, infer_ms_per_row


# ---------------------------------------------------------------- optimizer and schedule


def param_groups(head: nn.Module, criterion: nn.Module | None = None, encoders: nn.Module | None = None,
                 encoder_lr: float | None = None) -> list[dict[str, Any]]:
    """Head parameters; the criterion's learned loss weights without weight decay (decaying log-variances
    toward 0 would bias the weighting); trainable encoder parameters at `encoder_lr`. Empty groups dropped."""
    groups: list[dict[str, Any]] = [{"params": [p for p in head.parameters() if p.requires_grad]}]
    if criterion is not None:
        groups.append({"params": [p for p in criterion.parameters() if p.requires_grad], "weight_decay": 0.0})
    if encoders is not None:
        enc: dict[str, Any] = {"params": [p for p in encoders.parameters() if p.requires_grad]}
        if encoder_lr is not None:
            enc["lr"] = encoder_lr
        groups.append(enc)
    return [g for g in groups if g["params"]]


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """adam (L2 in the gradient), adamw (decoupled decay) or sgd (momentum 0.9)."""
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise MMCacheError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class Schedule:
    """The learning-rate schedule of one optimizer, built from torch's schedulers.

    `cosine`: per optimizer step, a linear warm-up over `warmup_steps` then cosine decay to 0 at
    `total_steps`; `plateau`: halve after 3 epochs without a better selection metric; `none`.
    Call `step()` after every optimizer step and `epoch_end(value)` after every validation.
    """

    def __init__(self, name: str, opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 mode: Literal["min", "max"] = "max") -> None:
        if name not in SCHEDULES:
            raise MMCacheError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
        self.name = name
        self.per_step: Any = None
        self.plateau: Any = None
        total_steps = max(1, int(total_steps))
        warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))
        sched = torch.optim.lr_scheduler
        if name == "cosine":
            cosine = sched.CosineAnnealingLR(opt, T_max=total_steps - warmup_steps)
            if warmup_steps:
                warm = sched.LinearLR(opt, start_factor=1.0 / (warmup_steps + 1), total_iters=warmup_steps)
                self.per_step = sched.SequentialLR(opt, [warm, cosine], milestones=[warmup_steps])
            else:
                self.per_step = cosine
        elif name == "plateau":
            self.plateau = sched.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=3)

    def step(self) -> None:
        """After each optimizer step."""
        if self.per_step is not None:
            self.per_step.step()

    def epoch_end(self, value: float) -> None:
        """After each validation, with the selection metric's value."""
        if self.plateau is not None and not math.isnan(value):
            self.plateau.step(value)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state (for checkpoints)."""
        s = self.per_step or self.plateau
        return s.state_dict() if s is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        s = self.per_step or self.plateau
        if s is not None and state:
            s.load_state_dict(state)


# ---------------------------------------------------------------- progress, weight averaging, logit adjustment


@dataclass(frozen=True)
class TrainProgress:
    """Where a run stands at a training step: its 0-based epoch, its 0-based optimizer step over the whole
    run, and the run's planned number of steps."""

    epoch: int
    step: int
    total_steps: int

    @property
    def fraction(self) -> float:
        """The share of the run's steps done before this one: 0 at the first step, below 1 at the last."""
        return min(1.0, self.step / max(1, self.total_steps))


def progress_hook(*modules: nn.Module | None) -> Callable[[TrainProgress], None]:
    """One callable that tells every submodule of `modules` defining `set_progress(progress)` where training
    stands (the criterion's warm-ups and late decays, a head's gradient-reversal schedule). Trainers call it
    once per training step, before the forward pass; it is the only way progress reaches heads and losses."""
    found = (getattr(sub, "set_progress", None) for m in modules if m is not None for sub in m.modules())
    targets: list[Callable[[TrainProgress], None]] = [f for f in found if callable(f)]

    def tell(progress: TrainProgress) -> None:
        for set_progress in targets:
            set_progress(progress)

    return tell


def check_ema(decay: Any, flag: str = "--ema") -> float:
    """`decay` as a float in [0, 1) (0 = no averaging), else a one-line error naming `flag`."""
    ok = isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0 <= decay < 1
    if not ok:
        raise MMCacheError(f"{flag} must be a decay in [0, 1), e.g. 0.999 (0 = off), got {decay!r}")
    return float(decay)


class EMA:
    """Exponential moving average of `module`'s trainable parameters: started from their initial values and
    updated after every optimizer step with torch's `get_ema_multi_avg_fn` (ema = decay * ema + (1 - decay) * w).
    Buffers (BatchNorm statistics) stay the module's own. Inside `applied()` the module holds the averages
    (evaluate, select and save there); on leaving it holds its trained weights again."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        self.decay = check_ema(decay)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self._update = get_ema_multi_avg_fn(self.decay)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, p in enumerate(self.params):  # torch's foreach update takes one device and dtype per call
            groups.setdefault((p.device, p.dtype), []).append(i)
        self._groups = [([self.shadow[i] for i in ix], [self.params[i] for i in ix]) for ix in groups.values()]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """After each optimizer step."""
        for shadow, params in self._groups:
            self._update(shadow, params, self.updates)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the averaged weights inside the block, its trained weights again after it."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, trained, strict=True):
                    p.copy_(w)

    def state_dict(self) -> dict[str, Any]:
        """The averages and the update count (for checkpoints)."""
        return {"shadow": [s.detach().clone() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        if len(state["shadow"]) != len(self.shadow):
            raise MMCacheError(f"the saved weight averages hold {len(state['shadow'])} tensors, the model "
                               f"{len(self.shadow)}; pass --overwrite to start the run over")
        with torch.no_grad():
            for s, v in zip(self.shadow, state["shadow"], strict=True):
                s.copy_(v)
        self.updates = int(state["updates"])


def logit_offsets(class_counts: Mapping[str, torch.Tensor], tau: float,
                  labels: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[float]]:
    """Post-hoc logit adjustment (Menon et al. 2021): per task, tau * log(prior) with the prior from the train
    class counts; `adjust_logits` subtracts it (tau > 0: toward balanced error; tau < 0 adds |tau| log p(y)).
    Empty when tau is 0. A class without train rows has no prior: an error naming it."""
    if not tau:
        return {}
    out: dict[str, list[float]] = {}
    for t, counts in class_counts.items():
        c = counts.double().cpu()
        if bool((c <= 0).any()):
            k = int((c <= 0).nonzero()[0])
            name = labels[t][k] if labels is not None and t in labels else str(k)
            raise MMCacheError(f"--logit-adjust: class {name!r} of task {t!r} has no train rows, so its prior is 0; "
                               "leave --logit-adjust at 0 for this data")
        out[t] = (tau * torch.log(c / c.sum())).tolist()
    return out


def adjust_logits(logits: Mapping[str, Any], offsets: Mapping[str, Sequence[float]] | None) -> dict[str, Any]:
    """`logits` (task -> [N, C] tensor or array) minus each task's offsets from `logit_offsets` (unchanged
    where a task has none)."""
    if not offsets:
        return dict(logits)
    out = {}
    for t, x in logits.items():
        off = offsets.get(t)
        if off is None:
            out[t] = x
        elif isinstance(x, torch.Tensor):
            out[t] = x - torch.tensor(off, dtype=x.dtype, device=x.device)
        else:
            out[t] = x - np.asarray(off, dtype=x.dtype)
    return out


# ---------------------------------------------------------------- validation and selection


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


def val_metrics(y: torch.Tensor, logits: torch.Tensor, metric: str) -> dict[str, float]:
    """Per-epoch validation metrics: accuracy and macro / weighted F1 from a confusion matrix (no sklearn
    per epoch), plus `metric` itself when it needs more (AUROC, top-2). Unlabelled rows are ignored."""
    return val_metrics_many(y, logits[:, None], metric)[0]


def val_metrics_many(y: torch.Tensor, logits: torch.Tensor, metric: str) -> list[dict[str, float]]:
    """`val_metrics` of K configs at once: `logits` [N, K, C] -> one dict per config. The confusion matrices
    of all configs come from one `bincount`, so a stacked sweep's per-epoch validation costs a few ops."""
    keep = y != IGNORE
    y, logits = y[keep], logits[keep].float()
    n, k, c = logits.shape
    if n == 0:
        return [{} for _ in range(k)]
    pred = logits.argmax(-1)  # [N, K]
    code = torch.arange(k, device=y.device) * (c * c) + (y * c)[:, None] + pred
    cm = torch.bincount(code.reshape(-1), minlength=k * c * c).reshape(k, c, c).double()
    tp = cm.diagonal(dim1=1, dim2=2)  # [K, C]
    denom = cm.sum(1) + cm.sum(2)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    support = cm.sum(2)
    cols = {"accuracy": tp.sum(1) / n, "macro_f1": f1.mean(1), "weighted_f1": (f1 * support).sum(1) / n}
    if metric == "top2_accuracy" and c > 2:
        # scikit-learn's top_k_accuracy_score ranking (as the final metrics): a stable sort, ties to the later class
        top = logits.sort(dim=-1, stable=True).indices[..., -2:]
        cols[metric] = (top == y[:, None, None]).any(-1).double().mean(0)
    out = [dict(zip(cols, vals, strict=True)) for vals in zip(*(v.tolist() for v in cols.values()), strict=True)]
    if metric == "auroc":
        yn, ln = y.cpu().numpy(), logits.cpu().numpy()
        for j in range(k):
            v = auroc(yn, softmax(ln[:, j]))
            out[j][metric] = float("nan") if v is None else v
    return out


def curve_row(epoch: int, train_loss: float, val: dict[str, float], lr: float, seconds: float) -> dict[str, Any]:
    """One row of the per-epoch curves (the same columns for every trainer)."""
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val.get("loss", float("nan")),
            **{f"val_{k}": v for k, v in val.items() if k != "loss"}, "lr": lr, "seconds": seconds}


def snapshot(module: nn.Module, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """A detached copy of `module`'s state (or of `keys` of it)."""
    state = module.state_dict()
    wanted = state if keys is None else {k: state[k] for k in keys}
    return {k: v.detach().clone() for k, v in wanted.items()}


class Selector:
    """Best-epoch selection on a validation metric, with early stopping after `patience` epochs
    without a better value (0 = never). NaN (undefined, e.g. AUROC with one class) never wins."""

    def __init__(self, metric: str, patience: int = 0) -> None:
        self.metric = metric
        self.patience = patience
        self.mode: Literal["min", "max"] = "min" if metric in LOWER_IS_BETTER else "max"
        self.best_value: float | None = None
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0
        self.stopped = False

    def update(self, epoch: int, value: float, state: Any) -> bool:
        """Record epoch `epoch`'s `value`; `state()` (a callable) is snapshotted when it is the best so far.
        Returns True when this epoch is the new best."""
        if not math.isnan(value) and better(self.metric, value, self.best_value):
            self.best_value, self.best_epoch, self.stale = value, epoch, 0
            self.best_state = state()
            return True
        self.stale += 1
        if self.patience and self.stale >= self.patience:
            self.stopped = True
        return False

    def result(self) -> tuple[int, float, dict[str, torch.Tensor]]:
        """(best epoch, its value, its state); an error when the metric was undefined in every epoch."""
        if self.best_value is None or self.best_state is None:
            raise MMCacheError(f"validation {self.metric} was undefined in every epoch (e.g. AUROC with one class "
                               "in the val split); choose another --select metric")
        return self.best_epoch, self.best_value, self.best_state


# ---------------------------------------------------------------- run folder


def named_run_dir(base: Path, run_name: str) -> Path:
    """`base / run_name`, refused unless the name is one folder name (`mmcache.runfolder.check_name`)."""
    from mmcache.runfolder import check_name

    return base / check_name(run_name, "--run-name")


def new_run_dir(runs_dir: str | Path, dataset: str, run_name: str | None, stem_parts: list[str],
                overwrite: bool = False, taken: set[Path] | None = None) -> Path:
    """`<runs_dir>/<dataset>/<run_name>`, taken for this process until its folder is written (refused when another
    process holds the name, or when it exists and holds files, unless `overwrite`), or a fresh `<parts>_<time>`
    folder name that collides with no existing folder, no name another run holds, nor a name in `taken` (the
    folders handed out earlier in the same call, not yet written; the new one is added). See `mmcache.runfolder`."""
    from mmcache.runfolder import check_name, take_run_dir

    return take_run_dir(Path(runs_dir) / check_name(dataset, "--dataset", "demo"), run_name, stem_parts, overwrite,
                        taken)


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def metrics_json(result: RunResult) -> dict[str, Any]:
    """The one `metrics.json` layout."""
    return {"best_epoch": result.best_epoch, "select": result.select, "fit_seconds": result.fit_seconds,
            "seconds": result.seconds, "splits": result.metrics,
            **({"by_source": result.by_source} if result.by_source else {}),
            **({"cost": result.cost} if result.cost else {})}


def write_run(d: Path, result: RunResult, tasks: dict[str, list[str]], dataset: str,
              criterion: nn.Module | None = None, encoders: dict[str, torch.Tensor] | None = None,
              metrics_extra: dict[str, Any] | None = None) -> Path:
    """Write run folder `d` whole (`mmcache.runfolder.write_whole`: a temporary folder beside it, each file
    fsynced, renamed into place): model.safetensors (the head), head.json, config.json, metrics.json (plus
    `metrics_extra`), versions.json, curves.json/.csv, curves.png, confusion_<task>.png; criterion.safetensors when
    the loss has state; encoders.safetensors with the encoder weights that were trained (fine-tuning; its sha256
    goes into config.json's `resolved.encoders_sha256`). Nothing is pickled."""
    from safetensors.torch import save_file

    from mmcache.runfolder import write_whole

    head = result.head
    head_config = getattr(head, "config", {})

    def fill(t: Path, writing: Callable[[str], str]) -> None:
        save_file(_tensors(head.state_dict()), str(t / writing("model.safetensors")),
                  metadata={"head": json.dumps(head_config)})
        if criterion is not None:
            crit_state = _tensors(criterion.state_dict())
            if crit_state:
                save_file(crit_state, str(t / writing("criterion.safetensors")))
        if encoders:
            from mmcache.extract.weights import weights_sha256

            save_file(_tensors(encoders), str(t / writing("encoders.safetensors")))
            # The trained weights by content: a file replaced since is refused when loading the run.
            result.config.setdefault("resolved", {})["encoders_sha256"] = weights_sha256(t / "encoders.safetensors")
        write_json(t / writing("head.json"), head_config)
        write_json(t / writing("config.json"), result.config)
        write_json(t / writing("metrics.json"), {**metrics_json(result), **(metrics_extra or {})})
        write_json(t / writing("versions.json"), versions())
        writing("curves.json")
        write_curves(t, result.curves)
        writing("curves.png")
        plot_run_curves(t, result, dataset, d.name)
        writing("confusion plots")
        plot_confusions(t, result.metrics, tasks, dataset)
        if result.predictions is not None:  # per-row test predictions, for the tables' paired tests
            from mmcache.stats import PREDICTIONS_FILE, write_predictions

            writing(PREDICTIONS_FILE)
            write_predictions(t, result.predictions)

    return write_whole(d, fill)


def write_curves(d: Path, curves: list[dict[str, Any]]) -> None:
    """Per-epoch curves as curves.json and curves.csv (one row per epoch)."""
    write_json(d / "curves.json", curves)
    if curves:
        cols = list(dict.fromkeys(k for row in curves for k in row))
        with (d / "curves.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(curves)


def plot_run_curves(d: Path, result: RunResult, dataset: str, name: str | None = None) -> None:
    """curves.png: train/val loss and the validation selection metric per epoch, the chosen epoch marked."""
    from mmcache.plots import plot_curves

    metric = result.select.get("metric")
    plot_curves(result.curves, d / "curves.png", metric, result.best_epoch,
                f"{dataset} {name or d.name}: val {result.select.get('task', '')}:{metric} "
                f"{result.select.get('value', 0.0):.4f}")


def plot_confusions(d: Path, metrics: dict[str, dict[str, dict[str, Any]]], tasks: dict[str, list[str]],
                    dataset: str) -> None:
    """confusion_<task>.png of the test split (val when test has no labels), one per task."""
    from mmcache.plots import plot_confusion

    split = "test" if metrics.get("test") else "val"
    for t, m in metrics.get(split, {}).items():
        if "confusion_matrix" in m:
            plot_confusion(np.asarray(m["confusion_matrix"]), tasks[t], d / f"confusion_{t}.png",
                           f"{dataset} {split} {t}: acc {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")


def warn_failed_checks(metrics: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Print the prediction checks that failed (e.g. one class predicted for every row)."""
    for split, per_task in metrics.items():
        for t, m in per_task.items():
            for msg in failed_checks(m):
                print(f"warning: {split} {t}: check failed: {msg}", file=sys.stderr)


def results_table(result: RunResult) -> str:
    """The console table of a run (rich): one row per split and task, then the chosen epoch and seconds."""
    from mmcache.tables import render

    cols = ["accuracy", "macro_f1", "weighted_f1", "auroc", "top2_accuracy"]
    shown = [c for c in cols if any(isinstance(m.get(c), float) for pt in result.metrics.values() for m in pt.values())]
    rows = [[split, t, m["n"], *(f"{m[c]:.4f}" if isinstance(m.get(c), float) else "-" for c in shown)]
            for split, per_task in result.metrics.items() for t, m in per_task.items()]
    sel = result.select
    extra = f", l2 {sel['l2']:g}" if "l2" in sel else ""
    footer = (f"best {'fit' if 'l2' in sel else 'epoch'} {result.best_epoch}: val {sel['task']}:{sel['metric']} "
              f"{sel['value']:.4f}{extra}; {result.seconds:.1f} s")
    return render(["split", "task", "n", *shown], rows, right=["n", *shown]) + "\n" + footer
