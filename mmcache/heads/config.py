"""The options of heads trained on cached features (`heads train`, `heads sweep`): `TrainConfig`, the engine's
shared options (`mmcache.engine.config.BaseConfig`) and those of cached tensors. Importing it loads no torch, so
every command's --help is fast."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import ClassVar

from mmcache.engine.config import BaseConfig, check_number, option, redefault
from mmcache.errors import MMCacheError
from mmcache.memory import LOADS

SOLVERS = ("adam", "lbfgs")


@dataclass(kw_only=True)
class TrainConfig(BaseConfig):
    """Everything that determines a training run on cached features (written to the run folder as config.json):
    the engine's shared options (`BaseConfig`) and those of heads on cached tensors."""

    command: ClassVar[str] = "heads train"

    head: str = redefault(BaseConfig, "head", "linear")
    modalities: dict[str, str] = option(cli="none", label="the stores (--vtype/--ttype/...)",
                                        help="modality -> store name, e.g. {image: clip, text: clip}")
    teacher: str | None = option(None, help="Teacher store(s) in cache/<dataset>/teacher/: nli,clip.")
    class_weights: bool = option(False, help="Inverse-frequency class weights.")
    label_smoothing: float = option(0.0, low=0, high=1, help="Label smoothing of the cross-entropy.")
    oversample: bool = option(False, help="Draw train rows class-balanced.")
    fold: int | None = option(None, help="Cross-validation fold the manifest must hold (`mmcache extract --fold K` "
                                         "writes it); refused when it holds another.")
    # k of k-fold CV: `fold`'s splits are then computed from the dataset's definition (set by `--folds`).
    folds: int | None = option(None, cli="none", help="k of k-fold cross-validation.")
    threads: int | None = option(None, low=1, integer=True,
                                 help="CPU threads for torch (default: one per 4 cores, 1 to 8; MMCACHE_THREADS "
                                      "overrides).")
    solver: str = option("adam", choices=SOLVERS, noun="solver",
                         help="adam (minibatch, see --optimizer) or lbfgs (full-batch logistic-regression probe, L2 "
                              "chosen on val).")
    lbfgs_grid: list[float] | None = option(None, flag="--l2-grid", cli="floats",
                                            help="lbfgs: comma list of L2 penalties to try on val (default 1e-1 ... "
                                                 "1e-5).")
    lbfgs_max_iter: int = option(500, low=1, integer=True, cli="none", help="lbfgs: iterations per penalty.")
    lbfgs_batched: bool = option(False, flag="--l2-batched",
                                 help="lbfgs: fit every penalty of the grid in lockstep as one batched solve (faster; "
                                      "a validation tie may pick another penalty than sequential fits).")
    lbfgs_tol: float = option(1e-4, low=0, low_open=True, cli="none",
                              help="lbfgs: max |gradient| at convergence, as scikit-learn's lbfgs `tol`.")
    val_fraction: float = option(0.1, low=0, high=1, low_open=True,
                                 help="Share of train carved out to validate when the manifest has no val split.")
    save: bool = option(True, cli="none", per_run=True, help="False: train and evaluate without a run folder.")
    shots: int = option(0, low=0, integer=True,
                        help="Few-shot: K labelled train rows per class of the selection task, drawn by the seed (0 = "
                             "every train row; grid key shots=1,2,4).")
    refit: str | None = option(None, help="trainval: after choosing the epochs on val, train them again on train + "
                                          "val and test that (the CLIP paper's probe protocol).")
    load: str = option("auto", help="Features: auto (in memory when they fit with room to spare, else streamed), "
                                    "memory (refused in one line when they cannot fit), stream (batches read from the "
                                    "stores; a seed gives the same run).")

    def check(self, given: Collection[str] = ()) -> None:
        """The rules across several options of heads on cached features (after the per-field checks)."""
        check_head_modalities(self)
        if self.solver == "lbfgs" and self.head != "linear":
            raise MMCacheError(f"--solver lbfgs fits the linear probe only (--head linear), not {self.head!r}")
        from mmcache.heads.refit import check_refit
        from mmcache.utils import pick_device

        check_refit(self)
        if self.device:
            pick_device(self.device)  # an unknown or absent device is refused before anything loads
        if self.solver != "lbfgs" and (self.lbfgs_grid is not None or self.lbfgs_batched):
            raise MMCacheError("--l2-grid and --l2-batched set the penalties of --solver lbfgs; add --solver lbfgs or "
                               "drop them (--weight-decay regularises --solver adam)")
        if self.lbfgs_grid is not None:
            if not self.lbfgs_grid:
                raise MMCacheError(f"--l2-grid must list at least one penalty, e.g. 1e-2,1e-3 (got {self.lbfgs_grid!r})")
            for lam in self.lbfgs_grid:
                check_number("--l2-grid: every penalty", lam, 0, low_open=True)
        from mmcache.data.combined import MAX_UPSAMPLE

        if any(not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_UPSAMPLE
               for k in self.upsample.values()):
            raise MMCacheError(f"--upsample takes NAME=K with K a whole number from 1 to {MAX_UPSAMPLE} (e.g. "
                               f"mmhs150k=2), got {self.upsample!r}")
        if self.solver == "lbfgs":  # one full-batch fit per penalty: minibatch options would be ignored
            ignored = [flag for flag, on in (("--oversample", self.oversample), ("--patience", self.early_stopping),
                                             ("--weight-decay", self.weight_decay), ("--upsample", self.upsample)) if on]
            if ignored:
                raise MMCacheError(f"{', '.join(ignored)}: --solver lbfgs fits full batch with the L2 penalties of "
                                   "--l2-grid; drop it or use --solver adam")
            if self.ema:
                raise MMCacheError("--ema averages the weights of minibatch training; --solver lbfgs has no steps to "
                                   "average")
        if self.load not in LOADS:
            raise MMCacheError(f"--load {self.load!r} is not a loading mode; use one of {', '.join(LOADS)}")
        if self.folds is not None:
            check_number("--folds", self.folds, 2, integer=True)
            check_number("--fold", self.fold, 0, self.folds - 1, integer=True)
        from mmcache.heads import HEADS

        HEADS.get(self.head)  # an unknown head is refused before any data is read
        if not self.modalities:
            raise MMCacheError("no feature stores selected; pass at least one of --vtype/--ttype/--ctype/--atype/"
                               "--videotype (or --image/--text/... )")


def check_head_modalities(cfg: TrainConfig) -> None:
    """Refuse a `--use` that names no loaded modality, or `--use` together with `--ablation`."""
    use, ablation = cfg.head_hparams.get("modalities"), cfg.head_hparams.get("ablation", 0)
    if use is not None and not isinstance(use, dict):
        if not isinstance(use, list) or not use or not all(isinstance(m, str) and m for m in use):
            raise MMCacheError(f"--use must name one or more loaded modalities, e.g. image,text; got {use!r}")
        if ablation:
            raise MMCacheError(f"--ablation {ablation} and --use {','.join(use)} both choose the modalities the head "
                               "uses; give one of them")


