"""Training heads on cached tensors: `train` (one config) and `train_many` (a whole grid), on the shared engine.

Stores are loaded once per dataset and store selection (on the GPU when there is one); each epoch
draws one permutation per seed and slices it into batches, so there is no DataLoader and no
per-sample Python. `train_many` trains every config that shares the loaded data, batch size and
epochs in lockstep: one batch gather per seed and step for all of them, each config with its own
head, criterion, optimizer, schedule, selection and random stream, so each result equals what
`train` gives for that config alone. Linear probes (`D=0`, cross-entropy) go further: their
weights are stacked and a whole group trains as one matrix product per step (`mmcache.heads.stacked`).
The optimizer, schedule, selection and the run folder come from `mmcache.engine`.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from mmcache import runfolder
from mmcache.engine import (
    IGNORE,
    SPLIT_ORDER,
    RunResult,
    adjust_logits,
    logit_offsets,
    new_run_dir,
    parse_select,
    results_table,
    steps_per_epoch,
    val_metrics,
    warn_failed_checks,
    write_run,
)
from mmcache.engine.config import check_number
from mmcache.engine.metrics import split_metrics
from mmcache.errors import MMCacheError
from mmcache.heads.base import HEADS, Head, build_head
from mmcache.heads.config import SOLVERS, TrainConfig, check_head_modalities  # noqa: F401
from mmcache.heads.cost import reset_peak, run_cost, test_predictions
from mmcache.heads.data import CachedData, load_cached
from mmcache.heads.lockstep import (
    EVAL_BATCH,
    BatchOrders,
    Member,
    check_upsample,
    eval_loss,
    fit_lockstep,
    labelled_train,
    logits_of,
    upsample_pool,
)
from mmcache.heads.losses import Criterion, build_criterion
from mmcache.heads.parallel import RankShard
from mmcache.heads.probe import LBFGS_GRID, fit_l2_grid
from mmcache.heads.refit import refit_trainval
from mmcache.heads.shots import with_shots
from mmcache.utils import check_output_file, pick_device, seed_everything

if TYPE_CHECKING:
    from mmcache.heads.linear import LinearHead

quick_metrics = val_metrics  # the per-epoch validation metrics (kept under their older name)

__all__ = ["TrainConfig", "RunResult", "train", "train_many", "predict", "load_run", "predict_logits",
           "quick_metrics", "parse_select", "results_table", "default_threads",
           # the lockstep pieces, kept importable from here (`mmcache.heads.lockstep` holds them)
           "BatchOrders", "Member", "check_upsample", "upsample_pool", "steps_per_epoch"]

def default_threads() -> int:
    """torch CPU threads when `--threads` is not given: small heads gain little from many threads and, on a
    shared CPU, extra threads mostly wait (measured 6x slower with 2 threads than 1 on a busy 2-core machine).
    One thread per 4 cores, at least 1 and at most 8 (`MMCACHE_THREADS` overrides)."""
    env = os.environ.get("MMCACHE_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise MMCacheError(f"MMCACHE_THREADS must be a whole number, got {env!r}") from None
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def _log(cfg: TrainConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, file=sys.stderr)


_check_number = check_number  # older name



def check_writable_folder(path: Path | str, flag: str, given: Path | str | None = None) -> None:
    """Refuse, before anything trains, an output folder that cannot be made: a file in its way, or a folder
    without write permission. `given`: what the user typed (default `path`), for the message."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            if not folder.is_dir():
                raise MMCacheError(f"{flag} {given or path}: {folder} is a file, not a folder; choose another {flag}")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise MMCacheError(f"{flag} {given or path}: {folder} is not writable; choose another {flag}")
            return


def validate_config(cfg: TrainConfig) -> None:
    """Refuse a config that cannot train, with one line naming the option (before anything is loaded): the
    engine's per-field checks, then `TrainConfig.check`."""
    cfg.validate()


@torch.no_grad()
def predict_logits(head: Head, data: CachedData, idx: torch.Tensor, batch: int = EVAL_BATCH) -> dict[str, torch.Tensor]:
    """Logits per task for rows `idx`, in eval mode, in large chunks (one chunk's features at a time)."""
    return logits_of(head, data.chunks(idx, batch), data.tasks, len(idx))


