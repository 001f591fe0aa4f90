"""The training core shared by `heads train`, `heads sweep` and `finetune run`.

One place for what every trainer does the same way:

- `optim`: parameter groups and the optimizer (`param_groups`, `make_optimizer`; learned loss weights are never
  decayed, encoders may train at their own learning rate) and the learning-rate schedule (`Schedule`: cosine per
  step with an optional linear warm-up, plateau per epoch on the selection metric, or none);
- `steps`: where training stands (`TrainProgress`, `progress_hook`: one call per training step tells the
  criterion and the head the step, epoch and share of the run), the weights' moving average (`EMA`), the steps
  of an epoch (`steps_per_epoch`);
- `select`: per-epoch validation metrics (`val_metrics`, `val_metrics_many`), the curve row (`curve_row`),
  best-epoch selection with early stopping (`Selector`: NaN never wins), post-hoc logit adjustment
  (`logit_offsets`, `adjust_logits`);
- `metrics`: the final classification metrics (scikit-learn) and the checks on predictions;
- `result`: the result type (`RunResult`) and its table;
- the run folder is read and written by `mmcache.runfolder` (`new_run_dir`, `write_run` are re-exported here).

The engine imports no head, extractor or dataset module: the data side differs by trainer (index batches over
cached tensors in `mmcache.heads`, DataLoader workers decoding raw inputs in `mmcache.finetune`) and stays there.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmcache.engine.optim import OPTIMIZERS, SCHEDULES, Schedule, make_optimizer, param_groups
    from mmcache.engine.result import RunResult, results_table, warn_failed_checks
    from mmcache.engine.select import (
        IGNORE,
        SPLIT_ORDER,
        Selector,
        adjust_logits,
        curve_row,
        logit_offsets,
        parse_select,
        snapshot,
        val_metrics,
        val_metrics_many,
    )
    from mmcache.engine.steps import EMA, TrainProgress, check_ema, progress_hook, steps_per_epoch
    from mmcache.runfolder import (
        metrics_json,
        named_run_dir,
        new_run_dir,
        plot_confusions,
        plot_run_curves,
        write_curves,
        write_run,
    )

# Each name and the module holding it: imported on first use, so that `mmcache.engine.config` (the options,
# read by every command's --help) loads no torch.
_WHERE = {
    "EMA": "mmcache.engine.steps",
    "IGNORE": "mmcache.engine.select",
    "OPTIMIZERS": "mmcache.engine.optim",
    "RunResult": "mmcache.engine.result",
    "SCHEDULES": "mmcache.engine.optim",
    "SPLIT_ORDER": "mmcache.engine.select",
    "Schedule": "mmcache.engine.optim",
    "Selector": "mmcache.engine.select",
    "TrainProgress": "mmcache.engine.steps",
    "adjust_logits": "mmcache.engine.select",
    "check_ema": "mmcache.engine.steps",
    "curve_row": "mmcache.engine.select",
    "logit_offsets": "mmcache.engine.select",
    "make_optimizer": "mmcache.engine.optim",
    "metrics_json": "mmcache.runfolder",
    "named_run_dir": "mmcache.runfolder",
    "new_run_dir": "mmcache.runfolder",
    "param_groups": "mmcache.engine.optim",
    "parse_select": "mmcache.engine.select",
    "plot_confusions": "mmcache.runfolder",
    "plot_run_curves": "mmcache.runfolder",
    "progress_hook": "mmcache.engine.steps",
    "results_table": "mmcache.engine.result",
    "snapshot": "mmcache.engine.select",
    "steps_per_epoch": "mmcache.engine.steps",
    "val_metrics": "mmcache.engine.select",
    "val_metrics_many": "mmcache.engine.select",
    "warn_failed_checks": "mmcache.engine.result",
    "write_curves": "mmcache.runfolder",
    "write_run": "mmcache.runfolder",
}

__all__ = ["EMA", "IGNORE", "OPTIMIZERS", "SCHEDULES", "SPLIT_ORDER", "RunResult", "Schedule", "Selector",
           "TrainProgress", "adjust_logits", "check_ema", "curve_row", "logit_offsets", "make_optimizer",
           "metrics_json", "named_run_dir", "new_run_dir", "param_groups", "parse_select", "plot_confusions",
           "plot_run_curves", "progress_hook", "results_table", "snapshot", "steps_per_epoch", "val_metrics",
           "val_metrics_many", "warn_failed_checks", "write_curves", "write_run"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
