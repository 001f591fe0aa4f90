"""Training criteria. One interface: `criterion(logits, targets, teacher=None) -> (loss, parts)`.

Trainers tell a criterion where training stands through `set_progress(progress)` (a
`mmcache.engine.TrainProgress`: 0-based epoch, 0-based optimizer step of the whole run, planned steps),
called once per training step by `mmcache.engine.progress_hook`; warm-ups and late decays read it.
A direct call may still pass `epoch` (and `step`) instead.

Registered by name in `CRITERIA` and built with `build_criterion(name, tasks, class_counts, **options)`:

- `ce`: cross-entropy per task (optional inverse-frequency class weights, label smoothing);
- `focal`: focal loss (Lin et al.), `gamma` 2, class-balanced alpha from the train class counts
  with `beta` 0.999 (Cui et al., effective number of samples);
- `scabg`: the 3-way loss (CE, or focal with `focal=True`) plus coarse (neutral vs emotional)
  and fine (negative vs positive, emotional rows only) losses on the head's `_coarse` / `_fine`
  outputs, weighted by learned homoscedastic uncertainty (Kendall & Gal):
  0.5 e^-s1 L_coarse + 0.5 s1 + 0.5 e^-s2 L_fine + 0.5 s2.

Options every criterion takes:

- multi-task: task losses are summed, or with `uncertainty=True` weighted by one learned
  log-variance per task (0.5 e^-s_t L_t + 0.5 s_t);
- class-balanced cross-entropy: `ce_balanced=True` weights each class by Cui et al.'s
  (1 - beta) / (1 - beta^n_c) (`beta` 0.999), normalised to mean 1;
- distillation: with a teacher, `kd_lambda` * T^2 * KL(softmax(teacher/T) || softmax(student/T))
  on the primary task (`kd_task`), T = `kd_T` (3), `kd_lambda` 0.02, linearly warmed up from 0 at
  the start to full weight after `kd_warmup` epochs (or optimizer steps with `kd_warmup_unit="step"`;
  0 = no warm-up); skipped when teacher is None. Several teachers arrive as [B, n, C]: their KD
  terms are summed, each into the head's auxiliary KD head n when it returns `_kd` [B, n, k]
  (else into the task logits).

`ContrastiveLoss` (not a `--loss`): CLIP's symmetric InfoNCE between two modalities' pooled embeddings with
a learned temperature, which `finetune run --contrastive-weight` adds to the criterion's loss.

Learned log-variances are parameters of the criterion: the trainer must optimise
`criterion.parameters()` together with the head's (without weight decay).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.registry import Registry

if TYPE_CHECKING:
    from mmcache.engine import TrainProgress

IGNORE = -100
CRITERIA: Registry[type[Criterion]] = Registry("loss")  # `--loss NAME`


def _flag(value: Any) -> bool:
    """Booleans from the CLI may arrive as strings."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _labelled(target: torch.Tensor) -> torch.Tensor:
    return target != IGNORE


def _zero_like(logits: torch.Tensor) -> torch.Tensor:
    # Keeps the graph connected when a batch has no labelled row for a task.
    return logits.sum() * 0.0


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Losses in float32 at least: half-precision logits are upcast, float64 ones (the lbfgs probe) kept."""
    return logits if logits.dtype == torch.float64 else logits.float()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over labelled rows of -alpha_y (1 - p_y)^gamma log p_y; 0 when no row is labelled."""
    keep = _labelled(target)
    if not keep.any():
        return _zero_like(logits)
    logits, target = logits[keep], target[keep]
    logp = _upcast(logits).log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    loss = -((1 - logp.exp()).clamp(min=0) ** gamma) * logp
    if alpha is not None:
        loss = loss * alpha.to(loss.device)[target]
    return loss.mean()