def build_member(cfg: TrainConfig, data: CachedData) -> Member:
    sel_task, sel_metric = parse_select(cfg.select_metric, list(data.tasks), data.labels.metric)
    val = data.split_index.get("val")
    if val is not None and not bool((data.targets[sel_task][val] != IGNORE).any()):
        raise MMCacheError(f"the val split of {data.dataset!r} has no labelled row of task {sel_task!r}, so no epoch "
                           "can be chosen; label some val rows, or give no row the split val (then 10% of train "
                           "validates)")
    hparams = dict(cfg.head_hparams)
    if cfg.solver == "lbfgs":
        # The probe is a logistic regression on the (optionally L2-normalised) concatenated features.
        hparams.setdefault("D", 0)
        if hparams["D"] != 0:
            raise MMCacheError("--solver lbfgs fits a logistic regression on the features: leave --D unset (or 0)")
        hparams["dropout"] = 0.0
    device = data.targets[sel_task].device
    seed_everything(cfg.seed)  # the head's initialisation does not depend on what loading consumed
    head = build_head(cfg.head, data.inputs, data.tasks, hparams).to(device)
    crit = build_criterion(cfg.loss, data.tasks, class_counts=data.class_counts("train"),
                           class_weights=cfg.class_weights, label_smoothing=cfg.label_smoothing,
                           **cfg.loss_options).to(device)
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    tau = reference_tau(head.hparams) if cfg.logit_adjust is None else float(cfg.logit_adjust)
    offsets = logit_offsets(data.class_counts("train"), tau, data.labels.tasks)
    check_upsample(data, cfg.upsample)
    return Member(cfg=cfg, data=data, head=head, crit=crit, sel_task=sel_task, sel_metric=sel_metric,
                  rng=torch.get_rng_state(), cuda_rng=cuda_rng, tau=tau, offsets=offsets)


_build_member = build_member  # older name (tests and callers)
_labelled_train = labelled_train
_fit_lockstep = fit_lockstep


def reference_tau(head_hparams: dict[str, Any]) -> float:
    """The logit adjustment a run gets when `--logit-adjust` is not given: -1 for the SCABG reference head (the
    reference code adds log p(y) to its logits at evaluation), 0 otherwise."""
    return -1.0 if head_hparams.get("variant") == "reference" else 0.0


def run_stem(cfg: TrainConfig) -> list[str]:
    parts = [cfg.head, "+".join(f"{m}-{s}" for m, s in cfg.modalities.items())]
    hp = cfg.head_hparams
    # Name the variants an ablation grid varies, so run folders tell them apart at a glance.
    if hp.get("modalities"):
        parts.append("use-" + "+".join(hp["modalities"]))
    elif hp.get("ablation"):
        parts.append(f"ablation{hp['ablation']}")
    if cfg.solver != "adam":
        parts.append(cfg.solver)
    if cfg.fold is not None:
        parts.append(f"fold{cfg.fold}")
    return parts


def _data_key(cfg: TrainConfig, device: str) -> tuple[Any, ...]:
    """Configs with the same key read the same loaded stores."""
    return (cfg.dataset, tuple(sorted(cfg.modalities.items())), str(cfg.cache_dir), tuple(cfg.tasks or ()),
            cfg.teacher, device, cfg.val_fraction, None if cfg.folds else cfg.fold,  # CV folds share the stores
            cfg.load)


def _uses(heads: list[str]) -> list[str] | None:
    keys: set[str] = set()
    for h in heads:
        u = getattr(HEADS[h], "uses", None)
        if u is None:
            return None
        keys.update(u)
    return sorted(keys)


