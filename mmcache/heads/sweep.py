"""Sweeps: train a grid of configs (all at once where they share data and shape) and tabulate val/test metrics.

A grid is `key=v1,v2;key2=v3,v4` (the Cartesian product is run). A key is a `TrainConfig` field
(`head`, `lr`, `epochs`, `loss`, ...), a store key (`vtype`, `ttype`, `ctype`, `atype`, `videotype`, or
`image`, `text`, ...: which store feeds that modality), `loss.NAME` for a loss option, or (`hp.NAME` or any other
name) a head hyperparameter (`D`, `dropout`, `gate`, `bands`, ...). Values are JSON when they parse
(numbers, true/false, [lists]), else strings. A key with one value is a fixed override.

`SCABG_ABLATION` switches each part of the SCABG head and loss off in turn, against the full model.
Every config can run for several seeds (and folds); the table shows per config the mean, the standard deviation and
the 95% t-interval over its runs, and compares each config with the best one (by the validation metric) on the same
test rows: a paired bootstrap over the test rows of the test metric (`mmcache.stats`) and, with at least 3 seeds,
a paired t-test across seeds; with the p-values and whether the difference is significant at 0.05.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from mmcache.cliutil import parse_value, split_kv, split_outside_brackets
from mmcache.errors import MMCacheError
from mmcache.runfolder import check_name
from mmcache.runs import head_width
from mmcache.utils import atomic_write_text, init_distributed, write_json

# (name, overrides): each row turns one part of SCABG off; "full" is the reference point.
SCABG_ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("full", {}),
    ("no-calibration", {"hp.calibrate": False}),
    ("no-condition", {"hp.condition": False}),
    ("one-band", {"hp.bands": 1}),
    ("mean-pool-bands", {"hp.band_queries": False}),
    ("uniform-band-weights", {"hp.aggregate": False}),
    ("no-cross-branch", {"hp.cross_branch": False}),
    ("plain-3way", {"hp.compose": False}),
    ("fixed-aux-weights", {"loss.aux_uncertainty": False}),
    ("no-aux-loss", {"loss.aux_uncertainty": False, "loss.aux_weight": 0.0}),
    ("plain-3way-no-aux", {"hp.compose": False, "loss.aux_uncertainty": False, "loss.aux_weight": 0.0}),
]
# The reference variant (head scabg-ref, loss variant=reference): each of its parts off in turn, then today's rows.
SCABG_REFERENCE_ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("reference", {}),
    ("shared-band-gates", {"hp.branch_gates": False}),
    ("shared-band-attention", {"hp.band_blocks": False}),
    ("linear-aggregator-out", {"hp.agg_mlp": False}),
    ("no-branch-mlps", {"hp.branch_mlp": False}),
    ("no-mix-token", {"hp.mix_token": False}),
    ("score-pooling", {"hp.branch_pool": "score"}),
    ("linear-fuse", {"hp.fuse_mlp": False}),
    ("kd-into-logits", {"hp.kd_branches": ""}),
    ("no-adversarial", {"hp.adversarial": False, "loss.adv_weight": 0.0}),
    ("no-infonce", {"loss.nce_weight": 0.0}),
    ("no-band-consistency", {"loss.band_weight": 0.0}),
    ("unweighted-ce", {"loss.ce_balanced": False}),
    *[(n, ov) for n, ov in SCABG_ABLATION if n != "full"],
]
METRICS = ("accuracy", "macro_f1", "weighted_f1", "auroc")
MAX_RUNS = 10_000  # runs a sweep takes without --max-runs
# The metric columns of sweep rows: a grid key such as val_fraction is a setting, never a metric to rank by.
METRIC_COLUMNS = frozenset(f"{s}_{m}" for s in ("val", "test") for m in (*METRICS, "top2_accuracy", "loss"))
# Grid keys the sweep sets itself, with what to use instead.
RESERVED_KEYS = {"seed": "give the seeds with --seeds", "folds": "give the folds with --folds",
                 "track": "use --track", "save": "use --save-runs",
                 "run_name": "--save-runs names each run folder after its config",
                 "overwrite": "a sweep never overwrites run folders; choose another --out",
                 "quiet": "sweep runs are always quiet"}


def grid_setting(key: str) -> str:
    """What a grid key sets, so two spellings of one setting are told apart from two settings: `vtype` and `image`
    -> `store:image`, `D` and `hp.D` -> `hp.D`, `patience` and `early_stopping` -> `early_stopping`."""
    from mmcache.heads.train import TrainConfig

    key = FLAG_KEYS.get(key, key)
    if key in STORE_KEYS:
        return "store:" + STORE_KEYS[key]
    if key.startswith(("loss.", "hp.")) or key in ("modalities", "head_hparams", "loss_options"):
        return key
    if key == "use":
        return "hp.modalities"
    return key if key in {f.name for f in dataclasses.fields(TrainConfig)} else "hp." + key


def parse_grid(spec: str, where: str = "--grid") -> dict[str, list[Any]]:
    """`head=linear,gated;D=128,256` -> {"head": ["linear", "gated"], "D": [128, 256]}. A value holding `,` or
    `;` is written as a JSON string: `use="image,text",image`. A setting named twice (also as `vtype` and `image`,
    `D` and `hp.D`), a value listed twice, and keys the sweep sets itself (`seed`: --seeds) are refused."""
    grid: dict[str, list[Any]] = {}
    settings: dict[str, str] = {}
    for part in split_outside_brackets(spec, ";"):
        if not part.strip():
            continue
        key, values = split_kv(part, where, "--grid 'head=linear,gated;D=128,256'")
        vals = split_outside_brackets(values)
        if not vals:
            raise MMCacheError(f"{where} part {part!r} must be KEY=V1,V2,... (parts separated by ';')")
        if key in RESERVED_KEYS:
            raise MMCacheError(f"{where}: {key!r} is not a grid key: {RESERVED_KEYS[key]}")
        setting = grid_setting(key)
        if setting in settings:
            same = "twice" if settings[setting] == key else f"twice (as {settings[setting]!r} and {key!r})"
            raise MMCacheError(f"{where} names {key!r} {same}; list all its values in one part")
        settings[setting] = key
        parsed = [parse_value(v) for v in vals]
        shown = [str(v) for v in parsed]  # as the config names show them
        if len(set(shown)) < len(shown):
            twice = next(v for v in shown if shown.count(v) > 1)
            raise MMCacheError(f"{where}: {key} lists {twice} twice; each config runs once per seed (--seeds "
                               "repeats runs)")
        grid[key] = parsed
    return grid


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of a parsed grid, as a list of override dicts (one per config)."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def apply_overrides(base: Any, overrides: dict[str, Any]) -> Any:
    """A copy of TrainConfig `base` with overrides: fields by name, `loss.X` loss options, others head hparams."""
    fields = {f.name for f in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    hparams = dict(base.head_hparams)
    loss_options = dict(base.loss_options)
    for key, value in overrides.items():
        key = FLAG_KEYS.get(key, key)  # `heads train` flag names as grid keys (select, patience, ...)
        if key.startswith("loss."):
            loss_options[key[5:]] = value
        elif key.startswith("hp."):
            hparams[key[3:]] = value
        elif key in ("head_hparams", "loss_options"):
            raise MMCacheError(f"sweep: set {key} entries one by one (hp.NAME=..., loss.NAME=...)")
        elif key in STORE_KEYS:
            changes.setdefault("modalities", dict(base.modalities))[STORE_KEYS[key]] = value
        elif key in ("use", "modalities") and not isinstance(value, dict):
            # Which loaded modalities the head uses (`heads train --use`), not the store mapping.
            hparams["modalities"] = [m.strip() for m in value.split(",")] if isinstance(value, str) else value
        elif key in fields:
            changes[key] = value
        else:
            hparams[key] = value
    return dataclasses.replace(base, **changes, head_hparams=hparams, loss_options=loss_options)


# `heads train` flag names whose TrainConfig field is named otherwise -> that field (so either works as a grid key).
FLAG_KEYS = {"select": "select_metric", "patience": "early_stopping", "l2_grid": "lbfgs_grid",
             "l2_batched": "lbfgs_batched"}

# Grid keys that choose a store (the same names as the `heads train` flags) -> modality.
STORE_KEYS = {"vtype": "image", "ttype": "text", "ctype": "context", "atype": "audio", "videotype": "video",
              "image": "image", "text": "text", "context": "context", "audio": "audio", "video": "video"}


def run_folder_name(config: str) -> str:
    """A config's name as a folder name: `head=linear,D=128` -> `head-linear_D-128`, `bands=0/kd=1` ->
    `bands-0__kd-1`; characters a shell would quote are dropped."""
    name = config.replace("=", "-").replace(",", "_").replace("/", "__")
    return re.sub(r"[^A-Za-z0-9._+-]", "", name) or "config"


def result_row(name: str, overrides: dict[str, Any], seed: int, result: Any, fold: int | None = None) -> dict[str, Any]:
    """One table row of a run: config name, overrides, seed (fold), what it is, val/test metrics, seconds."""
    task = result.select["task"]
    cfg = result.config
    row: dict[str, Any] = {"config": name, **{k: v for k, v in overrides.items()}, "seed": seed,
                           **({"fold": fold} if fold is not None else {}),
                           "stores": "+".join(f"{m}-{s}" for m, s in cfg["modalities"].items()),
                           "finetuned": finetuned_of(cfg["resolved"].get("store_specs") or {}),
                           "head": cfg["head"], "D": head_width(cfg["resolved"]["head_hparams"]), "lr": cfg["lr"],
                           f"val_{result.select['metric']}": result.select["value"]}
    for split in ("val", "test"):
        m = result.metrics.get(split, {}).get(task, {})
        for k in (*METRICS, "top2_accuracy"):
            if isinstance(m.get(k), float):
                row[f"{split}_{k}"] = m[k]
    row["best_epoch"] = result.best_epoch
    row["seconds"] = result.fit_seconds
    for k in COST_COLUMNS:
        if isinstance(result.cost.get(k), (int, float)):
            row[k] = result.cost[k]
    if "shots" in cfg and cfg["shots"]:
        row.setdefault("shots", cfg["shots"])
    if result.predictions is not None:
        row[PREDS] = result.predictions  # kept in memory for the paired bootstrap, never written
    if result.run_dir is not None:
        row["run_dir"] = str(result.run_dir)
    return row


def finetuned_of(store_specs: dict[str, dict[str, Any]]) -> str:
    """Whether a run's stores hold features of fine-tuned encoders (the reference tables' "fine-tuned?"): `no`,
    or the fine-tuning mode (`full`, `lora`, `frozen`) of the stores extracted with `finetuned:RUN`; per
    modality when they differ (`image:lora,text:no`)."""
    modes = {tag.split("/")[0]: (s.get("spec") or {}).get("mode", "?")
             if (s.get("spec") or {}).get("family") == "finetuned" else "no" for tag, s in store_specs.items()}
    if len(set(modes.values())) <= 1:
        return next(iter(modes.values()), "no")
    return ",".join(f"{m}:{v}" for m, v in modes.items())


def _shard(cfgs: list[Any], world: int) -> list[list[int]]:
    """Config indices per rank: whole groups (same stores, head, D, epochs, batch size) stay on one rank, so
    each rank loads its stores once and keeps the batched groups whole; groups are balanced by size."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cfgs):
        # As text: a config of a wrong type (a list as head) must reach training, which refuses it in its row.
        key = repr((c.dataset, sorted(c.modalities.items(), key=repr), c.head, c.head_hparams.get("D"), c.epochs,
                    c.batch_size))
        groups.setdefault(key, []).append(i)
    ranks: list[list[int]] = [[] for _ in range(world)]
    for idxs in sorted(groups.values(), key=len, reverse=True):
        min(ranks, key=len).extend(idxs)
    return ranks


