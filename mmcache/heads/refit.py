"""`--refit trainval`: the CLIP paper's probe protocol (as CLIP_benchmark runs it). The configuration and its epochs
(or steps) are chosen on the validation split as usual; then the head is trained again from the same
initialisation, on train + val together, for the chosen number of epochs, and that last epoch's weights are the
run's model, evaluated on test.

The run's curves and `select` value are those of the selection fit; `select` also records `refit`, `refit_epochs` and
`refit_rows`, and `config.json` `resolved.rows.train` counts train + val. Validation metrics of a refit run are on
rows it trained on. Refused with `--solver lbfgs` (its penalty is chosen per fit, not per epoch) and with `--shots`
(every val row would join the K-shot train rows).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from mmcache.errors import MMCacheError

if TYPE_CHECKING:
    from mmcache.heads.lockstep import Member
    from mmcache.heads.train import TrainConfig

REFITS = ("trainval",)


def check_refit(cfg: TrainConfig) -> None:
    """Refuse an unknown --refit, and --refit with lbfgs or --shots, in one line."""
    if cfg.refit is None:
        return
    if cfg.refit not in REFITS:
        raise MMCacheError(f"--refit {cfg.refit!r}: the one refit is 'trainval' (retrain the chosen epochs on "
                           "train + val before the test evaluation)")
    if cfg.solver == "lbfgs":
        raise MMCacheError("--refit trainval retrains the chosen epochs of minibatch training; --solver lbfgs has no "
                           "epochs: drop --refit or use --solver adam")
    if cfg.shots:
        raise MMCacheError(f"--refit trainval would add every val row to the {cfg.shots}-shot train rows; drop one "
                           "of --refit and --shots")


def refit_trainval(m: Member) -> None:
    """Train member `m`'s config again on train + val for its chosen epochs; its head, loss, offsets and data
    become the refit's (its curves and selection stay)."""
    from mmcache.heads.lockstep import fit_lockstep
    from mmcache.heads.train import build_member

    data = m.data
    trainval = torch.cat([data.split_index["train"], data.split_index["val"]])
    tv = replace(data, split_index={**data.split_index, "train": trainval})
    cfg = replace(m.cfg, epochs=max(1, m.best_epoch), early_stopping=0)
    t0 = time.perf_counter()
    again = build_member(cfg, tv)  # the same seed: the same initialisation as the selection fit
    again.keep_last = True
    fit_lockstep([again], tv, cfg.quiet)
    m.head, m.crit, m.offsets, m.data, m.ema = again.head, again.crit, again.offsets, tv, again.ema
    m.final_logits = None  # stacked probes computed them for the selection fit's weights
    m.fit_seconds += time.perf_counter() - t0
    m.select = {**m.select, "refit": "trainval", "refit_epochs": cfg.epochs, "refit_rows": int(len(trainval))}