def _evaluate(m: Member, t_start: float, device: str, splits: tuple[str, ...] | None = None,
              logits_of: dict[str, dict[str, torch.Tensor]] | None = None) -> RunResult:
    """Final metrics of member `m` on every split (or `splits`); `logits_of` (split -> task -> logits) when the
    logits were computed already (stacked probes)."""
    data, cfg = m.data, m.cfg
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    by_source: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    order = sorted(data.split_index, key=lambda sp: (SPLIT_ORDER.get(sp, len(SPLIT_ORDER)), sp))
    preds = None
    for split in order:
        if splits is not None and split not in splits:
            continue
        idx = data.split_index[split]
        logits = adjust_logits(logits_of[split] if logits_of is not None else predict_logits(m.head, data, idx),
                               m.offsets)
        if split == "test":  # per-row predictions for the tables' paired bootstrap (mmcache.stats)
            preds = test_predictions(data, idx, logits, m.sel_task)
        per_task, per_source = split_metrics({t: data.targets[t][idx].cpu().numpy() for t in data.tasks},
                                             {t: logits[t].cpu().numpy() for t in data.tasks},
                                             data.labels.tasks, row_sources(data, idx))
        if per_task:  # a hidden (unlabelled) split has no metrics
            metrics[split] = per_task
            if per_source:
                by_source[split] = per_source
    n_params = sum(p.numel() for p in m.head.parameters())
    select = {"task": m.sel_task, "metric": m.sel_metric, **m.select, "value": m.best_value}
    run_cfg = {**cfg.to_json(), "resolved": {
        "device": device, "threads": torch.get_num_threads(), "head_hparams": m.head.hparams,
        "labels": data.labels.to_json(), "fold": data.fold, "split_seed": data.split_seed,
        "rows": {s: len(i) for s, i in data.split_index.items()}, "dropped": data.dropped,
        "load": data.load, "world_size": data.shard.world,
        "load_seconds": round(data.load_seconds, 3),
        "stores": data.specs, "store_specs": data.store_specs, "select": select, "best_epoch": m.best_epoch,
        "n_params": n_params, "logit_adjust": {"tau": m.tau, "offsets": m.offsets}}}
    return RunResult(run_dir=None, metrics=metrics, best_epoch=m.best_epoch, curves=m.curves, config=run_cfg,
                     head=m.head, seconds=time.perf_counter() - t_start, select=select, fit_seconds=m.fit_seconds,
                     by_source=by_source, predictions=preds, cost=run_cost(m.head, data, device, m.fit_seconds))


def row_sources(data: CachedData, idx: torch.Tensor) -> list[str | None] | None:
    """The source dataset of each of rows `idx`; None unless the manifest names the rows' sources (a dataset
    combined from several)."""
    man = data.manifest
    if man is None or not man.row_sources:
        return None
    src_of = dict(zip(man.ids, man.row_sources, strict=True))
    return [src_of.get(data.ids[int(i)]) for i in idx.cpu().numpy()]


def train_many(cfgs: list[TrainConfig], errors: bool = False, splits: tuple[str, ...] | None = None,
               shard: RankShard | None = None) -> list[RunResult | MMCacheError]:
    """`_train_many`; the run names it takes are given up when it returns or fails (`mmcache.runfolder`)."""
    from mmcache.runfolder import releasing

    with releasing():
        return _train_many(cfgs, errors, splits, shard)


def _train_many(cfgs: list[TrainConfig], errors: bool = False, splits: tuple[str, ...] | None = None,
                shard: RankShard | None = None) -> list[RunResult | MMCacheError]:
    """Train every config; stores are loaded once per dataset and selection, and configs that share the
    loaded data, epochs and batch size train in lockstep (linear probes as one stacked computation).

    Each result equals `train(cfg)` for that config alone (same seed, same batches, same initialisation)
    up to float round-off. With `errors=True` a config that fails with a user error yields its
    MMCacheError in its place and the others go on; otherwise the first error is raised. `splits`: the
    splits to report metrics on (default every split of the manifest; a sweep needs val and test only).
    """
    t_start = time.perf_counter()
    results: list[RunResult | MMCacheError | None] = [None] * len(cfgs)

    def fail(i: int, e: MMCacheError) -> None:
        if not errors:
            raise e
        results[i] = e

    devices, run_dirs = _check_configs(cfgs, fail)
    by_data: dict[tuple[Any, ...], list[int]] = {}
    for i in devices:
        by_data.setdefault(_data_key(cfgs[i], devices[i]), []).append(i)
    for idxs in by_data.values():
        cfg0, device = cfgs[idxs[0]], devices[idxs[0]]
        try:
            base = load_cached(cfg0.dataset, cfg0.modalities, cfg0.cache_dir, keys=_uses([cfgs[i].head for i in idxs]),
                               tasks=cfg0.tasks, teacher=cfg0.teacher, device=device, val_fraction=cfg0.val_fraction,
                               seed=cfg0.seed, fold=None if cfg0.folds else cfg0.fold,
                               quiet=all(cfgs[i].quiet for i in idxs), load=cfg0.load)
        except MMCacheError as e:
            for i in idxs:
                fail(i, e)
            continue
        if shard is not None:  # data-parallel: every rank trains on its own rows of each batch
            base = dataclasses.replace(base, shard=shard)
        members = _members(cfgs, idxs, base, device, fail)
        for gkey, gidx in _lockstep_groups(members).items():
            try:
                _fit_group(gkey, [members[i] for i in gidx], devices[gidx[0]], splits)
            except MMCacheError as e:
                for i in gidx:
                    fail(i, e)
                continue
            for i in gidx:
                try:
                    results[i] = _finish(members[i], t_start, devices[i], splits, run_dirs.get(i))
                except MMCacheError as e:
                    fail(i, e)
    return [r if r is not None else MMCacheError("not trained") for r in results]