def check_run_count(n: int, max_runs: int | None) -> None:
    """A sweep of more than MAX_RUNS runs (or more than `max_runs`, when given) is refused in one line."""
    if n > (max_runs or MAX_RUNS):
        raise MMCacheError(f"the sweep has {n:,} runs (configs x seeds x folds), more than "
                           + (f"--max-runs {max_runs:,}" if max_runs else f"{MAX_RUNS:,}")
                           + f"; narrow the grid, or pass --max-runs {n} to run them all")


def run_sweep(base: Any, configs: list[tuple[str, dict[str, Any]]], seeds: list[int] | None = None,
              out: Path | str | None = None, save_runs: bool = False, folds: int | None = None,
              max_runs: int | None = None) -> list[dict[str, Any]]:
    """Train every (name, overrides) config for each seed (and each of `folds` cross-validation folds); return
    one row per run (rank 0 under torchrun).

    Stores are loaded once; configs that share data, epochs and batch size train together
    (`train_many`). Under `torchrun` the config groups are split across ranks and the rows
    gathered on rank 0. Writes `<out>.csv`, `<out>.md` and `<out>.json` (raw rows and the
    per-config summary) when `out` is given. A config that fails with a user error is recorded
    with its message and the sweep goes on; when every run fails (e.g. a missing store), that
    error is raised. With `base.track` every run is logged (one child run per config, seed and fold under a
    parent run named after `out`).
    """
    from mmcache.heads.train import check_writable_folder, train_many
    from mmcache.tracking import require

    require(base.track)
    check_run_count(len(configs) * len(seeds or [base.seed]) * (folds or 1), max_runs)
    if out is not None:  # the tables are written after training: refuse a place they cannot go before it
        check_writable_folder(Path(out).parent, "--out", out)
        for suffix in (".csv", ".md", ".json", ".png"):
            if (path := Path(out).with_suffix(suffix)).is_dir():
                raise MMCacheError(f"--out {out}: {path} is a folder; choose another --out")
    if save_runs or base.track:
        check_writable_folder(Path(base.runs_dir) / base.dataset, "--runs-dir")
    seeds = seeds or [base.seed]
    fold_ids: list[int | None] = list(range(folds)) if folds else [None]
    jobs = [(name, ov, s, f) for name, ov in configs for s in seeds for f in fold_ids]
    stem = Path(out).name if out is not None else "sweep"
    folder = Path("sweeps") / stem  # run folders (--save-runs): <runs-dir>/<dataset>/sweeps/<stem>/<config>_seed<S>
    if save_runs:
        check_name(stem, "--out", "results/sweep1")
    if save_runs and (where := Path(base.runs_dir) / base.dataset / folder).is_dir() and any(
            not p.name.startswith(".") for p in where.iterdir()):  # (hidden: a run folder a killed sweep left)
        raise MMCacheError(f"{where} holds the run folders of an earlier sweep named {stem!r}; choose another --out")
    cfgs, names = [], set()
    for name, overrides, seed, fold in jobs:
        cfg = apply_overrides(base, {**overrides, "seed": seed})
        if folds:
            cfg = dataclasses.replace(cfg, fold=fold, folds=folds)
        run_name = str(folder / (run_folder_name(name) + f"_seed{seed}" + (f"_fold{fold}" if folds else "")))
        k, unique = 1, run_name
        while unique in names:  # two config names that differ only in dropped characters
            k += 1
            unique = f"{run_name}-{k}"
        names.add(run_name := unique)
        cfgs.append(dataclasses.replace(cfg, quiet=True, save=save_runs, run_name=run_name if save_runs else None))
    rank, world, _ = init_distributed()
    mine = _shard(cfgs, world)[rank] if world > 1 else list(range(len(cfgs)))
    print(f"sweep: {len(mine)} run(s) ({len(configs)} config(s) x {len(seeds)} seed(s)"
          + (f" x {folds} folds" if folds else "") + (f", rank {rank} of {world}" if world > 1 else "") + ")",
          file=sys.stderr)
    # The table reports val and test; run folders (--save-runs) get every split.
    results = train_many([cfgs[i] for i in mine], errors=True, splits=None if save_runs else ("val", "test"))
    rows_by_index: dict[int, dict[str, Any]] = {}
    tracked = []
    for i, res in zip(mine, results, strict=True):
        name, overrides, seed, fold = jobs[i]
        if isinstance(res, MMCacheError):
            rows_by_index[i] = {"config": name, **overrides, "seed": seed, **({"fold": fold} if folds else {}),
                                "error": str(res)}
            print(f"warning: sweep config {name} (seed {seed}{f', fold {fold}' if folds else ''}) failed: {res}",
                  file=sys.stderr)
        else:
            rows_by_index[i] = result_row(name, overrides, seed, res, fold)
            tracked.append((f"{name} seed{seed}" + (f" fold{fold}" if folds else ""), res,
                            {"kind": "heads", "dataset": base.dataset, "config": name, "seed": str(seed),
                             **({"fold": str(fold)} if folds else {})}))

    def log(files: list[Path]) -> None:
        if base.track and tracked:  # under torchrun each rank logs its own runs, under a parent of its own
            from mmcache.tracking import track

            track(base.track, base.dataset, base.runs_dir, tracked,
                  parent=(stem + (f" rank{rank}" if world > 1 else ""),
                          {"configs": len(configs), "seeds": seeds, "folds": folds, "grid": [n for n, _ in configs]}),
                  files=files)

    if world > 1:
        import torch.distributed as dist

        log([])
        gathered: list[Any] = [None] * world if rank == 0 else []
        dist.gather_object(rows_by_index, gathered if rank == 0 else None, dst=0)
        # Every rank waits until rank 0 holds all rows: a rank that left while its rows were still in flight
        # could make the other abort (gloo: connection closed by peer). The command's exit ends the group.
        dist.barrier()
        if rank != 0:
            return []
        for part in gathered:
            rows_by_index.update(part)
    rows = [rows_by_index[i] for i in sorted(rows_by_index)]
    if rows and all("error" in r for r in rows):
        raise MMCacheError(f"every sweep run failed; the first: {rows[0]['error']}")
    files = write_results(rows, Path(out)) if out is not None else []
    if world == 1:
        log(files)
    return rows


