"""PNG plots of runs and sweeps (matplotlib, no pyplot state; every figure at least 600 px on each side).

- `plot_curves`: a run's learning curves: train/val loss and the validation selection metric per epoch
  (per L2 penalty for the lbfgs probe), the chosen epoch marked (`curves.png` in every run folder);
- `plot_confusion`: scikit-learn's `ConfusionMatrixDisplay` with class names, each cell the share of its
  true class and the count (`confusion_<task>.png`);
- `plot_sweep`: grouped bars per config with error bars over seeds (and folds) (`<sweep>.png`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DPI = 100


def _matplotlib_home() -> None:
    """matplotlib keeps its font cache and config in MPLCONFIGDIR (default ~/.config/matplotlib and
    ~/.cache/matplotlib): unless the user set it, mmcache's own cache folder (`$XDG_CACHE_HOME/mmcache/matplotlib`)."""
    import os

    if "MPLCONFIGDIR" not in os.environ:
        from mmcache.extract.weights import user_cache_dir

        os.environ["MPLCONFIGDIR"] = str(user_cache_dir() / "matplotlib")


_matplotlib_home()  # before any import of matplotlib (this module imports it only inside its functions)
MIN_INCHES = 6.0  # 600 px at DPI


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(max(width, MIN_INCHES), max(height, MIN_INCHES)), dpi=DPI)


def _save(fig: Any, path: Path) -> Any:
    fig.savefig(path, dpi=DPI)
    return fig


def plot_curves(curves: list[dict[str, Any]], path: Path, metric: str | None, best: int | None = None,
                title: str = "") -> Any:
    """Train/val loss (left) and the validation `metric` (right) per epoch, with the chosen epoch marked;
    returns the figure (None without curves)."""
    if not curves:
        return None
    lbfgs = "epoch" not in curves[0] and "l2" in curves[0]
    xs = [r["l2"] if lbfgs else r.get("epoch", i + 1) for i, r in enumerate(curves)]
    fig = _figure(12, 6)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        ys = [_num(r.get(key)) for r in curves]
        if any(np.isfinite(ys)):
            ax_loss.plot(xs, ys, style, markersize=3, label=key.replace("_", " "))
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    col = f"val_{metric}" if metric else None
    if col and any(col in r for r in curves):
        ax_metric.plot(xs, [_num(r.get(col)) for r in curves], "-o", markersize=3, color="tab:green",
                       label=f"val {metric}")
    ax_metric.set_ylabel(f"val {metric}" if metric else "val metric")
    ax_metric.set_title(f"validation {metric}" if metric else "validation")
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel("L2 penalty" if lbfgs else "epoch")
        if lbfgs:
            ax.set_xscale("log")
        if best is not None and 1 <= best <= len(xs):
            ax.axvline(xs[best - 1], color="grey", linestyle="--", linewidth=1,
                       label=f"chosen {'fit' if lbfgs else 'epoch'} ({xs[best - 1]:g})")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None else float("nan")


def plot_confusion(cm: np.ndarray, names: list[str], path: Path, title: str) -> Any:
    """A confusion matrix (rows true, columns predicted) through scikit-learn's `ConfusionMatrixDisplay`:
    class names on both axes, each cell the share of its true class (colour and value) and the count;
    returns the figure."""
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.asarray(cm, dtype=np.int64)
    support = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, support, out=np.zeros(cm.shape, dtype=np.float64), where=support > 0)
    n = len(names)
    side = 2.0 + 0.9 * n
    fig = _figure(side + 1.5, side)
    ax = fig.subplots()
    disp = ConfusionMatrixDisplay(confusion_matrix=share, display_labels=names)
    disp.plot(ax=ax, cmap="Blues", values_format=".2f", xticks_rotation=45, colorbar=True, im_kw={"vmin": 0, "vmax": 1})
    for i in range(n):
        for j in range(n):
            disp.text_[i, j].set_text(f"{share[i, j]:.2f}\n({cm[i, j]})")
            disp.text_[i, j].set_fontsize(9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_sweep(summary: list[dict[str, Any]], columns: Sequence[str], path: Path, title: str = "") -> Any:
    """Grouped bars: one group per config, one bar per metric column, error bars = std over seeds (and folds);
    returns the figure (None when no config has a value)."""
    configs = [s for s in summary if any(isinstance(s.get(c), (int, float)) for c in columns)]
    cols = [c for c in columns if any(isinstance(s.get(c), (int, float)) for s in configs)]
    if not configs or not cols:
        return None
    n, k = len(configs), len(cols)
    fig = _figure(2.0 + 0.35 * n * (k + 1), 6)
    ax = fig.subplots()
    width = 0.8 / k
    x = np.arange(n)
    for j, c in enumerate(cols):
        means = [_num(s.get(c)) for s in configs]
        stds = [_num(s.get(f"{c}_std", 0.0)) for s in configs]
        ax.bar(x + (j - (k - 1) / 2) * width, means, width, yerr=np.nan_to_num(stds), capsize=3, label=c)
    ax.set_xticks(x, [str(s["config"]) for s in configs], rotation=30 if n > 3 else 0, ha="right" if n > 3 else "center",
                  fontsize=8)
    ax.set_xlabel("config")
    ax.set_ylabel("metric (mean ± std over runs)")
    ax.set_ylim(0, 1.05 if all(_num(s.get(c)) <= 1 for s in configs for c in cols) else None)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_robustness(result: dict[str, Any], path: Path) -> Any:
    """`heads robustness`: the selection metric against the perturbation level, one line per perturbation (noise,
    token dropout), and one marker per missing modality at level 1; the clean value as a dashed line."""
    metric = result["metric"]
    rows = result["rows"]
    fig = _figure(8, 6)
    ax = fig.subplots()
    for kind, style in (("noise", "-o"), ("token_dropout", "-s")):
        pts = [(r["level"], _num(r[metric])) for r in rows if r["kind"] == kind]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, markersize=4, label=kind.replace("_", " "))
    for r in rows:
        if r["kind"] == "missing":
            ax.plot([1.0], [_num(r[metric])], "x", markersize=9, label=f"{r['modality']} missing")
    clean = result["summary"].get("clean")
    if clean is not None:
        ax.axhline(clean, linestyle="--", color="grey", linewidth=1, label="clean")
    ax.set_xlabel("perturbation level (noise: std in units of each array's std; dropout: share of tokens)")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"robustness of {Path(result['run']).name}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_shots(summary: list[dict[str, Any]], column: str, path: Path, title: str = "") -> Any:
    """The few-shot curve: `column` (mean with its 95% interval over seeds) against the shots per class, one line
    per config apart from its shots; None when fewer than two shot values."""
    lines: dict[str, list[tuple[float, float, float, float]]] = {}
    for s in summary:
        shots = s.get("shots")
        if not isinstance(shots, (int, float)) or isinstance(shots, bool) or not isinstance(s.get(column), float):
            continue
        label = ",".join(p for p in str(s["config"]).split(",") if not p.startswith("shots=")) or "shots"
        lo = s.get(f"{column}_low", s[column])
        hi = s.get(f"{column}_high", s[column])
        lines.setdefault(label, []).append((float(shots), s[column], _num(lo), _num(hi)))
    if not lines or max(len(v) for v in lines.values()) < 2:
        return None
    fig = _figure(8, 6)
    ax = fig.subplots()
    for label, pts in lines.items():
        pts.sort()
        x = [p[0] for p in pts]
        ax.plot(x, [p[1] for p in pts], "-o", markersize=4, label=label)
        ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labelled train rows per class (shots)")
    ax.set_ylabel(f"{column} (mean, 95% interval over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