def class_balanced_alpha(counts: torch.Tensor, beta: float = 0.999) -> torch.Tensor:
    """Cui et al. weights (1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes."""
    n = counts.float().clamp(min=1)
    w = (1 - beta) / (1 - beta ** n)
    return w * len(w) / w.sum()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float = 3.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean over rows whose teacher is finite."""
    if teacher.shape != student.shape:
        raise MMCacheError(f"teacher logits have shape {tuple(teacher.shape)} but the student's are "
                           f"{tuple(student.shape)}; the teacher store must have one logit per class of the task")
    ok = torch.isfinite(teacher).all(-1)
    if not ok.any():
        return _zero_like(student)
    s = (_upcast(student[ok]) / T).log_softmax(-1)
    t = (teacher[ok].to(s.dtype) / T).log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * T * T


@CRITERIA.register("ce")
class Criterion(nn.Module):
    """Sum of per-task cross-entropies (the default); subclasses change the per-task loss or add terms.

    `logits`: task -> [B,C]; `targets`: task -> [B] long, -100 where a row has no label for the task;
    `teacher`: [B,C] cached teacher logits of the primary task or None; warm-ups follow `set_progress`.
    Returns the scalar loss and a dict of float parts for logging.
    """

    part = "ce"

    def __init__(self, tasks: dict[str, int], class_counts: dict[str, torch.Tensor] | None = None,
                 class_weights: bool = False, label_smoothing: float = 0.0, uncertainty: bool = False,
                 kd_lambda: float = 0.02, kd_T: float = 3.0, kd_warmup: int = 0, kd_task: str | None = None,
                 kd_warmup_unit: str = "epoch", ce_balanced: bool = False, beta: float = 0.999,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise MMCacheError(f"loss {self.part}: unknown options {sorted(unknown)}; see `heads train --help` "
                               "for the loss options")
        self.tasks = dict(tasks)
        self.label_smoothing = float(label_smoothing)
        if not 0 <= self.label_smoothing < 1:
            raise MMCacheError(f"loss {self.part}: label_smoothing={label_smoothing} must be in [0, 1)")
        if isinstance(kd_warmup, bool) or float(kd_warmup) != int(float(kd_warmup)) or float(kd_warmup) < 0:
            raise MMCacheError(f"loss {self.part}: kd_warmup={kd_warmup!r} must be a whole number of epochs or "
                               "steps >= 0")
        if not float(kd_lambda) >= 0 or not float(kd_T) > 0:
            raise MMCacheError(f"loss {self.part}: kd_lambda={kd_lambda} must be >= 0 and kd_T={kd_T} > 0")
        self.kd_lambda, self.kd_T, self.kd_warmup = float(kd_lambda), float(kd_T), int(float(kd_warmup))
        if kd_warmup_unit not in ("epoch", "step"):
            raise MMCacheError(f"loss {self.part}: kd_warmup_unit={kd_warmup_unit!r} must be 'epoch' or 'step'")
        if not 0 <= float(beta) < 1:
            raise MMCacheError(f"loss {self.part}: beta={beta} must be in [0, 1)")
        self.warmup_unit = kd_warmup_unit
        self.beta = float(beta)
        self.progress: tuple[int, int | None] = (0, None)  # (epoch, step) of the current call
        self.last_step: int | None = None  # the last training step seen (evaluation calls pass none)
        self.fraction = 0.0  # share of the run's planned steps done (`set_progress`)
        self.kd_task = kd_task or next(iter(self.tasks))
        if self.kd_task not in self.tasks:
            raise MMCacheError(f"kd_task={kd_task!r} is not one of the tasks {list(self.tasks)}")
        if _flag(class_weights) and class_counts:
            for t, c in class_counts.items():
                # Inverse-frequency weights, normalised to mean 1.
                w = c.float().sum() / (len(c) * c.float().clamp(min=1))
                self.register_buffer(f"w_{t}", w)
        if _flag(ce_balanced) and class_counts:
            for t, c in class_counts.items():
                self.register_buffer(f"cbw_{t}", class_balanced_alpha(c, self.beta))
        # Kendall & Gal log-variances, one per task (learned with the head).
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks))) if _flag(uncertainty) else None

    def task_loss(self, task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one task (cross-entropy here); 0 when no row is labelled."""
        if not _labelled(target).any():
            return _zero_like(logits)
        logits = _upcast(logits)
        weight = getattr(self, f"w_{task}", None)
        cb = getattr(self, f"cbw_{task}", None)
        if cb is not None:
            weight = cb if weight is None else weight * cb
        return F.cross_entropy(logits, target, weight=None if weight is None else weight.to(logits.dtype),
                               ignore_index=IGNORE, label_smoothing=self.label_smoothing)

    def extra_loss(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   parts: dict[str, float]) -> torch.Tensor | None:
        """Additional terms of a subclass (None here)."""
        return None

    def set_progress(self, progress: TrainProgress) -> None:
        """Where training stands (called by the trainer before each training step's forward pass)."""
        self.progress = (progress.epoch, progress.step)
        self.last_step = progress.step
        self.fraction = progress.fraction

    def warmed(self, value: float, warmup: int, epoch: int | None = None, step: int | None = None) -> float:
        """`value` linearly warmed up from 0 over `warmup` epochs or steps (`kd_warmup_unit`); at the current
        call's progress when epoch/step are not given. Evaluation calls (no step) use the last training step."""
        if warmup <= 0:
            return value
        if epoch is None:
            epoch, step = self.progress
        if self.warmup_unit == "epoch":
            return value * min(1.0, epoch / warmup)
        if step is None:
            step = self.last_step
        if step is None:
            raise MMCacheError(f"loss {self.part}: kd_warmup_unit=step needs the optimizer step, which the trainer "
                               "sets through set_progress; use kd_warmup_unit=epoch when calling it directly")
        return value * min(1.0, step / warmup)

    def kd_weight(self, epoch: int, step: int | None = None) -> float:
        """KD weight at `epoch` (0-based) or `step`: kd_lambda, linearly warmed up over `kd_warmup` epochs/steps."""
        return self.warmed(self.kd_lambda, self.kd_warmup, epoch, step)

    def teacher_for(self, teacher: torch.Tensor, width: int) -> torch.Tensor:
        """A teacher's logits [B,C] for a student of `width` logits (unchanged here; the scabg loss reduces a
        3-way teacher to the coarse [neutral, emotional] pair for 2-way KD heads)."""
        return teacher

    def distill(self, logits: dict[str, torch.Tensor], teacher: torch.Tensor) -> torch.Tensor:
        """Sum of KD terms: one per teacher ([B,C] is one, [B,n,C] n), each into auxiliary KD head i of `_kd`
        [B,n,k] when the head returns it, else into the `kd_task` logits."""
        teachers = teacher[:, None] if teacher.dim() == 2 else teacher
        heads = logits.get("_kd")
        if heads is None:
            return sum((kd_loss(logits[self.kd_task], teachers[:, i], self.kd_T) for i in range(teachers.shape[1])),
                       _zero_like(logits[self.kd_task]))
        if heads.shape[1] != teachers.shape[1]:
            raise MMCacheError(f"the head has {heads.shape[1]} KD head(s) but {teachers.shape[1]} teacher store(s) "
                               "were given; pass one teacher per KD head in order (--teacher nli,clip) or set the "
                               "head's kd_branches to match")
        return sum((kd_loss(heads[:, i], self.teacher_for(teachers[:, i], heads.shape[-1]), self.kd_T)
                    for i in range(heads.shape[1])), _zero_like(heads))

    def forward(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],  # type: ignore[override]
                teacher: torch.Tensor | None = None, epoch: int | None = None,
                step: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Task losses (summed or uncertainty-weighted) + subclass terms + KD; returns (loss, float parts).
        Warm-ups use the progress of `set_progress`, or `epoch` / `step` when given."""
        if epoch is not None or step is not None:
            self.progress = (epoch or 0, step)
            if step is not None and self.training:
                self.last_step = step
        epoch, step = self.progress
        parts: dict[str, float] = {}
        total = _zero_like(next(iter(logits.values())))
        for i, t in enumerate(self.tasks):
            if t not in targets:
                continue
            loss = self.task_loss(t, logits[t], targets[t])
            parts[f"{self.part}_{t}"] = float(loss.detach())
            if self.log_vars is not None and _labelled(targets[t]).any():
                s = self.log_vars[i]
                loss = 0.5 * torch.exp(-s) * loss + 0.5 * s
                parts[f"logvar_{t}"] = float(s.detach())
            total = total + loss
        extra = self.extra_loss(logits, targets, parts)
        if extra is not None:
            total = total + extra
        weight = self.kd_weight(epoch, step) if teacher is not None else 0.0
        if teacher is not None and weight > 0:
            kd = self.distill(logits, teacher)
            parts["kd"] = float(kd.detach())
            parts["kd_weight"] = weight
            total = total + weight * kd
        return total, parts


@CRITERIA.register("focal")
class FocalCriterion(Criterion):
    """Focal loss per task, with class-balanced alpha (`alpha="balanced"`, from class counts) or none."""

    part = "focal"

    def __init__(self, tasks: dict[str, int], class_counts: dict[str, torch.Tensor] | None = None,
                 gamma: float = 2.0, beta: float = 0.999, alpha: str = "balanced", **options: Any) -> None:
        super().__init__(tasks, class_counts=class_counts, beta=beta, **options)
        if alpha not in ("balanced", "none"):
            raise MMCacheError(f"loss {self.part}: alpha={alpha!r} must be 'balanced' or 'none'")
        self.gamma = float(gamma)
        if self.label_smoothing and type(self) is FocalCriterion:
            raise MMCacheError("loss focal: label_smoothing applies to cross-entropy only; drop it or use loss ce")
        for t in self.tasks:
            a = None
            if alpha == "balanced" and class_counts and t in class_counts:
                a = class_balanced_alpha(class_counts[t], float(beta))
            w = getattr(self, f"w_{t}", None)
            if w is not None:  # class_weights on top of alpha
                a = w if a is None else a * w
            if a is not None:
                self.register_buffer(f"alpha_{t}", a)

    def task_loss(self, task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Focal loss of one task."""
        return focal_loss(logits, target, self.gamma, getattr(self, f"alpha_{task}", None))