def _check_configs(cfgs: list[TrainConfig], fail: Callable[[int, MMCacheError], None]
                   ) -> tuple[dict[int, str], dict[int, Path]]:
    """Each config validated, its run folder taken (before training, not after) and its device chosen; the CPU
    threads set once for the call."""
    devices: dict[int, str] = {}
    run_dirs: dict[int, Path] = {}
    handed_out: set[Path] = set()  # generated run folder names: each config of the call gets its own
    for i, cfg in enumerate(cfgs):
        try:
            validate_config(cfg)
            if cfg.save:  # refuse an existing run folder before training, not after
                check_writable_folder(Path(cfg.runs_dir) / cfg.dataset, "--runs-dir")
                run_dirs[i] = new_run_dir(cfg.runs_dir, cfg.dataset, cfg.run_name, run_stem(cfg), cfg.overwrite,
                                          taken=handed_out)
            devices[i] = pick_device(cfg.device)
        except MMCacheError as e:
            fail(i, e)
    threads = {c.threads for i, c in enumerate(cfgs) if i in devices}
    if threads and any(devices[i] == "cpu" for i in devices):
        torch.set_num_threads(max((t or default_threads()) for t in threads))
    return devices, run_dirs


def _members(cfgs: list[TrainConfig], idxs: list[int], base: CachedData, device: str,
             fail: Callable[[int, MMCacheError], None]) -> dict[int, Member]:
    """One member per config of `idxs` over the loaded rows `base` (a CV fold's splits, a seed's val rows, K shots
    per class: shared by the configs that ask for the same)."""
    members: dict[int, Member] = {}
    by_seed: dict[tuple[Any, ...], CachedData] = {}
    for i in idxs:
        try:
            c = cfgs[i]
            key = (c.seed, c.fold if c.folds else None, c.shots, c.select_metric if c.shots else None)
            if key not in by_seed:  # a CV fold: the same tensors with that fold's splits
                by_seed[key] = (base.for_fold(c.fold, c.folds) if c.folds and c.fold is not None
                                else base).for_seed(c.seed)
                if c.shots:  # K rows per class of the train split (mmcache.heads.shots)
                    by_seed[key] = with_shots(by_seed[key], c.shots, c.seed, c.select_metric)
            data = by_seed[key]
            members[i] = m = build_member(cfgs[i], data)
            _log(m.cfg, f"{m.cfg.dataset}: {', '.join(f'{s} {len(v)}' for s, v in data.split_index.items())} rows; "
                        f"head {m.cfg.head} ({sum(p.numel() for p in m.head.parameters()):,} parameters) on "
                        f"{device}; select val {m.sel_task}:{m.sel_metric}")
        except MMCacheError as e:
            fail(i, e)
    return members


