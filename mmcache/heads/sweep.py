"""Sweeps: train a grid of configs one after another and tabulate val/test metrics and time.

A grid is `key=v1,v2;key2=v3,v4` (the Cartesian product is run). A key is a `TrainConfig` field
(`head`, `lr`, `epochs`, `loss`, ...), `loss.NAME` for a loss option, or (`hp.NAME` or any other
name) a head hyperparameter (`D`, `dropout`, `gate`, `bands`, ...). Values are JSON when they parse
(numbers, true/false, [lists]), else strings. A key with one value is a fixed override.

`SCABG_ABLATION` switches each part of the SCABG head and loss off in turn, against the full model.
Every config can run for several seeds; the table shows mean and standard deviation over seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmcache.errors import MMCacheError
from mmcache.utils import parse_value, split_outside_brackets, write_json

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
METRICS = ("accuracy", "macro_f1", "weighted_f1", "auroc")


def parse_grid(spec: str) -> dict[str, list[Any]]:
    """`head=linear,gated;D=128,256` -> {"head": ["linear", "gated"], "D": [128, 256]}."""
    grid: dict[str, list[Any]] = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        key, sep, values = part.partition("=")
        key = key.strip()
        vals = split_outside_brackets(values)
        if not sep or not key or not vals:
            raise MMCacheError(f"--grid part {part!r} must be KEY=V1,V2,... (parts separated by ';')")
        if key in grid:
            raise MMCacheError(f"--grid names {key!r} twice; list all its values in one part")
        grid[key] = [parse_value(v) for v in vals]
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
        if key.startswith("loss."):
            loss_options[key[5:]] = value
        elif key.startswith("hp."):
            hparams[key[3:]] = value
        elif key in ("head_hparams", "loss_options"):
            raise MMCacheError(f"sweep: set {key} entries one by one (hp.NAME=..., loss.NAME=...)")
        elif key in fields:
            changes[key] = value
        else:
            hparams[key] = value
    return dataclasses.replace(base, **changes, head_hparams=hparams, loss_options=loss_options)


def _row(name: str, overrides: dict[str, Any], seed: int, result: Any, seconds: float) -> dict[str, Any]:
    task = result.select["task"]
    row: dict[str, Any] = {"config": name, **{k: v for k, v in overrides.items()}, "seed": seed,
                           f"val_{result.select['metric']}": result.select["value"]}
    for split in ("val", "test"):
        m = result.metrics.get(split, {}).get(task, {})
        for k in METRICS:
            if isinstance(m.get(k), float):
                row[f"{split}_{k}"] = m[k]
    row["best_epoch"] = result.best_epoch
    row["seconds"] = seconds
    if result.run_dir is not None:
        row["run_dir"] = str(result.run_dir)
    return row


def run_sweep(base: Any, configs: list[tuple[str, dict[str, Any]]], seeds: list[int] | None = None,
              out: Path | str | None = None, save_runs: bool = False) -> list[dict[str, Any]]:
    """Train every (name, overrides) config for each seed, sequentially; return one row per run.

    Writes `<out>.csv` and `<out>.json` (raw rows and the per-config summary) when `out` is given.
    A config that fails with a user error is recorded with its message and the sweep goes on;
    when every run fails (e.g. a missing store), that error is raised.
    """
    from mmcache.heads.train import train

    seeds = seeds or [base.seed]
    rows: list[dict[str, Any]] = []
    jobs = [(name, ov, s) for name, ov in configs for s in seeds]
    bar = tqdm(jobs, desc="sweep", unit="run")
    for name, overrides, seed in bar:
        bar.set_postfix_str(name)
        cfg = apply_overrides(base, {**overrides, "seed": seed})
        cfg = dataclasses.replace(cfg, quiet=True, save=save_runs, run_name=None)
        t0 = time.perf_counter()
        try:
            result = train(cfg)
        except MMCacheError as e:
            rows.append({"config": name, **overrides, "seed": seed, "error": str(e)})
            print(f"warning: sweep config {name} (seed {seed}) failed: {e}", file=sys.stderr)
            continue
        rows.append(_row(name, overrides, seed, result, time.perf_counter() - t0))
    if rows and all("error" in r for r in rows):
        raise MMCacheError(f"every sweep run failed; the first: {rows[0]['error']}")
    if out is not None:
        write_results(rows, Path(out))
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config: mean and standard deviation over seeds of every metric column, and mean seconds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["config"], []).append(r)
    out = []
    for name, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        s: dict[str, Any] = {"config": name, "runs": len(ok)}
        if len(ok) < len(rs):
            s["error"] = next(r["error"] for r in rs if "error" in r)
        cols = [k for k in (ok[0] if ok else {}) if k.startswith(("val_", "test_")) or k == "seconds"]
        for k in cols:
            vals = [r[k] for r in ok if isinstance(r.get(k), (int, float))]
            if vals:
                s[k] = statistics.fmean(vals)
                if len(vals) > 1 and k != "seconds":
                    s[f"{k}_std"] = statistics.stdev(vals)
        out.append(s)
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    """A text table of `summarize` output: one row per config, mean (+- std over seeds)."""
    if not summary:
        return "(no runs)"
    cols = [k for k in dict.fromkeys(k for s in summary for k in s)
            if k.startswith(("val_", "test_")) and not k.endswith("_std")]
    width = max(8, *(len(s["config"]) for s in summary))
    head = f"{'config':<{width}} " + " ".join(f"{c:>18}" for c in cols) + f" {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for s in summary:
        cells = []
        for c in cols:
            if c not in s:
                cells.append(f"{'-':>18}")
            elif f"{c}_std" in s:
                cells.append(f"{s[c]:>11.4f}+-{s[c + '_std']:.3f}")
            else:
                cells.append(f"{s[c]:>18.4f}")
        secs = f"{s['seconds']:>8.1f}" if "seconds" in s else f"{'-':>8}"
        line = f"{s['config']:<{width}} " + " ".join(cells) + f" {secs}"
        if "error" in s:
            line += f"  error: {s['error']}"
        lines.append(line)
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    """`<out>.csv` (one row per run) and `<out>.json` (rows + per-config summary)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = out.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    write_json(out.with_suffix(".json"), {"rows": rows, "summary": summarize(rows)})


def configs_from(grid: str | None, ablation_scabg: bool) -> list[tuple[str, dict[str, Any]]]:
    """Named configs of a `--grid` spec and/or the SCABG ablation preset (crossed when both are given)."""
    grid_cfgs = [(",".join(f"{k}={v}" for k, v in ov.items()) or "base", ov)
                 for ov in expand_grid(parse_grid(grid or ""))]
    if not ablation_scabg:
        return grid_cfgs
    base = {"head": "scabg", "loss": "scabg"}
    out = []
    for gname, gov in grid_cfgs:
        for aname, aov in SCABG_ABLATION:
            name = aname if gname == "base" else f"{gname}/{aname}"
            out.append((name, {**base, **gov, **aov}))
    return out
