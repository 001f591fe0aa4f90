"""The full-batch logistic-regression probe behind `heads train --solver lbfgs`.

It fits scikit-learn's `LogisticRegression(solver="lbfgs")` objective, with torch computing it:

- objective, per task: the criterion's mean loss over the task's labelled train rows
  + (l2/2)·‖W‖² (biases not penalised), in float64 on the features' device;
- a 2-class task is fitted as binary logistic regression (one weight vector w, stored as the
  rows -w/2, w/2 of the 2-class softmax): the same optimum as penalising both softmax rows, and
  scikit-learn's own parameterisation. Hence the scikit-learn `C` of a penalty l2 on n labelled
  rows is 1/(l2·n) with three or more classes and 2/(l2·n) with two (`sklearn_C`), counting the classes
  the train labels hold, as scikit-learn does (a class without train rows gets no weights there; here its
  unpenalised bias runs to -inf, the same model); train labels of one class are refused, as there;
- solver: `scipy.optimize.minimize(method="L-BFGS-B")`, the routine scikit-learn calls, with its
  options (`maxls` 50, `ftol` 64·eps, `maxiter`), started at zero. It runs in preconditioned
  coordinates: each feature centred over the train rows and its weight scaled by
  1/sqrt(var/4 + l2), about the inverse square root of the objective's curvature along it, so
  that badly scaled features converge about as fast as standardised ones (the objective and its
  optimum are unchanged);
- convergence: as scikit-learn's `tol`, the largest component of the gradient with respect to
  the original weights and biases is at most `tol` (or f stops decreasing, relative 64·eps).

A grid of penalties is fitted strongest first, each fit warm-started from the previous one
(as `LogisticRegression(warm_start=True)`), or all at once (`batched`); a fit that stops without
converging says so (`ProbeFit.warning`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.heads.losses import IGNORE, Criterion
from mmcache.heads.metrics import better

if TYPE_CHECKING:
    from mmcache.heads.data import CachedData
    from mmcache.heads.linear import LinearHead

# L2 penalties (on the mean loss) tried by default, strongest first so each fit warm-starts the next.
LBFGS_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)
FTOL = 64 * np.finfo(float).eps  # scikit-learn's relative-reduction stop of L-BFGS-B
MAXLS = 50  # scikit-learn's line-search limit (scipy's default is 20)


def sklearn_C(l2: float, n_labelled: int, num_classes: int) -> float:
    """scikit-learn's `C` for the penalty `l2` on the mean loss over `n_labelled` rows.

    Multinomial (3+ classes): mean CE + l2/2 ‖W‖² = mean CE + 1/(2 C n) ‖W‖², so C = 1/(l2 n).
    Binary: the two softmax rows are -w/2 and w/2 at the optimum, so the penalty is l2/4 ‖w‖² and C = 2/(l2 n).
    """
    if n_labelled <= 0:
        return float("nan")
    return (2.0 if num_classes == 2 else 1.0) / (l2 * n_labelled)


@dataclass
class ProbeFit:
    """One fit of the probe at one penalty: the solution and how the solver stopped."""

    l2: float
    x: np.ndarray  # flat parameters on the standardised features (LogisticProbe.weights reads them)
    loss: float  # the penalised training objective at x
    iters: int
    converged: bool
    grad_max: float  # largest |gradient component| with respect to the original weights and biases
    message: str
    seconds: float
    max_iter: int
    tol: float

    @property
    def warning(self) -> str | None:
        """A one-line warning when the solver stopped before converging, else None."""
        if self.converged:
            return None
        return (f"warning: lbfgs did not converge at l2={self.l2:g} ({self.message.strip().rstrip('.').lower()}; "
                f"{self.iters} of at most {self.max_iter} iterations; largest gradient {self.grad_max:.2g} > "
                f"tol {self.tol:g}): the metrics of this penalty may be off; allow more iterations or a larger tol")


class LogisticProbe:
    """Full-batch L2-penalised logistic regression of fixed features `z` [n,d] on one or more tasks.

    `targets`: task -> [n] long (-100 = unlabelled); `num_classes`: task -> K; `crit` supplies the
    per-task loss (cross-entropy, or its options: class weights, label smoothing, focal, distillation
    with `teacher` [n,K]). Rows without a label for any task are left out. Parameters of task t are
    W_t [K,d] and b_t [K] (a 2-class task: w [1,d] and b [1], see the module doc), kept for the
    standardised features. The plain cross-entropy (with or without class weights) has its
    gradient written out; other criteria go through autograd.
    """

    def __init__(self, z: torch.Tensor, targets: dict[str, torch.Tensor], num_classes: dict[str, int],
                 crit: Criterion, teacher: torch.Tensor | None = None, tol: float = 1e-4, max_iter: int = 500) -> None:
        if any(p.requires_grad for p in crit.parameters()):
            raise MMCacheError("--solver lbfgs fits the classifiers alone: a loss with learned weights "
                               "(loss option uncertainty=true) needs --solver adam")
        if not tol > 0 or max_iter < 1:
            raise MMCacheError(f"lbfgs: tol={tol} must be > 0 and max_iter={max_iter} at least 1")
        keep = torch.zeros(len(z), dtype=torch.bool, device=z.device)
        for y in targets.values():
            keep |= y != IGNORE
        if not keep.any():
            raise MMCacheError("lbfgs: no train row has a label; the probe has nothing to fit")
        # float64 as scikit-learn's lbfgs (line searches need f to more digits than float32 has); MPS has none.
        self.dtype = torch.float32 if z.device.type == "mps" else torch.float64
        z = z[keep].to(self.dtype)
        if not torch.isfinite(z).all():
            raise MMCacheError("lbfgs: the train features hold NaN or inf values; re-extract the store or "
                               "drop those rows")
        self.mean = z.mean(0)
        std = z.std(0, correction=0)
        self.scale = torch.where(std > 0, std, torch.ones_like(std))  # a constant column stays as it is
        self.zs = (z - self.mean) / self.scale
        self.targets = {t: y[keep] for t, y in targets.items()}
        self.teacher = teacher[keep] if teacher is not None else None
        self.num_classes = dict(num_classes)
        # Classes with labelled train rows, per task: scikit-learn fits those only (a class without rows gets no
        # weights there; here its unpenalised bias runs to -inf and its weights to 0, the same model), so its
        # binary / multinomial C follows how many there are.
        self.present = {t: int(torch.unique(y[y != IGNORE]).numel()) for t, y in self.targets.items()}
        for t, k in self.present.items():
            if k == 1:
                name = int(torch.unique(self.targets[t][self.targets[t] != IGNORE])[0])
                raise MMCacheError(f"lbfgs: every labelled train row of task {t!r} is of class index {name}; a logistic "
                                   "regression needs train rows of at least two classes (as scikit-learn's)")
        self.crit = crit
        self.tol, self.max_iter = float(tol), int(max_iter)
        self.d = z.shape[1]
        self.rows = {t: 1 if k == 2 else k for t, k in self.num_classes.items()}
        self.size = sum(r * (self.d + 1) for r in self.rows.values())
        self.row_weights = self._cross_entropy_weights()
        self._mean_np = self.mean.to("cpu", torch.float64).numpy()
        self._scale_np = self.scale.to("cpu", torch.float64).numpy()

    def _cross_entropy_weights(self) -> dict[str, torch.Tensor] | None:
        """Per task, each row's weight in the mean cross-entropy (0 unlabelled, else its class weight),
        normalised to sum 1; None when the criterion is not a plain (class-weighted) cross-entropy."""
        crit = self.crit
        kd = self.teacher is not None and crit.kd_weight(0) > 0
        if type(crit) is not Criterion or crit.label_smoothing or crit.log_vars is not None or kd:
            return None
        out = {}
        for t, y in self.targets.items():
            w = (y != IGNORE).to(self.dtype)
            cw = getattr(crit, f"w_{t}", None)
            if cw is not None:
                w = w * cw.to(w.device, self.dtype)[y.clamp(min=0)]
            out[t] = w / w.sum().clamp(min=torch.finfo(self.dtype).tiny)
        return out

    def n_labelled(self, task: str) -> int:
        """Train rows labelled for `task` (the n of its scikit-learn C)."""
        return int((self.targets[task] != IGNORE).sum())

    def sklearn_C(self, l2: float, task: str) -> float:
        """scikit-learn's C of penalty `l2` for `task`: binary when its train labels hold two classes (also of a
        task with more classes, some without train rows, as scikit-learn fits only the classes it sees)."""
        return sklearn_C(l2, self.n_labelled(task), self.present[task] or self.num_classes[task])

    def _blocks(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Flat parameters [..., size] -> task -> (W [..., r, d], b [..., r]) on the standardised features
        (r = 1 for 2 classes)."""
        out, at = {}, 0
        for t, r in self.rows.items():
            p = x[..., at:at + r * (self.d + 1)].unflatten(-1, (r, self.d + 1))
            at += r * (self.d + 1)
            out[t] = (p[..., :self.d], p[..., self.d])
        return out

    def _softmax_rows(self, t: str, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A 2-class task's (w, b) as the softmax rows (-w/2, w/2); other tasks unchanged."""
        if self.num_classes[t] != 2:
            return w, b
        return torch.cat([-0.5 * w, 0.5 * w], -2), torch.cat([-0.5 * b, 0.5 * b], -1)

    def weights(self, x: np.ndarray | torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """task -> (W [K,d], b [K]) of the K-way softmax on the original features."""
        xt = torch.as_tensor(x).to(self.zs.device, self.dtype)
        out = {}
        for t, (w, b) in self._blocks(xt).items():
            w, b = self._softmax_rows(t, w, b)
            w = w / self.scale
            out[t] = (w, b - w @ self.mean)
        return out

    def objective(self, x: torch.Tensor, l2: float) -> torch.Tensor:
        """The penalised training objective at flat (standardised) parameters x, through the criterion."""
        logits, penalty = {}, x.new_zeros(())
        for t, (w, b) in self._blocks(x).items():
            w, b = self._softmax_rows(t, w, b)
            logits[t] = torch.addmm(b, self.zs, w.T)
            penalty = penalty + ((w / self.scale) ** 2).sum()
        loss, _ = self.crit(logits, self.targets, self.teacher, 0)
        return loss + 0.5 * l2 * penalty

    def _cross_entropy_loss_grad(self, x: torch.Tensor, l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectives [G] and gradients [G, size] of G parameter vectors x [G, size] at penalties l2 [G]:
        the (class-weighted) mean cross-entropy + l2/2 ||W||^2, written out: d/dlogits = weight_i
        (softmax_i - onehot_i); a 2-class w gets (dW_1 - dW_0)/2. One matrix product for all G."""
        assert self.row_weights is not None
        G, n = x.shape[0], self.zs.shape[0]
        f = x.new_zeros(G)
        grads = []
        for t, (w, b) in self._blocks(x).items():
            w, b = self._softmax_rows(t, w, b)  # [G,K,d], [G,K]
            K = w.shape[1]
            y, s = self.targets[t].clamp(min=0), self.row_weights[t]
            logits = torch.addmm(b.reshape(-1), self.zs, w.reshape(G * K, self.d).T).view(n, G, K)
            lse = torch.logsumexp(logits, -1)  # [n,G]
            picked = logits.gather(2, y[:, None, None].expand(n, G, 1)).squeeze(2)
            w_orig = w / self.scale
            f = f + s @ (lse - picked) + 0.5 * l2 * (w_orig ** 2).sum((1, 2))
            r = torch.exp(logits - lse[..., None])
            r.scatter_add_(2, y[:, None, None].expand(n, G, 1), -torch.ones(n, G, 1, dtype=r.dtype, device=r.device))
            r *= s[:, None, None]
            gw = (r.reshape(n, G * K).T @ self.zs).view(G, K, self.d) + l2[:, None, None] * w_orig / self.scale
            g = torch.cat([gw, r.sum(0)[..., None]], -1)  # [G,K,d+1]
            if self.num_classes[t] == 2:
                g = 0.5 * (g[:, 1:] - g[:, :1])
            grads.append(g.reshape(G, -1))
        return f, torch.cat(grads, 1)

    def loss_grad_many(self, xs: np.ndarray, l2s: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """(objectives [G], gradients [G, size]) at G flat parameter vectors, as numpy float64 for scipy."""
        xt = torch.from_numpy(np.asarray(xs, dtype=np.float64)).to(device=self.zs.device, dtype=self.dtype)
        if self.row_weights is None:
            out = [self._autograd_loss_grad(x, l2) for x, l2 in zip(xt, l2s, strict=True)]
            f, g = torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
        else:
            f, g = self._cross_entropy_loss_grad(xt, torch.tensor(list(l2s), dtype=self.dtype, device=xt.device))
        return f.detach().to("cpu", torch.float64).numpy(), g.detach().to("cpu", torch.float64).numpy()

    def _autograd_loss_grad(self, x: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            f = self.objective(x, l2)
            (g,) = torch.autograd.grad(f, x)
        return f.detach(), g

    def loss_grad(self, x: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
        """(objective, gradient) at flat parameters x, as numpy float64 for scipy."""
        f, g = self.loss_grad_many(np.asarray(x, dtype=np.float64)[None], [l2])
        return float(f[0]), g[0]

    def original_grad_max(self, g: np.ndarray) -> float:
        """Largest |component| of a gradient with respect to the original weights and biases:
        W' = W * scale and b' = b + W . mean, so dW = dW' * scale + db' * mean and db = db'."""
        out, at = 0.0, 0
        for r in self.rows.values():
            blk = g[at:at + r * (self.d + 1)].reshape(r, self.d + 1)
            at += r * (self.d + 1)
            gw, gb = blk[:, :self.d], blk[:, self.d]
            gw_orig = gw * self._scale_np + gb[:, None] * self._mean_np
            out = max(out, float(np.abs(gw_orig).max()), float(np.abs(gb).max()))
        return out

    def _precondition(self, l2: float) -> np.ndarray:
        """Per-parameter factor c of the coordinates L-BFGS works in (x = c * p), so that the curvature
        along each is about 1: the cross-entropy's is at most 1/4 per unit of feature variance, the
        penalty's l2 per weight; so std / sqrt(std^2/4 + l2) for a weight and 2 for a bias."""
        c = self._scale_np / np.sqrt(self._scale_np ** 2 / 4 + l2)
        return np.concatenate([np.tile(np.append(c, 2.0), r) for r in self.rows.values()])

    def _minimize(self, l2: float, x0: np.ndarray, loss_grad: Callable[[np.ndarray], tuple[float, np.ndarray]]
                  ) -> ProbeFit:
        """scipy's L-BFGS-B from x0 in the preconditioned coordinates, stopped when the gradient with respect
        to the original parameters is within tol (the per-iteration callback) or f stops decreasing."""
        t0 = time.perf_counter()
        c = self._precondition(l2)
        last: dict[str, Any] = {}
        done = [False]

        def fg(x: np.ndarray) -> tuple[float, np.ndarray]:
            f, g = loss_grad(x)
            last.update(x=x, f=f, g=g)
            return f, g

        def fg_scaled(p: np.ndarray) -> tuple[float, np.ndarray]:
            f, g = fg(c * p)
            return f, c * g

        def check(intermediate_result: Any) -> None:  # scipy's per-iteration callback
            x = c * intermediate_result.x
            if not np.array_equal(last["x"], x):
                fg(x)
            if self.original_grad_max(last["g"]) <= self.tol:
                done[0] = True
                raise StopIteration

        f0, g0 = fg(x0)
        if self.original_grad_max(g0) <= self.tol:  # already optimal (e.g. a warm start at the same penalty)
            res: Any = {"x": x0 / c, "fun": f0, "nit": 0, "success": True, "message": "converged"}
        else:  # gtol 0: the stop on the original gradient is `check`'s
            res = minimize(fg_scaled, x0 / c, method="L-BFGS-B", jac=True, callback=check,
                           options={"maxiter": self.max_iter, "maxls": MAXLS, "gtol": 0.0, "ftol": FTOL})
        x = c * np.asarray(res["x"], dtype=np.float64)
        if not np.array_equal(last["x"], x):
            fg(x)
        return ProbeFit(l2=float(l2), x=x, loss=float(last["f"]), iters=int(res["nit"]),
                        converged=bool(done[0] or res["success"]), grad_max=self.original_grad_max(last["g"]),
                        message=str(res["message"]), seconds=time.perf_counter() - t0, max_iter=self.max_iter,
                        tol=self.tol)

    def fit(self, l2: float, x0: np.ndarray | None = None) -> ProbeFit:
        """Minimise the objective at penalty `l2` from x0 (zeros by default), as scikit-learn's lbfgs does."""
        x0 = np.zeros(self.size) if x0 is None else np.asarray(x0, dtype=np.float64)
        with _eval_mode(self.crit):
            return self._minimize(l2, x0, lambda x: self.loss_grad(x, l2))

    def fit_grid(self, grid: Sequence[float], batched: bool = False) -> list[ProbeFit]:
        """One fit per penalty in `grid`, in that order. Sequential (the default): each warm-started from
        the previous solution, as scikit-learn's warm_start. Batched: every penalty from zero at once, one
        L-BFGS-B per penalty (its own line searches and stop) with the objectives evaluated together, one
        matrix product for all: faster where that product is memory- or launch-bound, and the same optima,
        but at the default tol each fit stops at another point of the optimum's flat valley than the
        warm-started one, so a validation tie can go the other way. Batching needs the written-out
        gradient (plain cross-entropy); other criteria are fitted one by one."""
        grid = [float(v) for v in grid]
        if not batched or self.row_weights is None or len(grid) < 2:
            fits: list[ProbeFit] = []
            for l2 in grid:
                fits.append(self.fit(l2, fits[-1].x if fits else None))
            return fits
        with _eval_mode(self.crit):
            return _Lockstep(self, grid).run()

    @torch.no_grad()
    def load_into(self, fit: ProbeFit, classifiers: nn.ModuleDict) -> None:
        """Copy a fit's weights into the head's per-task nn.Linear classifiers."""
        for t, (w, b) in self.weights(fit.x).items():
            clf = classifiers[t]
            if not isinstance(clf, nn.Linear) or clf.weight.shape != w.shape or clf.bias is None:
                raise MMCacheError(f"lbfgs: classifier {t!r} is not a Linear layer of shape {tuple(w.shape)} with bias")
            clf.weight.copy_(w)
            clf.bias.copy_(b)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


class _Lockstep:
    """The fits of a grid in lockstep: one thread per penalty runs scipy's L-BFGS-B (its own line
    searches, history and stop), and whenever every running fit waits for an evaluation, the main
    thread evaluates them all in one batched computation."""

    def __init__(self, probe: LogisticProbe, grid: list[float]) -> None:
        self.probe, self.grid = probe, grid
        self.cv = threading.Condition()
        self.pending: dict[int, np.ndarray] = {}
        self.results: dict[int, tuple[float, np.ndarray] | BaseException] = {}
        self.running = set(range(len(grid)))
        self.fits: list[ProbeFit | None] = [None] * len(grid)
        self.errors: list[BaseException] = []

    def _evaluate(self, i: int, x: np.ndarray) -> tuple[float, np.ndarray]:
        with self.cv:
            self.pending[i] = x
            self.cv.notify_all()
            self.cv.wait_for(lambda: i in self.results)
            out = self.results.pop(i)
        if isinstance(out, BaseException):
            raise out
        return out

    def _worker(self, i: int) -> None:
        try:
            self.fits[i] = self.probe._minimize(self.grid[i], np.zeros(self.probe.size),
                                                lambda x: self._evaluate(i, x))
        except BaseException as e:  # handed to the main thread, raised there
            self.errors.append(e)
        finally:
            with self.cv:
                self.running.discard(i)
                self.cv.notify_all()

    def run(self) -> list[ProbeFit]:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(len(self.grid))]
        for t in threads:
            t.start()
        while True:
            with self.cv:
                self.cv.wait_for(lambda: all(i in self.pending for i in self.running))
                if not self.running:
                    break
                batch, self.pending = self.pending, {}
            idx = sorted(batch)
            try:
                f, g = self.probe.loss_grad_many(np.stack([batch[i] for i in idx]), [self.grid[i] for i in idx])
                out: dict[int, tuple[float, np.ndarray] | BaseException] = {
                    i: (float(f[j]), g[j]) for j, i in enumerate(idx)}
            except BaseException as e:
                out = dict.fromkeys(idx, e)
            with self.cv:
                self.results.update(out)
                self.cv.notify_all()
        for t in threads:
            t.join()
        if self.errors:
            raise self.errors[0]
        seconds = time.perf_counter() - t0
        fits = [fit for fit in self.fits if fit is not None]
        for fit in fits:
            fit.seconds = seconds / len(fits)  # the grid's wall time, shared
        return fits


@dataclass
class GridResult:
    """The fits of a penalty grid and the one chosen on validation (already loaded into the head)."""

    fits: list[ProbeFit]
    curves: list[dict[str, Any]]  # one row per penalty, in grid order
    best: int  # index of the chosen fit
    value: float  # its validation metric
    l2: float
    sklearn_C: float  # scikit-learn's C of the chosen penalty for the selection task
    warnings: list[str] = field(default_factory=list)


def fit_l2_grid(head: LinearHead, crit: Criterion, data: CachedData, sel_task: str, sel_metric: str,
                score: Callable[[dict[str, torch.Tensor]], dict[str, float]], grid: Sequence[float] = LBFGS_GRID,
                tol: float = 1e-4, max_iter: int = 500, quiet: bool = False, batched: bool = False) -> GridResult:
    """Fit the `linear` head (D=0) at each penalty of `grid` on the train split and keep the best on val.

    `score(val_logits)` returns the validation metrics of one fit (`sel_metric` among them, and
    `loss` when known); the chosen fit's weights are left in `head.classifiers`. Warnings (a fit
    that did not converge; the best penalty at an end of the grid) are printed to stderr, the
    second unless `quiet`, and returned. `batched`: see `LogisticProbe.fit_grid`.
    """
    if not grid:
        raise MMCacheError("lbfgs: the L2 grid is empty; give at least one penalty (--l2-grid)")
    if any(not lam > 0 for lam in grid):
        raise MMCacheError(f"lbfgs: every L2 penalty must be > 0 (got {list(grid)})")
    train_idx, val_idx = data.split_index["train"], data.split_index["val"]
    was = head.training
    head.eval()
    with torch.no_grad():  # D=0: the fused features carry no parameters, so compute them once
        z_train = head.fused(data.batch(train_idx))
        z_val = head.fused(data.batch(val_idx))
    teacher = data.teacher[train_idx] if data.teacher is not None else None
    probe = LogisticProbe(z_train, {t: data.targets[t][train_idx] for t in data.tasks}, data.tasks, crit,
                          teacher=teacher, tol=tol, max_iter=max_iter)
    fits = probe.fit_grid(list(grid), batched=batched)
    curves: list[dict[str, Any]] = []
    best: tuple[float, int] | None = None
    for i, fit in enumerate(fits):
        probe.load_into(fit, head.classifiers)
        with torch.no_grad():
            vm = score({t: c(z_val) for t, c in head.classifiers.items()})
        value = vm.get(sel_metric, float("nan"))
        curves.append({"fit": i + 1, "l2": fit.l2, "sklearn_C": probe.sklearn_C(fit.l2, sel_task), "iters": fit.iters,
                       "converged": fit.converged, "train_loss": fit.loss,
                       **{f"val_{k}": v for k, v in vm.items()}, "seconds": fit.seconds})
        if not math.isnan(value) and (best is None or better(sel_metric, value, best[0])):
            best = (value, i)
    head.train(was)
    if best is None:
        raise MMCacheError(f"validation {sel_metric} was undefined for every penalty; choose another --select metric")
    warnings = [w for w in (f.warning for f in fits) if w]
    for w in warnings:
        print(w, file=sys.stderr)
    chosen = fits[best[1]]
    if len(grid) > 1 and chosen.l2 in (grid[0], grid[-1]):
        msg = (f"warning: the best L2 penalty {chosen.l2:g} is at the end of the grid {list(grid)}; "
               "extend it (--l2-grid) to be sure the optimum is inside")
        warnings.append(msg)
        if not quiet:
            print(msg, file=sys.stderr)
    probe.load_into(chosen, head.classifiers)
    return GridResult(fits=fits, curves=curves, best=best[1], value=best[0], l2=chosen.l2,
                      sklearn_C=probe.sklearn_C(chosen.l2, sel_task), warnings=warnings)