def _lockstep_groups(members: dict[int, Member]) -> dict[tuple[Any, ...], list[int]]:
    """Lockstep groups: the same rows (split seed), epochs and batch size; lbfgs fits one by one."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, m in members.items():
        if m.cfg.solver == "lbfgs":
            groups[("lbfgs", i)] = [i]
            continue
        gkey = (id(m.data.split_index), m.cfg.epochs, m.cfg.batch_size, tuple(sorted(m.cfg.upsample.items())))
        groups.setdefault(gkey, []).append(i)
    if any(m.cfg.solver != "lbfgs" for m in members.values()):
        importlib.import_module("torch._dynamo")  # the first torch optimizer imports it: seconds, not fitting
    return groups


def _fit_group(gkey: tuple[Any, ...], group: list[Member], device: str, splits: tuple[str, ...] | None) -> None:
    """Fit one group: the lbfgs probe, or the stacked probes and the lockstep loop (each member's fitting time
    its share of the group's)."""
    from mmcache.heads.stacked import fit_stacked, stackable, stacked_logits

    t_fit = time.perf_counter()
    reset_peak(device)
    if gkey[0] == "lbfgs":
        m = group[0]
        curves, best, value, lam, C = _fit_lbfgs(m.cfg, m.head, m.crit, m.data, m.sel_task, m.sel_metric, m.offsets)
        m.curves, m.best_epoch, m.best_value = curves, best, value
        # The same objective in scikit-learn's terms: LogisticRegression(C=C) (mmcache.heads.probe).
        m.select = {"l2": lam, "sklearn_C": C}
        m.fit_seconds = time.perf_counter() - t_fit
        return
    quiet = all(m.cfg.quiet for m in group)
    stacked = [m for m in group if stackable(m)]
    rest = [m for m in group if m not in stacked]
    if stacked:
        t_stack = time.perf_counter()
        fit_stacked(stacked, group[0].data, quiet)
        share = (time.perf_counter() - t_stack) / len(stacked)
        for m in stacked:  # one computation: its time shared evenly
            m.fit_seconds = share
        data = group[0].data
        per_split = {sp: stacked_logits(stacked, data, ix) for sp, ix in data.split_index.items()
                     if splits is None or sp in splits}
        for k, m in enumerate(stacked):
            m.final_logits = {sp: per_split[sp][k] for sp in per_split}
    if rest:
        t_lock = time.perf_counter()
        _fit_lockstep(rest, group[0].data, quiet)  # (module attribute: tests spy on it)
        # The group's time, shared by each member's own forward time (its backward scales with it).
        spent, busy = time.perf_counter() - t_lock, sum(m.busy for m in rest)
        for m in rest:
            m.fit_seconds = spent * (m.busy / busy if busy > 0 else 1.0 / len(rest))


def _finish(m: Member, t_start: float, device: str, splits: tuple[str, ...] | None,
            run_dir: Path | None) -> RunResult:
    """A fitted member refitted (--refit), evaluated and its run folder written."""
    if m.cfg.refit:  # the chosen epochs again on train + val (mmcache.heads.refit)
        refit_trainval(m)
    res = _evaluate(m, t_start, device, splits, m.final_logits)
    warn_failed_checks(res.metrics)
    if m.cfg.save and run_dir is not None:
        res.run_dir = write_run(run_dir, res, m.data.labels.tasks, m.cfg.dataset, criterion=m.crit)
    return res


def train(cfg: TrainConfig) -> RunResult:
    """Train `cfg.head` on the cached features of `cfg.dataset`; evaluate, write the run folder, return results."""
    t0 = time.perf_counter()
    shard = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one config, data-parallel over the ranks
        from mmcache.utils import init_distributed

        init_distributed(cpu=cfg.device == "cpu")
        shard = RankShard.current()
        if shard.rank != 0:  # rank 0 writes the run folder and prints the table
            cfg = dataclasses.replace(cfg, save=False, quiet=True, track=None)
    result = train_many([cfg], shard=shard)[0]
    if isinstance(result, MMCacheError):
        raise result
    result.seconds = time.perf_counter() - t0
    if cfg.track:
        from mmcache.tracking import track

        name = result.run_dir.name if result.run_dir is not None else "_".join(run_stem(cfg))
        track(cfg.track, cfg.dataset, cfg.runs_dir, [(name, result, run_tags(cfg, "heads"))])
    if not cfg.quiet:
        print(results_table(result))
        if result.run_dir is not None:
            print(f"run folder: {result.run_dir}")
    return result


def run_tags(cfg: TrainConfig, kind: str) -> dict[str, str]:
    """Tags of a tracked run: what trained it, the dataset, fold and seed."""
    tags = {"kind": kind, "dataset": cfg.dataset, "seed": str(cfg.seed)}
    if cfg.fold is not None:
        tags["fold"] = str(cfg.fold)
    return tags


def _fit_lbfgs(cfg: TrainConfig, head: Head, crit: Criterion, data: CachedData, sel_task: str,
               sel_metric: str, offsets: dict[str, list[float]] | None = None
               ) -> tuple[list[dict[str, Any]], int, float, float, float]:
    """The lbfgs probe (mmcache.heads.probe): one fit per L2 penalty, the best on validation (on logits less
    `offsets`, the logit adjustment). Returns curves, the best fit (1-based), its validation value, its penalty
    and that penalty's scikit-learn C."""
    val_idx = data.split_index["val"]

    def score(vlog: dict[str, torch.Tensor]) -> dict[str, float]:
        vm = quick_metrics(data.targets[sel_task][val_idx], adjust_logits(vlog, offsets)[sel_task], sel_metric)
        vm["loss"] = eval_loss(crit, vlog, data, val_idx, 0)
        return vm

    crit.eval()
    r = fit_l2_grid(cast("LinearHead", head), crit, data, sel_task, sel_metric, score,  # --head linear only
                    grid=list(cfg.lbfgs_grid or LBFGS_GRID), tol=cfg.lbfgs_tol, max_iter=cfg.lbfgs_max_iter,
                    quiet=cfg.quiet, batched=cfg.lbfgs_batched)
    return r.curves, r.best + 1, r.value, r.l2, r.sklearn_C


def load_run(run_dir: Path | str, device: str = "cpu") -> tuple[Head, dict[str, Any]]:
    """Rebuild a trained head from its run folder (head.json + model.safetensors; nothing unpickled), after the
    one check of a run folder that is read (`mmcache.runfolder.load_head`)."""
    from mmcache.runfolder import load_head

    return load_head(run_dir, device)


run_offsets = runfolder.run_offsets  # the run folder's logit adjustment (kept under this name)


def predict(run_dir: Path | str, dataset: str | None = None, split: str = "test", cache_dir: str | None = None,
            out: Path | str | None = None, device: str | None = None, load: str = "auto") -> Path:
    """Write predictions of a trained run on `split` (or "all") as CSV: id, label, predicted, p_<class>...

    With several tasks the columns are prefixed by the task (`<task>_label`, `<task>_p_<class>`). `load`: the
    features in memory or streamed from the stores (`load_cached`).
    """
    check_output_file(out)
    device = pick_device(device)
    head, cfg = load_run(run_dir, device)
    if "modalities" not in cfg or "cache_dir" not in cfg:
        raise MMCacheError(f"{run_dir} is not a `heads train` run (a `finetune run` folder?): `heads predict` reads "
                           "cached features; predict with a run trained by `heads train`")
    dataset = dataset or cfg["dataset"]
    cache = cache_dir or cfg["cache_dir"]
    labels = cfg["resolved"]["labels"]["tasks"]
    data = load_cached(dataset, cfg["modalities"], cache, keys=getattr(type(head), "uses", None),
                       tasks=list(labels), device=device, seed=cfg["seed"], val_fraction=cfg["val_fraction"],
                       load=load)
    for t, names in labels.items():
        if data.labels.tasks[t] != names:
            raise MMCacheError(f"dataset {dataset!r} has classes {data.labels.tasks[t]} for task {t!r}, the run was "
                               f"trained on {names}; predict with a run of the same label space")
    for tag, h in cfg["resolved"].get("stores", {}).items():
        if data.specs.get(tag) and h and data.specs[tag] != h:
            raise MMCacheError(f"store {tag} of {dataset!r} was rebuilt with another spec (hash {data.specs[tag]}) "
                               f"since the run was trained on it ({h}): the head would score features it never saw; "
                               "train the head again on this store, or restore the store the run was trained on")
    if split == "all":
        idx = torch.arange(len(data.ids), device=device)
    elif split in data.split_index:
        idx = data.split_index[split]
    else:
        raise MMCacheError(f"split {split!r} not in {dataset!r} (splits: {', '.join(data.split_index)}, all)")
    logits = adjust_logits(predict_logits(head, data, idx), run_offsets(cfg))
    from mmcache.runfolder import check_finite_outputs

    check_finite_outputs(logits, str(run_dir))
    out = Path(out) if out else Path(run_dir) / f"predictions_{dataset}_{split}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    multi = len(labels) > 1
    rows_idx = idx.cpu().numpy()
    cols = ["id"]
    for t, names in labels.items():
        p = f"{t}_" if multi else ""
        cols += [f"{p}label", f"{p}predicted", *(f"{p}p_{n}" for n in names)]
    probs = {t: torch.softmax(logits[t].double(), dim=1).cpu().numpy() for t in labels}
    ys = {t: data.targets[t][idx].cpu().numpy() for t in labels}
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r, i in enumerate(rows_idx):
            row: list[Any] = [data.ids[i]]
            for t, names in labels.items():
                y = int(ys[t][r])
                row += [names[y] if y != IGNORE else "", names[int(probs[t][r].argmax())],
                        *(f"{v:.6f}" for v in probs[t][r])]
            w.writerow(row)
    return out
