"""The one result type of every trainer (`RunResult`), its console table and the prediction checks it warns about.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from mmcache.engine.metrics import failed_checks


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
