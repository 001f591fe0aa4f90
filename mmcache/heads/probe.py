"""The full-batch logistic-regression probe behind `heads train --solver lbfgs`.

It fits scikit-learn's `LogisticRegression(solver="lbfgs")` objective, with torch (binary tasks on the CPU:
numpy) computing it:

- objective, per task: the criterion's mean loss over the task's labelled train rows
  + (l2/2)·‖W‖² (biases not penalised), on the features' device: parameters, per-row losses and every sum in
  float64, the two matrix products of an evaluation (logits, and the features' transpose times the residuals)
  in the features' own dtype, read where they lie (no copy): float32 features give float32 products, as
  scikit-learn's lbfgs computes on float32 input; a `tol` below `F32_TOL` reads them as float64. Binary tasks
  on the CPU evaluate a block of rows at a time (both products of a block while it is in the core's cache), so
  an evaluation reads the features from memory once rather than twice: the products are matrix-vector ones,
  bound by that reading;
- a 2-class task is fitted as binary logistic regression (one weight vector w, stored as the
  rows -w/2, w/2 of the 2-class softmax): the same optimum as penalising both softmax rows, and
  scikit-learn's own parameterisation. Hence the scikit-learn `C` of a penalty l2 on n labelled
  rows is 1/(l2·n) with three or more classes and 2/(l2·n) with two (`sklearn_C`), counting the classes
  the train labels hold, as scikit-learn does (a class without train rows gets no weights there; here its
  unpenalised bias runs to -inf, the same model); train labels of one class are refused, as there;
- solver: `scipy.optimize.minimize(method="L-BFGS-B")`, the routine scikit-learn calls, with its
  options (`maxls` 50, `ftol` 64·eps, `maxiter`), started at zero. It runs in preconditioned
  coordinates (a change of the parameters, never a copy of the features): each feature centred over the
  train rows and its weight scaled by
  1/sqrt(var/4 + l2), about the inverse square root of the objective's curvature along it, so
  that badly scaled features converge about as fast as standardised ones (the objective and its
  optimum are unchanged);
- convergence: as scikit-learn's `tol`, the largest component of the gradient with respect to
  the original weights and biases is at most `tol` (or f stops decreasing, relative 64·eps).

A grid of penalties is fitted strongest first, each fit warm-started from the previous one
(as `LogisticRegression(warm_start=True)`; from the third on, from the path through the last two solutions
extrapolated in log(l2) when that point's objective is the lower), or all at once (`batched`). The objective
is linear in l2, so a warm start's objective and gradient are the previous fit's last evaluation moved to the
new penalty (`LogisticProbe.penalty`), with no pass over the features, and a previous solution that already
meets tol there is kept without an iteration, as scikit-learn's warm start stops at once; a fit that
stops without converging says so (`ProbeFit.warning`). The same optima and the same stop; the features must
be in memory (`fit_l2_grid` refuses, suggesting `--solver adam`, when they cannot be).
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
from scipy.special import expit
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
# The smallest tol fitted with float32 products over float32 features: they give the objective and gradient to
# about 1e-7 of their scale, so a stricter tol reads the features as float64 (a float64 copy of them).
F32_TOL = 1e-5
EVAL_ROWS = 8192  # rows fused at a time when the probe gathers its features
# Bytes of features per block of the CPU evaluation (`LogisticProbe._blocked_products`): small enough for a block
# read by the first product to still be in the core's cache when the second one reads it.
BLOCK_BYTES = 1 << 19


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
    grad: np.ndarray | None = field(default=None, repr=False)  # the objective's gradient at x (flat, as x)

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
        # Parameters, objective and gradient sums in float64 (MPS has none); the features stay in their own dtype
        # (float16 computes as float32): the two matrix products of an evaluation read them as they are, as
        # scikit-learn's lbfgs reads float32 features in float32. No standardised copy: the standardised
        # coordinates are a change of the parameters (`_raw`), never of the features.
        self.dtype = torch.float32 if z.device.type == "mps" else torch.float64
        if not bool(keep.all()):
            z = z[keep]
        if z.dtype not in (torch.float32, torch.float64):
            z = z.float()
        if self.dtype == torch.float32:
            z = z.float()
        elif tol < F32_TOL:  # more digits than float32 products give: the features in float64 (a copy)
            z = z.double()
        self.z = z
        self.mean, var = self._moments(z)
        std = var.sqrt()
        self.scale = torch.where(std > 0, std, torch.ones_like(std))  # a constant column stays as it is
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
        # Binary tasks on the CPU: the written-out evaluation's two products are matrix-vector ones, bound by reading
        # the features, so it reads them once, a block of rows at a time (`_blocked_products`). With more logits per
        # row (3+ classes) the products are bound by arithmetic and run over the whole matrix, as on other devices.
        self.blocked = (z.device.type == "cpu" and z.is_contiguous() and self.row_weights is not None
                        and all(r == 1 for r in self.rows.values()))
        self.block_rows = max(16, BLOCK_BYTES // max(1, self.d * z.element_size()))
        if self.blocked:  # per row and task, in the order of the parameters: the sign 1 - 2y, the row weight, both
            assert self.row_weights is not None
            self._z_np = z.numpy()
            q = np.stack([1.0 - 2.0 * (self.targets[t] == 1).double().numpy() for t in self.rows], 1)
            s = np.stack([self.row_weights[t].numpy() for t in self.rows], 1)
            self._np_targets = (q, s, s * q)

    def _moments(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and variance over the rows of z, as the probe's dtype, with sums in the features' dtype
        over a block of rows and float64 across blocks (they only choose the coordinates the solver works in, so
        float32's digits do); refuses NaN or inf features. On the CPU one pass (`_moments_blocked`); elsewhere two,
        as matrix-vector products."""
        n = z.shape[0]
        if z.device.type == "cpu":
            mean, var = (torch.from_numpy(v) for v in _moments_blocked(z.numpy(), BLOCK_BYTES))
        else:
            ones = z.new_ones(min(n, 4096))
            mean = z.new_zeros(z.shape[1])
            for a in range(0, n, len(ones)):
                blk = z[a:a + len(ones)]
                mean += torch.mv(blk.T, ones[:len(blk)])
            mean /= n
            sq = torch.zeros_like(mean)
            for a in range(0, n, len(ones)):
                blk = z[a:a + len(ones)] - mean
                sq += torch.mv(blk.mul_(blk).T, ones[:len(blk)])
            var = sq / n
        if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
            if not bool(torch.isfinite(z).all()):
                raise MMCacheError("lbfgs: the train features hold NaN or inf values; re-extract the store or "
                                   "drop those rows")
            var, mean = torch.var_mean(z.to(self.dtype), 0, correction=0)  # finite, but too large for float32
        return mean.to(self.dtype), var.to(self.dtype)

    def _raw(self, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters on the standardised features -> the same model on the original ones: logits
        zs @ w + b = z @ (w / scale) + (b - (w / scale) . mean)."""
        w = w / self.scale
        return w, b - w @ self.mean

    def _logits(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """z @ w.T + b [n, R] for raw w [R, d], b [R] (float64): the product in the features' dtype, the
        result in float64."""
        md = self.z.dtype
        return torch.addmm(b.to(md), self.z, w.T.to(md)).to(self.dtype)

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
        xt = torch.as_tensor(x).to(self.z.device, self.dtype)
        return {t: self._raw(*self._softmax_rows(t, w, b)) for t, (w, b) in self._blocks(xt).items()}

    def objective(self, x: torch.Tensor, l2: float) -> torch.Tensor:
        """The penalised training objective at flat (standardised) parameters x, through the criterion."""
        logits, penalty = {}, x.new_zeros(())
        for t, (w, b) in self._blocks(x).items():
            w, b = self._raw(*self._softmax_rows(t, w, b))
            logits[t] = self._logits(w, b)
            penalty = penalty + (w ** 2).sum()
        loss, _ = self.crit(logits, self.targets, self.teacher, 0)
        return loss + 0.5 * l2 * penalty

    def _cross_entropy_loss_grad(self, x: torch.Tensor, l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectives [G] and gradients [G, size] of G parameter vectors x [G, size] at penalties l2 [G]:
        the (class-weighted) mean cross-entropy + l2/2 ||W||^2, written out: d/dlogits = weight_i
        (softmax_i - onehot_i). A 2-class task computes its one logit m (the softmax logits are -m/2, m/2), so
        its gradient is weight_i (sigmoid(m_i) - y_i) and its penalty l2/4 ||w||^2. Two matrix products over the
        features for all G and tasks: the logits and z.T @ residuals, in the features' dtype (sums in float64).
        Binary tasks on the CPU are evaluated by `_binary_loss_grad`, the same objective a block of rows at a
        time."""
        assert self.row_weights is not None
        G, n, d, md = x.shape[0], self.z.shape[0], self.d, self.z.dtype
        raw = {t: self._raw(w, b) for t, (w, b) in self._blocks(x).items()}  # [G,r,d], [G,r] on the original features
        wcat = torch.cat([w.reshape(-1, d) for w, _ in raw.values()])
        bcat = torch.cat([b.reshape(-1) for _, b in raw.values()])
        # [R,d] @ [d,n]: one pass over the features (faster than z @ W.T for a few rows R)
        m_all = torch.mm(wcat.to(md), self.z.T).to(self.dtype).T + bcat  # [n, R]
        rr = self._residuals(m_all, G)  # [n, R]
        gz = torch.mm(rr.T.to(md).contiguous(), self.z).to(self.dtype)  # z.T r on the original features, [R, d]
        f = x.new_zeros(G)
        at = 0
        for t, (w, _) in raw.items():
            r = self.rows[t]
            mt = m_all[:, at:at + G * r].reshape(n, G, r)
            at += G * r
            y, s = self.targets[t].clamp(min=0), self.row_weights[t]
            if r == 1:  # -log p(y) = softplus(m) - y m for the pair (-m/2, m/2)
                m = mt[..., 0]
                f = f + s @ (torch.nn.functional.softplus(m) - (y == 1).to(self.dtype)[:, None] * m)
                f = f + 0.25 * l2 * (w ** 2).sum((1, 2))
            else:
                picked = mt.gather(2, y[:, None, None].expand(n, G, 1)).squeeze(2)
                f = f + s @ (torch.logsumexp(mt, -1) - picked) + 0.5 * l2 * (w ** 2).sum((1, 2))
        gb_all = rr.sum(0)
        grads, at = [], 0
        for t, (w, _) in raw.items():
            r = self.rows[t]
            gzt, gb = gz[at:at + G * r].view(G, r, d), gb_all[at:at + G * r].view(G, r)
            at += G * r
            pg = (0.5 if r == 1 else 1.0) * l2[:, None, None] * w  # the penalty's gradient
            # on the standardised features: zs.T r = (z.T r - mean * sum r) / scale
            gw = (gzt - gb[..., None] * self.mean + pg) / self.scale
            grads.append(torch.cat([gw, gb[..., None]], -1).reshape(G, -1))
        return f, torch.cat(grads, 1)

    def _residuals(self, m_all: torch.Tensor, G: int) -> torch.Tensor:
        """d(mean loss)/d(logits) [n, R] from the logits m_all [n, R] of G parameter vectors (torch)."""
        n, res, at = m_all.shape[0], [], 0
        for t, r in self.rows.items():
            mt = m_all[:, at:at + G * r].reshape(n, G, r)
            at += G * r
            y, s = self.targets[t].clamp(min=0), self.row_weights[t]  # type: ignore[index]
            if r == 1:
                rt = (torch.sigmoid(mt) - (y == 1).to(self.dtype)[:, None, None]) * s[:, None, None]
            else:
                rt = torch.softmax(mt, -1)
                rt.scatter_add_(2, y[:, None, None].expand(n, G, 1),
                                -torch.ones(n, G, 1, dtype=rt.dtype, device=rt.device))
                rt *= s[:, None, None]
            res.append(rt.reshape(n, G * r))
        return torch.cat(res, 1)

    def _signs(self, G: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row and logit column [n, T*G] (T binary tasks, each for G parameter vectors, task-major): the sign
        q = 1 - 2y, the row weight s, and s*q."""
        q, s, sq = self._np_targets
        if G == 1:
            return q, s, sq
        return np.repeat(q, G, 1), np.repeat(s, G, 1), np.repeat(sq, G, 1)

    def _binary_loss_grad(self, xs: np.ndarray, l2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`_cross_entropy_loss_grad` of binary tasks on the CPU, in numpy (a few calls on small arrays cost less
        there than as torch calls): objectives [G] and gradients [G, size] at G flat parameter vectors xs and
        penalties l2 [G]. With the sign q = 1 - 2y of a row, -log p(y) = softplus(q m) and its derivative in m is
        q sigmoid(q m) = sigmoid(m) - y, each without cancellation; the products in `_blocked_products`."""
        G, T, d = xs.shape[0], len(self.rows), self.d
        p = xs.reshape(G, T, d + 1)
        w = p[..., :d] / self._scale_np  # [G, T, d], on the original features
        b = p[..., d] - w @ self._mean_np  # [G, T]
        q, s, sq = self._signs(G)
        m, r, gz = self._blocked_products(w.transpose(1, 0, 2).reshape(T * G, d), b.T.reshape(-1), q, sq)
        f = (s * np.logaddexp(0.0, q * m)).sum(0).reshape(T, G).sum(0) + 0.25 * l2 * (w * w).sum((1, 2))
        gb = r.sum(0, dtype=np.float64).reshape(T, G).T  # [G, T]
        gzt = gz.reshape(T, G, d).transpose(1, 0, 2)  # z.T r, [G, T, d]
        # on the standardised features: zs.T r = (z.T r - mean * sum r) / scale; the penalty's gradient l2/2 w
        gw = (gzt - gb[..., None] * self._mean_np + 0.5 * l2[:, None, None] * w) / self._scale_np
        return f, np.concatenate([gw, gb[..., None]], -1).reshape(G, -1)

    def _blocked_products(self, w: np.ndarray, b: np.ndarray, q: np.ndarray, sq: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The logits m = z w.T + b [n, R] (float64) of R weight vectors w [R, d], the residuals r = s q
        sigmoid(q m) [n, R] (in the features' dtype) and z.T r [R, d] (float64), a block of `block_rows` rows at
        a time: the block's logits, its residuals and its share of z.T r while the block is still in the core's
        cache, so an evaluation reads the features from memory once instead of twice. Both products in the
        features' dtype, as the whole-matrix ones; the blocks' shares of z.T r summed in float64."""
        z, B = self._z_np, self.block_rows
        wt = np.ascontiguousarray(w.T, dtype=z.dtype)  # [d, R]
        n, R = z.shape[0], wt.shape[1]
        m, r = np.empty((n, R)), np.empty((n, R), dtype=z.dtype)
        t, part, gz = np.empty((B, R)), np.empty((R, self.d), dtype=z.dtype), np.zeros((R, self.d))
        for a in range(0, n, B):
            zb = z[a:a + B]
            e = a + len(zb)
            tb = t[:e - a]
            np.add(zb @ wt, b, out=m[a:e])
            np.multiply(m[a:e], q[a:e], out=tb)
            expit(tb, out=tb)
            np.multiply(tb, sq[a:e], out=r[a:e])
            gz += np.matmul(r[a:e].T, zb, out=part)
        return m, r, gz

    def loss_grad_many(self, xs: np.ndarray, l2s: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """(objectives [G], gradients [G, size]) at G flat parameter vectors, as numpy float64 for scipy."""
        if self.blocked:
            return self._binary_loss_grad(np.asarray(xs, dtype=np.float64), np.asarray(l2s, dtype=np.float64))
        xt = torch.from_numpy(np.asarray(xs, dtype=np.float64)).to(device=self.z.device, dtype=self.dtype)
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

    def penalty(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """The objective's penalty per unit of l2 at flat parameters x, and its gradient: the objective is
        linear in l2, f(x; l2) = loss(x) + l2 * P(x), with P = 1/2 ||W||^2 on the original weights (1/4 ||w||^2 for
        a 2-class task's one weight vector), so moving a known evaluation to another penalty needs no pass over
        the features."""
        pen, grad, at = 0.0, np.zeros_like(x), 0
        for r in self.rows.values():
            k = 0.5 if r == 1 else 1.0
            blk = x[at:at + r * (self.d + 1)].reshape(r, self.d + 1)
            gblk = grad[at:at + r * (self.d + 1)].reshape(r, self.d + 1)
            at += r * (self.d + 1)
            w = blk[:, :self.d] / self._scale_np  # the original weights
            pen += 0.5 * k * float((w * w).sum())
            gblk[:, :self.d] = k * w / self._scale_np
        return pen, grad

    def _minimize(self, l2: float, x0: np.ndarray, loss_grad: Callable[[np.ndarray], tuple[float, np.ndarray]],
                  start: tuple[float, np.ndarray] | None = None) -> ProbeFit:
        """scipy's L-BFGS-B from x0 in the preconditioned coordinates, stopped when the gradient with respect
        to the original parameters is within tol (the per-iteration callback) or f stops decreasing. `start`:
        the objective and gradient at x0 when already known (the first point scipy evaluates, c * (x0 / c), is
        x0 to rounding), so that evaluation is not made again."""
        t0 = time.perf_counter()
        c = self._precondition(l2)
        last: dict[str, Any] = {}
        done = [False]

        def fg(x: np.ndarray) -> tuple[float, np.ndarray]:
            if "x" in last and np.array_equal(last["x"], x):  # the point just evaluated (scipy's first call)
                return last["f"], last["g"]
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

        p0 = x0 / c
        if start is not None:
            last.update(x=c * p0, f=float(start[0]), g=start[1])
        f0, g0 = fg(c * p0)  # the very point scipy evaluates first (c * p0), so that evaluation is not repeated
        if self.original_grad_max(g0) <= self.tol:  # already optimal (e.g. a warm start at the same penalty)
            res: Any = {"x": p0, "fun": f0, "nit": 0, "success": True, "message": "converged"}
        else:  # gtol 0: the stop on the original gradient is `check`'s
            res = minimize(fg_scaled, p0, method="L-BFGS-B", jac=True, callback=check,
                           options={"maxiter": self.max_iter, "maxls": MAXLS, "gtol": 0.0, "ftol": FTOL})
        x = c * np.asarray(res["x"], dtype=np.float64)
        if not np.array_equal(last["x"], x):
            fg(x)
        return ProbeFit(l2=float(l2), x=x, loss=float(last["f"]), iters=int(res["nit"]),
                        converged=bool(done[0] or res["success"]), grad_max=self.original_grad_max(last["g"]),
                        message=str(res["message"]), seconds=time.perf_counter() - t0, max_iter=self.max_iter,
                        tol=self.tol, grad=last["g"])

    def fit(self, l2: float, x0: np.ndarray | None = None,
            start: tuple[float, np.ndarray] | None = None) -> ProbeFit:
        """Minimise the objective at penalty `l2` from x0 (zeros by default), as scikit-learn's lbfgs does;
        `start`: the objective and gradient at x0, when known."""
        x0 = np.zeros(self.size) if x0 is None else np.asarray(x0, dtype=np.float64)
        with _eval_mode(self.crit):
            return self._minimize(l2, x0, lambda x: self.loss_grad(x, l2), start)

    def _start(self, fits: list[ProbeFit], l2: float) -> tuple[np.ndarray | None, tuple[float, np.ndarray] | None]:
        """The start of the fit at `l2` after `fits`, with the objective and gradient there: the previous solution
        (its last evaluation moved to the new penalty, `penalty`), or, after two, the solution path extrapolated
        linearly in log(l2) through the last two when its objective is the lower (one evaluation, which the fit
        then starts from). The previous solution stays the start when it already meets tol at `l2` (as
        scikit-learn's warm start, which then stops at once)."""
        if not fits:
            return None, None
        b = fits[-1]
        if b.grad is None:
            return b.x, None
        pb, gpb = self.penalty(b.x)
        at_b = (b.loss + (l2 - b.l2) * pb, b.grad + (l2 - b.l2) * gpb)
        if len(fits) < 2 or self.original_grad_max(at_b[1]) <= self.tol:
            return b.x, at_b
        a = fits[-2]
        if not (a.l2 > 0 and b.l2 > 0 and a.l2 != b.l2):
            return b.x, at_b
        t = (math.log(l2) - math.log(b.l2)) / (math.log(b.l2) - math.log(a.l2))
        guess = b.x + t * (b.x - a.x)
        with _eval_mode(self.crit):
            at_guess = self.loss_grad(guess, l2)
        return (guess, at_guess) if at_guess[0] < at_b[0] else (b.x, at_b)

    def fit_grid(self, grid: Sequence[float], batched: bool = False) -> list[ProbeFit]:
        """One fit per penalty in `grid`, in that order. Sequential (the default): each warm-started from the previous
        solution, as scikit-learn's warm_start (or the path extrapolated, `_start`). Batched: every penalty from
        zero at once, one L-BFGS-B per penalty (its own line searches and stop) with the objectives evaluated
        together, one matrix product for all: faster where that product is memory- or launch-bound, and the same
        optima, but at the default tol each fit stops at another point of the optimum's flat valley than the warm-
        started one, so a validation tie can go the other way. Batching needs the written-out gradient (plain cross-
        entropy); other criteria are fitted one by one."""
        grid = [float(v) for v in grid]
        if not batched or self.row_weights is None or len(grid) < 2:
            fits: list[ProbeFit] = []
            for l2 in grid:
                fits.append(self.fit(l2, *self._start(fits, l2)))
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


def _moments_blocked(z: np.ndarray, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and variance (float64) of z [n, d] in one pass: each block of rows' mean and sum of squared
    deviations M_b, merged block by block with the pairwise update of Chan, Golub and LeVeque (counts n_a, n_b and
    delta = mean_b - mean_a: M = M_a + M_b + delta^2 n_a n_b / (n_a + n_b)). A block's sums run in the features'
    dtype over its deviations from a shift s close to the mean (the first row, then the mean so far): with
    S1 = sum (z - s) and S2 = sum (z - s)^2, mean_b = s + S1/k and M_b = S2 - S1^2/k, so features far from zero
    relative to their spread keep their digits."""
    B = max(16, block_bytes // max(1, z.shape[1] * z.itemsize))
    ones = np.ones(B, dtype=z.dtype)
    count, mean, m2 = 0, np.zeros(z.shape[1]), np.zeros(z.shape[1])
    with np.errstate(over="ignore", invalid="ignore"):  # values too large for float32: the caller falls back
        for a in range(0, z.shape[0], B):
            blk = z[a:a + B]
            k = len(blk)
            shift = blk[0] if count == 0 else mean.astype(z.dtype)
            dev = blk - shift
            s1 = (ones[:k] @ dev).astype(np.float64)
            np.square(dev, out=dev)
            mb, m2b = shift + s1 / k, (ones[:k] @ dev) - s1 * s1 / k
            delta = mb - mean
            tot = count + k
            mean += delta * (k / tot)
            m2 += m2b + delta * delta * (count * k / tot)
            count = tot
    return mean, np.maximum(m2, 0.0) / count


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


def fused_rows(head: LinearHead, data: CachedData, idx: torch.Tensor, also: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The fused float32 features of rows `idx` as one matrix, filled a chunk of rows at a time (from memory or
    read from the stores), never a second copy. Full-batch L-BFGS needs the train rows in memory: when they
    and the rows of `also` cannot fit in what this process may use, one line naming the bytes and the Adam
    probe, before anything is read."""
    from mmcache.memory import available_bytes, gb

    width = sum(head.widths.values())
    need = (len(idx) + (len(also) if also is not None else 0)) * width * 4
    if data.device.type == "cpu":
        have = available_bytes()
        if need > have:
            raise MMCacheError(f"--solver lbfgs needs the fused train and val features in memory, {gb(need)} "
                               f"({need} bytes), but {gb(have)} ({have} bytes) are available; train the probe "
                               "with --solver adam, which streams its batches")
    out = torch.empty(len(idx), width, dtype=torch.float32, device=data.device)
    at = 0
    for chunk in data.chunks(idx, EVAL_ROWS):
        z = head.fused(chunk)
        out[at:at + len(z)] = z
        at += len(z)
    return out


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
        z_train = fused_rows(head, data, train_idx, val_idx)
        z_val = fused_rows(head, data, val_idx)
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