DESCRIBE = ("stores", "finetuned", "head", "D", "lr")  # columns that say what a config is (as the reference tables)
PER_RUN = ("config", "seed", "fold", "best_epoch", "seconds", "run_dir", "error")  # row keys of one run, not a config
COST_COLUMNS = ("params", "peak_mem_mb", "infer_ms_per_row")  # every run's cost (mmcache.heads.cost), besides seconds
PREDS = "_predictions"  # a row's per-row test predictions (in memory only)
# Columns of the comparison with the best config: the test metric's difference, the paired bootstrap's interval of
# it and p-value, the paired t-test's p-value (>= 3 seeds), significance at 0.05.
COMPARE_COLUMNS = ("vs_best", "vs_best_low", "vs_best_high", "p_boot", "p_ttest", "significant")


def summarize(rows: list[dict[str, Any]], n_boot: int | None = None) -> list[dict[str, Any]]:
    """Per config: what it is (stores, finetuned, head, D, lr), the mean, standard deviation (`_std`) and 95%
    t-interval (`_low`, `_high`) over its runs of every metric column, mean seconds and cost; sorted best first by
    the validation metric that chose the epochs (test metrics are reported, never used to rank). Every config but
    the best is compared with the best (`compare_column`; COMPARE_COLUMNS): paired by seed and fold, by a paired
    bootstrap over the test rows when the rows hold predictions (`n_boot` resamples) and a paired t-test of the
    test metric across at least 3 runs."""
    from mmcache.stats import interval

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["config"], []).append(r)
    out = []
    for name, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        s: dict[str, Any] = {"config": name, "runs": len(ok)}
        for k in DESCRIBE:
            if ok and k in ok[0]:
                s[k] = ok[0][k]
        for k, v in rs[0].items():  # the grid's keys (the same in every run of a config), for --columns
            if k not in METRIC_COLUMNS and k not in PER_RUN and k not in COST_COLUMNS and k != PREDS and k not in s:
                s[k] = v
        if len(ok) < len(rs):
            s["error"] = next(r["error"] for r in rs if "error" in r)
        cols = list(dict.fromkeys(k for r in ok for k in r if k in METRIC_COLUMNS or k in ("seconds", *COST_COLUMNS)))
        for k in cols:
            vals = [r[k] for r in ok if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
            if vals:
                s[k] = statistics.fmean(vals)
                if len(vals) > 1 and k in METRIC_COLUMNS:
                    iv = interval(vals)
                    s[f"{k}_std"], s[f"{k}_low"], s[f"{k}_high"] = iv["std"], iv["ci_low"], iv["ci_high"]
        out.append(s)
    key = _rank_column(rows)
    if key:
        lower = key == "val_loss"
        out.sort(key=lambda s: (key not in s, (s.get(key, 0.0) if lower else -s.get(key, 0.0))))
    compare_with_best(out, groups, key, n_boot)
    return out


def compare_column(rank: str | None) -> str | None:
    """The test metric configs are compared on: the selection metric's (test accuracy when selecting by loss)."""
    from mmcache.stats import boot_metric

    return None if rank is None else "test_" + boot_metric(rank[4:])


def compare_with_best(summary: list[dict[str, Any]], groups: dict[str, list[dict[str, Any]]], rank: str | None,
                      n_boot: int | None = None) -> None:
    """Add COMPARE_COLUMNS to each config of `summary` (sorted best first) but the best."""
    from mmcache.stats import BOOTSTRAP, compare_to_best, comparison_columns

    column = compare_column(rank)
    ranked = [s for s in summary if rank is not None and isinstance(s.get(rank), (int, float)) and s.get("runs")]
    if column is None or len(ranked) < 2 or not isinstance(ranked[0].get(column), (int, float)):
        return
    ok = {name: [r for r in rs if "error" not in r] for name, rs in groups.items()}
    preds = {name: [r.get(PREDS) for r in rs] for name, rs in ok.items()}
    best = ranked[0]["config"]
    best_row = ranked[0]
    best_row["compared_on"] = column
    res = compare_to_best({s["config"]: ok[s["config"]] for s in ranked}, best, column, preds, column[5:],
                          n_boot=n_boot or BOOTSTRAP)
    for s in ranked[1:]:
        s["compared_on"] = column
        s.update(comparison_columns(res.get(s["config"], {})))


def _rank_column(rows: list[dict[str, Any]]) -> str | None:
    """The selection metric's column (`val_<metric>`): the first val column of a successful row."""
    for r in rows:
        if "error" not in r:
            return next((k for k in r if k in METRIC_COLUMNS and k.startswith("val_")), None)
    return None


STANDARD_COLUMNS = ("config", "runs", *DESCRIBE, "seconds", *COST_COLUMNS, *COMPARE_COLUMNS)  # any sweep table's


def default_columns(summary: list[dict[str, Any]]) -> list[str]:
    """The columns the console table shows: config, the describing columns that differ between configs, runs,
    the validation selection metric, test accuracy and macro F1 (and the test selection metric), seconds."""
    keys = list(dict.fromkeys(k for s in summary for k in s))
    rank = _rank_column(summary)
    desc = [k for k in DESCRIBE if len({str(s.get(k)) for s in summary if k in s}) > 1]
    tests = [f"test_{rank[4:]}"] if rank and rank != "val_loss" else []
    tests += ["test_accuracy", "test_macro_f1"]
    metrics = [k for k in dict.fromkeys([rank or "", *tests]) if k in keys]
    compare = [c for c in ("vs_best", "p_boot", "p_ttest", "significant") if c in keys]
    return ["config", *desc, "runs", *metrics, *compare, "seconds"]


def format_table(summary: list[dict[str, Any]], fmt: str = "text", columns: list[str] | None = None) -> str:
    """`summarize` output as a text (`fmt="text"`, rich) or markdown (`"md"`) table: one row per config, best first,
    mean ± std over seeds (and folds). `columns`: the columns to show (default `default_columns`; the markdown
    file shows every column); an unknown column is an error listing the known ones."""
    if not summary:
        return "(no runs)"
    from mmcache.tables import render

    known = list(dict.fromkeys(k for s in summary for k in s
                               if not k.endswith(("_std", "_low", "_high")) and k not in ("error", "compared_on")))
    if columns is None:
        if fmt == "md":
            metric_cols = [k for k in known if k in METRIC_COLUMNS]
            extra = [k for k in (*COMPARE_COLUMNS, "seconds", *COST_COLUMNS) if k in known and k != "vs_best_low"
                     and k != "vs_best_high"]
            cols = ["config", *[k for k in DESCRIBE if k in known], "runs", *metric_cols, *extra]
        else:
            cols = default_columns(summary)
    else:
        unknown = [c for c in columns if c not in known and c not in (*STANDARD_COLUMNS, *METRIC_COLUMNS)]
        if unknown:
            raise MMCacheError(f"--columns: unknown column(s) {unknown}; the sweep has {', '.join(known)}")
        cols = list(columns)

    def cell(s: dict[str, Any], c: str) -> str:
        if c not in s:
            return "-"
        v = s[c]
        if c in METRIC_COLUMNS and isinstance(v, float):
            text = f"{v:.4f} ± {s[c + '_std']:.4f}" if f"{c}_std" in s else f"{v:.4f}"
            if fmt == "md" and isinstance(s.get(c + "_low"), float):
                text += f" [{s[c + '_low']:.4f}, {s[c + '_high']:.4f}]"
            return text
        if c == "vs_best" and isinstance(v, float):
            text = f"{v:+.4f}"
            if isinstance(s.get("vs_best_low"), float):
                text += f" [{s['vs_best_low']:+.4f}, {s['vs_best_high']:+.4f}]"
            return text
        if c in ("p_boot", "p_ttest") and isinstance(v, float):
            return f"{v:.3f}"
        if c == "significant":
            return "yes" if v else "no"
        if c in ("seconds", "peak_mem_mb") and isinstance(v, float):
            return f"{v:.2f}" if c == "seconds" else f"{v:.0f}"
        if c == "infer_ms_per_row" and isinstance(v, float):
            return f"{v:.4f}"
        if c == "params" and isinstance(v, (int, float)):
            return f"{int(v):,}"
        return str(v)

    if summary[0].get("compared_on") and "vs_best" not in summary[0]:
        summary = [{**summary[0], "vs_best": "best"}, *summary[1:]]  # the config the others are compared with

    note = any("error" in s for s in summary)
    rows = [[cell(s, c) for c in cols] + ([f"error: {s['error']}" if "error" in s else ""] if note else [])
            for s in summary]
    header = [*cols, *(["note"] if note else [])]
    right = [c for c in cols if c in METRIC_COLUMNS or c in ("runs", "seconds", "D", "lr", *COST_COLUMNS,
                                                             *COMPARE_COLUMNS)]
    on = next((s["compared_on"] for s in summary if s.get("compared_on")), None)
    legend = None
    if on and any(k in cols for k in ("vs_best", "p_boot", "p_ttest")):
        legend = (f"vs_best: {on} minus the best config's (ranked by {_rank_column(summary) or 'validation'}) with "
                  "its 95% interval, and p_boot, from a paired bootstrap over the test rows; p_ttest: paired t-test "
                  "across seeds (3 or more); significant: p < 0.05")
    table = render(header, rows, fmt, right=right, title=legend)
    return table + f"\n\n{legend}" if legend and fmt == "md" else table


def write_results(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """`<out>.csv` (one row per run), `<out>.md` (the summary table), `<out>.json` (rows + summary) and `<out>.png`
    (grouped bars per config, error bars over seeds); returns the files written."""
    from mmcache.plots import plot_sweep

    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    rows = [{k: v for k, v in r.items() if k != PREDS} for r in rows]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = out.with_suffix(".csv")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(out.with_suffix(".md"), format_table(summary, "md") + "\n")
    write_json(out.with_suffix(".json"), {"rows": rows, "summary": summary})
    shown = [c for c in default_columns(summary) if c in METRIC_COLUMNS]
    plot_sweep(summary, shown, out.with_suffix(".png"), f"{out.name}: mean ± std over runs")
    files = [out.with_suffix(x) for x in (".csv", ".md", ".json", ".png")]
    column = compare_column(_rank_column(rows))
    if column and len({s.get("shots") for s in summary}) > 1:  # a few-shot sweep: the curve against shots
        from mmcache.plots import plot_shots

        files.append(out.with_name(out.name + "_shots.png"))
        plot_shots(summary, column, files[-1], f"{out.name}: few-shot curve")
    return [p for p in files if p.exists()]


def load_grid_file(path: Path | str) -> tuple[str, list[int] | None]:
    """A TOML grid file -> (`--grid` spec, seeds or None). Keys of its `[grid]` table (or of the top level)
    are grid keys with a value or a list of values; a top-level `seeds = [0, 1, 2]` sets the seeds.

        seeds = [0, 1, 2]
        [grid]
        vtype = ["clip", "resnet"]
        head = ["linear", "gated"]
        D = [128, 256]
        lr = [1e-3, 1e-4]
    """
    import json

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path)
    try:
        obj = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise MMCacheError(f"grid file {p} not found") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, not text
        raise MMCacheError(f"grid file {p} cannot be read ({getattr(e, 'strerror', None) or e}); pass a TOML "
                           "file") from None
    except tomllib.TOMLDecodeError as e:
        raise MMCacheError(f"grid file {p} is not valid TOML: {e}") from None
    seeds = obj.pop("seeds", None)
    table = obj.pop("grid", None)
    if table is None:
        table = obj
    elif obj:
        raise MMCacheError(f"grid file {p}: put every key under [grid] (found {sorted(obj)} outside it)")
    if not isinstance(table, dict) or not table:
        raise MMCacheError(f"grid file {p} names no grid key; see `heads sweep --help`")
    # `hp.D = [...]` (TOML's dotted keys) and `[grid.loss]` tables are nested tables: the keys hp.D, loss.gamma.
    flat: dict[str, Any] = {}
    for k, v in table.items():
        if k in ("hp", "loss") and isinstance(v, dict):
            if not v:
                raise MMCacheError(f"grid file {p}: [{k}] names no key")
            flat.update({f"{k}.{sub}": x for sub, x in v.items()})
        else:
            flat[k] = v
    parts = []
    for k, v in flat.items():
        vals = v if isinstance(v, list) else [v]
        if not vals:
            raise MMCacheError(f"grid file {p}: {k} has no values")
        # Text goes as it is unless it holds a separator or a quote: then as a JSON string, read back whole.
        parts.append(f"{k}=" + ",".join(x if isinstance(x, str) and not set(x) & set(',;[]{}"') else json.dumps(x)
                                        for x in vals))
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32
                                         for x in seeds)):
        raise MMCacheError(f"grid file {p}: seeds must be a non-empty list of whole numbers from 0 to {2**32 - 1}, "
                           f"got {seeds!r}")
    if seeds is not None and len(set(seeds)) < len(seeds):
        raise MMCacheError(f"grid file {p}: seeds lists a seed twice ({seeds}): the same seed gives the same run")
    return ";".join(parts), seeds


def configs_from(grid: str | None, ablation_scabg: bool,
                 reference: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """Named configs of a `--grid` spec and/or the SCABG ablation preset (crossed when both are given); with
    `reference`, the reference variant's ablation (head scabg-ref, the reference loss recipe)."""
    grid_cfgs = [(",".join(f"{k}={v}" for k, v in ov.items()) or "base", ov)
                 for ov in expand_grid(parse_grid(grid or ""))]
    if not ablation_scabg:
        return grid_cfgs
    base: dict[str, Any] = {"head": "scabg", "loss": "scabg"}
    rows = SCABG_ABLATION
    if reference:
        base, rows = {"head": "scabg-ref", "loss": "scabg", "loss.variant": "reference"}, SCABG_REFERENCE_ABLATION
    out = []
    for gname, gov in grid_cfgs:
        for aname, aov in rows:
            name = aname if gname == "base" else f"{gname}/{aname}"
            out.append((name, {**base, **gov, **aov}))
    return out
