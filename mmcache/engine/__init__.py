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

__all__ = ["EMA", "IGNORE", "OPTIMIZERS", "SCHEDULES", "SPLIT_ORDER", "RunResult", "Schedule", "Selector",
           "TrainProgress", "adjust_logits", "check_ema", "curve_row", "logit_offsets", "make_optimizer",
           "metrics_json", "named_run_dir", "new_run_dir", "param_groups", "parse_select", "plot_confusions",
           "plot_run_curves", "progress_hook", "results_table", "snapshot", "steps_per_epoch", "val_metrics",
           "val_metrics_many", "warn_failed_checks", "write_curves", "write_run"]