def info_nce(a: torch.Tensor, b: torch.Tensor, T: float) -> torch.Tensor:
    """Symmetric InfoNCE of paired rows a, b [N,D] (cosine similarity / T; row i's positive is row i)."""
    logits = F.normalize(_upcast(a), dim=-1) @ F.normalize(_upcast(b), dim=-1).t() / T
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# CLIP's initial temperature 0.07 and open_clip's ceiling on the logit scale (100).
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
CLIP_MAX_LOGIT_SCALE = math.log(100)


class ContrastiveLoss(nn.Module):
    """CLIP's symmetric InfoNCE between two modalities' pooled embeddings of the same rows, with a learned
    temperature (`logit_scale`, initialised to log(1/0.07) as CLIP; the scale exp(logit_scale) is kept at most
    100 as open_clip clamps it after each step, see `clamp_`). Embeddings of different widths are first
    projected to the smaller width by learned linear maps (no bias); of the same width, used as they are.

    `forward(a, b, keep)`: a [B,da], b [B,db]; `keep` [B] bool selects the rows whose pairs count (all when
    None). Returns the mean of the image->text and text->image cross-entropies over the kept rows' similarity
    matrix (row i's positive is column i); 0 (connected to the parameters) with fewer than two kept rows.
    """

    def __init__(self, dim_a: int, dim_b: int) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(CLIP_INIT_LOGIT_SCALE))
        self.dims = (int(dim_a), int(dim_b))
        width = min(self.dims)
        self.proj_a = nn.Linear(dim_a, width, bias=False) if dim_a != dim_b else nn.Identity()
        self.proj_b = nn.Linear(dim_b, width, bias=False) if dim_a != dim_b else nn.Identity()

    @property
    def scale(self) -> torch.Tensor:
        """exp(logit_scale), at most 100."""
        return self.logit_scale.clamp(max=CLIP_MAX_LOGIT_SCALE).exp()

    def forward(self, a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """The symmetric InfoNCE of rows `keep` of (a, b)."""
        if keep is not None:
            a, b = a[keep], b[keep]
        with torch.autocast(a.device.type, enabled=False):  # similarities up to 100x: float32, never bf16
            za = F.normalize(self.proj_a(_upcast(a)), dim=-1)
            zb = F.normalize(self.proj_b(_upcast(b)), dim=-1)
            if len(za) < 2:  # no negatives: nothing to contrast
                return (za.sum() + zb.sum()) * 0.0 + self.logit_scale * 0.0
            logits = self.scale * za @ zb.t()
            labels = torch.arange(len(za), device=za.device)
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep logit_scale in [0, log 100] (open_clip does so after every optimizer step)."""
        self.logit_scale.clamp_(0, CLIP_MAX_LOGIT_SCALE)


# The public reference code's training recipe (`variant="reference"`); each entry is an option of its own.
SCABG_REFERENCE_RECIPE: dict[str, Any] = {
    "ce_balanced": True, "kd_lambda": 0.02, "kd_T": 3.0, "kd_warmup": 6000, "kd_warmup_unit": "step",
    "adv_weight": 0.001, "adv_warmup": 12000, "nce_weight": 0.005, "nce_warmup": 9000, "band_weight": 0.005,
    "band_warmup": 9000, "late_start": 0.6, "late_adv_decay": 0.5, "late_nce_decay": 0.25,
}
# Without the reference variant: no late decay (late_start 1 is never reached).
LATE_DEFAULTS: dict[str, float] = {"late_start": 1.0, "late_adv_decay": 1.0, "late_nce_decay": 1.0}


@CRITERIA.register("scabg")
class SCABGCriterion(FocalCriterion):
    """3-way CE/focal plus uncertainty-weighted coarse/fine losses on the `scabg` head's `_coarse` / `_fine`;
    optionally the reference code's adversarial (`_adv`), InfoNCE (`_branches`) and band-consistency
    (`_band_w`) terms, each warmed up like KD; from `late_start` (a share of the run's planned steps) on, the
    adversarial and InfoNCE weights are multiplied by `late_adv_decay` and `late_nce_decay`."""

    part = "main"

    def __init__(self, tasks: dict[str, int], class_counts: dict[str, torch.Tensor] | None = None,
                 focal: bool = False, aux_uncertainty: bool = True, aux_weight: float = 1.0,
                 classes: Any = (0, 1, 2), task: str | None = None, variant: str = "default",
                 adv_weight: float | None = None, adv_warmup: int | None = None, nce_weight: float | None = None,
                 nce_T: float = 0.07, nce_warmup: int | None = None, band_weight: float | None = None,
                 band_warmup: int | None = None, late_start: float | None = None,
                 late_adv_decay: float | None = None, late_nce_decay: float | None = None, **options: Any) -> None:
        if variant not in ("default", "reference"):
            raise MMCacheError(f"loss scabg: variant={variant!r} must be 'default' or 'reference'")
        given = {"adv_weight": adv_weight, "adv_warmup": adv_warmup, "nce_weight": nce_weight,
                 "nce_warmup": nce_warmup, "band_weight": band_weight, "band_warmup": band_warmup}
        # Unset options take the variant's value: 0 (off) by default, the reference recipe's with variant=reference.
        recipe = SCABG_REFERENCE_RECIPE if variant == "reference" else {}
        v: dict[str, float] = {k: float(recipe.get(k, 0) if x is None else x) for k, x in given.items()}
        late_given = {"late_start": late_start, "late_adv_decay": late_adv_decay, "late_nce_decay": late_nce_decay}
        late = {k: float(recipe.get(k, LATE_DEFAULTS[k]) if x is None else x) for k, x in late_given.items()}
        options = {**{k: x for k, x in recipe.items() if k not in given and k not in late_given}, **options}
        super().__init__(tasks, class_counts=class_counts, **options)
        for name, value in v.items():
            if value < 0:
                raise MMCacheError(f"loss scabg: {name}={value} must be >= 0")
        for name, value in late.items():
            if not 0 <= value <= 1:
                raise MMCacheError(f"loss scabg: {name}={value} must be in [0, 1]")
        self.late_start = late["late_start"]
        self.late_decay = {"adv": late["late_adv_decay"], "nce": late["late_nce_decay"]}
        if float(nce_T) <= 0:
            raise MMCacheError(f"loss scabg: nce_T={nce_T} must be > 0")
        self.adv = (v["adv_weight"], int(v["adv_warmup"]))
        self.nce = (v["nce_weight"], int(v["nce_warmup"]))
        self.band = (v["band_weight"], int(v["band_warmup"]))
        self.nce_T = float(nce_T)
        from mmcache.heads.scabg import check_classes

        self.focal = _flag(focal)
        if self.focal and self.label_smoothing:
            raise MMCacheError("loss scabg: label_smoothing applies to cross-entropy only; drop it or focal=false")
        self.task = task or next(iter(self.tasks))
        if self.task not in self.tasks or self.tasks[self.task] != 3:
            raise MMCacheError(f"loss scabg: task {self.task!r} must be a 3-way task (negative, neutral, positive) "
                               f"among {self.tasks}; set loss option task=<name>")
        self.classes = check_classes(classes, "loss scabg")
        self.aux_weight = float(aux_weight)
        # s1 (coarse), s2 (fine): Kendall & Gal log-variances.
        self.aux_log_vars = nn.Parameter(torch.zeros(2)) if _flag(aux_uncertainty) else None

    def task_loss(self, task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Focal loss with `focal=True`, else cross-entropy."""
        if self.focal:
            return super().task_loss(task, logits, target)
        return Criterion.task_loss(self, task, logits, target)

    def teacher_for(self, teacher: torch.Tensor, width: int) -> torch.Tensor:
        """A 3-way teacher [B,3] for a 2-way KD head: its coarse pair [neutral, emotional], the emotional logit
        being logsumexp(negative, positive) (the probabilities of the two emotional classes added)."""
        if width == 2 and teacher.shape[-1] == 3:
            neg, neu, pos = self.classes
            return torch.stack([teacher[:, neu], torch.logaddexp(teacher[:, neg], teacher[:, pos])], -1)
        return teacher

    def reference_terms(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                        parts: dict[str, float]) -> torch.Tensor | None:
        """adv_weight * mean over branches of CE(_adv) + nce_weight * InfoNCE over branch pairs
        + band_weight * sum over branch pairs of MSE(band weights), each warmed up (the adversarial and InfoNCE
        weights decayed from `late_start` on); None when all are off."""
        total = None
        need = {"adv": "_adv", "nce": "_branches", "band": "_band_w"}
        for name, (value, warmup) in (("adv", self.adv), ("nce", self.nce), ("band", self.band)):
            if value <= 0:
                continue
            if need[name] not in logits:
                if not self.training:
                    continue
                raise MMCacheError(f"loss scabg: {name}_weight needs the head's `{need[name]}` output; use --head "
                                   "scabg-ref (or --hp variant=reference, or the part's flag: adversarial / "
                                   f"aux_outputs) or set {name}_weight=0")
            weight = self.warmed(value, warmup) * self.late_factor(name)
            term = getattr(self, f"_{name}_loss")(logits, targets)
            if term is None:
                continue
            parts[name] = float(term.detach())
            total = weight * term if total is None else total + weight * term
        return total

    def late_factor(self, name: str) -> float:
        """The late-training factor of term `name` ("adv", "nce"; 1 for others) at the current progress."""
        if self.late_start < 1 and self.fraction >= self.late_start:
            return self.late_decay.get(name, 1.0)
        return 1.0

    def _adv_loss(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        y = targets.get(self.task)
        if y is None or not _labelled(y).any():
            return None
        adv = logits["_adv"]  # [B, branches, C]
        return torch.stack([F.cross_entropy(_upcast(adv[:, i]), y, ignore_index=IGNORE)
                            for i in range(adv.shape[1])]).mean()

    @staticmethod
    def _pairs(logits: dict[str, torch.Tensor], nb: int) -> list[tuple[int, int, torch.Tensor]]:
        """Branch pairs (i, j), i < j, with the rows where both are present (`_branch_mask`; all rows without it)."""
        mask = logits.get("_branch_mask")
        rows = len(logits["_coarse"])
        present = mask > 0 if mask is not None else torch.ones(rows, nb, dtype=torch.bool,
                                                               device=logits["_coarse"].device)
        return [(i, j, present[:, i] & present[:, j]) for i in range(nb) for j in range(i + 1, nb)]

    def _nce_loss(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        b = logits["_branches"]
        terms = [info_nce(b[m, i], b[m, j], self.nce_T) for i, j, m in self._pairs(logits, b.shape[1])
                 if int(m.sum()) >= 2]
        return torch.stack(terms).mean() if terms else None

    def _band_loss(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        w = _upcast(logits["_band_w"])
        terms = [F.mse_loss(w[m, i], w[m, j]) for i, j, m in self._pairs(logits, w.shape[1]) if m.any()]
        return torch.stack(terms).sum() if terms else None

    def aux_targets(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse targets (0 neutral, 1 emotional) and fine targets (0 negative, 1 positive; -100 if neutral)."""
        neg, neu, pos = self.classes
        lab = _labelled(target)
        if (lab & ((target < 0) | (target > 2))).any():
            raise MMCacheError(f"loss scabg: targets of task {self.task!r} must be 0, 1, 2 or -100")
        ignore = torch.full_like(target, IGNORE)
        coarse = torch.where(lab, (target != neu).long(), ignore)
        fine = torch.where(lab & (target != neu), (target == pos).long(), ignore)
        return coarse, fine

    def extra_loss(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   parts: dict[str, float]) -> torch.Tensor | None:
        """0.5 e^-s1 L_coarse + 0.5 s1 + 0.5 e^-s2 L_fine + 0.5 s2 (or aux_weight * (L_coarse + L_fine))."""
        if "_coarse" not in logits or "_fine" not in logits:
            if not self.training:
                return None  # evaluation code may keep only the task logits; the val loss is then the main loss
            raise MMCacheError("loss scabg needs the `_coarse` and `_fine` outputs of head scabg; "
                               "use --head scabg or another loss")
        extra = self.reference_terms(logits, targets, parts)
        if self.task not in targets:
            return extra
        yc, yf = self.aux_targets(targets[self.task])
        total = _zero_like(logits["_coarse"])
        for i, (name, out, y) in enumerate((("coarse", logits["_coarse"], yc), ("fine", logits["_fine"], yf))):
            if not _labelled(y).any():
                continue  # e.g. a batch with no emotional row: no fine term, and no pull on s2
            loss = F.cross_entropy(_upcast(out), y, ignore_index=IGNORE)
            parts[name] = float(loss.detach())
            if self.aux_log_vars is not None:
                s = self.aux_log_vars[i]
                loss = 0.5 * torch.exp(-s) * loss + 0.5 * s
                parts[f"logvar_{name}"] = float(s.detach())
            else:
                loss = self.aux_weight * loss
            total = total + loss
        return total if extra is None else total + extra


def build_criterion(name: str, tasks: dict[str, int], class_counts: dict[str, torch.Tensor] | None = None,
                    **options: Any) -> Criterion:
    """Build criterion `name` ("ce", "focal", "scabg") for `tasks`; `class_counts` (task -> [C] train counts)
    feeds class weights / class-balanced alphas; `options` are the loss flags (label_smoothing, gamma, kd_T, ...)."""
    cls = CRITERIA.get(name)
    try:
        return cls(tasks, class_counts=class_counts, **options)
    except (TypeError, ValueError) as e:  # an option value of the wrong kind (gamma=abc)
        if not options:
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise MMCacheError(f"loss {name}: an option has a value of the wrong kind ({given}: {e}); see `heads train "
                           "--help` for the loss options") from None
