"""`heads runs`: one table over every run folder under a runs folder (heads and finetune runs alike).

A run folder is any folder holding `config.json` and `metrics.json` (what `heads train`, each fold of
`heads train --folds`, `heads sweep --save-runs` and `finetune run` write). Reads JSON only: no torch.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmcache.errors import MMCacheError

COLUMNS = ("run", "kind", "dataset", "stores", "head", "D", "lr", "fold", "seed", "select", "val",
           "test_accuracy", "test_macro_f1", "test_weighted_f1", "test_auroc", "seconds", "date",
           "params", "peak_mem_mb", "infer_ms_per_row")
METRICS = ("test_accuracy", "test_macro_f1", "test_weighted_f1", "test_auroc")
COST = ("params", "peak_mem_mb", "infer_ms_per_row")  # metrics.json's cost record: shown with --columns
ASCENDING = {"run", "kind", "dataset", "stores", "head", "select", "seconds"}  # sorted low to high; others high first
# --best keeps the best run of each; runs selected by different metrics (accuracy, loss, ...) are not compared.
GROUP = ("dataset", "stores", "head", "select")


def head_width(hparams: dict[str, Any]) -> Any:
    """A head's D as the tables show it: its `D`, or the width `D` set (`hidden`: scabg), or None."""
    return hparams.get("D") if hparams.get("D") is not None else hparams.get("hidden")


def folder_name(dataset: Any) -> Any:
    """A dataset as its folders name it: several datasets `a,b` are `a-b` (`runs/a-b/`, `cache/a-b/`)."""
    return "-".join(p.strip() for p in dataset.split(",")) if isinstance(dataset, str) and "," in dataset else dataset


def find_runs(runs_dir: Path) -> list[Path]:
    """Every run folder under `runs_dir` (sorted by path); folders being written or left by a killed write
    (hidden: `.tmp-*`, see `mmcache.runfolder`) are not runs."""
    # mlflow's artifact copies of run folders (<runs>/mlruns/, the default store of --track mlflow) are not runs.
    return sorted(p.parent for p in runs_dir.rglob("metrics.json") if (p.parent / "config.json").is_file()
                  and not any(x == "mlruns" or x.startswith(".") for x in p.relative_to(runs_dir).parts))


def find_incomplete(runs_dir: Path) -> list[Path]:
    """Run folders under `runs_dir` that are not finished: a write that was killed, a fine-tuning run in progress
    or killed (its checkpoints and no metrics.json)."""
    from mmcache.runfolder import incomplete_runs

    return incomplete_runs(runs_dir) + sorted(
        p.parent for p in runs_dir.rglob("checkpoints") if p.is_dir() and not (p.parent / "metrics.json").exists()
        and not any(x == "mlruns" or x.startswith(".") for x in p.relative_to(runs_dir).parts))


def _stores(cfg: dict[str, Any]) -> str:
    if isinstance(cfg.get("modalities"), dict):
        return "+".join(f"{m}-{s}" for m, s in cfg["modalities"].items())
    # finetune: NAME=PRESET[options] per modality; the NAME (or the preset) says which encoder it was.
    encs = cfg.get("encoders") or {}
    return "+".join(f"{m}-{str(p).split('=', 1)[0].split('[', 1)[0]}" for m, p in encs.items())


def read_run(d: Path, runs_dir: Path) -> dict[str, Any]:
    """The table row of run folder `d` (an MMCacheError naming the file when its JSON is unreadable)."""
    from mmcache.runfolder import check_config, check_head_json, read_json, safetensors_header

    check_head_json(d / "head.json")
    cfg = check_config(d / "config.json", read_json(d / "config.json"))
    met = read_json(d / "metrics.json")
    safetensors_header(d / "model.safetensors")
    res = cfg.get("resolved") or {}
    for key in ("select", "splits"):
        if met.get(key) is not None and not isinstance(met[key], dict):
            raise MMCacheError(f"{d / 'metrics.json'}: {key}: must be an object")
    sel = met.get("select") or {}
    task = sel.get("task")
    test = (met.get("splits") or {}).get("test", {})
    test = test.get(task, {}) if isinstance(test, dict) and isinstance(task, str) else {}
    test = test if isinstance(test, dict) else {}
    if (val := sel.get("value")) is not None and (not isinstance(val, (int, float)) or isinstance(val, bool)):
        raise MMCacheError(f"{d / 'metrics.json'}: select.value: {json.dumps(val)[:40]} is not a number")
    row: dict[str, Any] = {
        "run": str(d.relative_to(runs_dir)) if d.is_relative_to(runs_dir) else str(d),
        "kind": "finetune" if "encoders" in cfg else "heads",
        "dataset": folder_name(cfg.get("dataset")),
        "stores": _stores(cfg),
        "head": cfg.get("head"),
        "D": head_width(res.get("head_hparams") or cfg.get("head_hparams") or {}),
        "lr": cfg.get("lr"),
        "fold": res.get("fold", cfg.get("fold")),
        "seed": cfg.get("seed"),
        "select": f"{task}:{sel.get('metric')}" if task else None,
        "val": sel.get("value"),
        **{k: test.get(k[5:]) for k in METRICS},
        "seconds": met.get("seconds"),
        **{k: (met.get("cost") or {}).get(k) for k in COST},
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime((d / "metrics.json").stat().st_mtime)),
        "_config": cfg,
        "_metric": sel.get("metric"),
    }
    return row


def collect(runs_dir: Path, dataset: str | None = None, where: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of every readable run under `runs_dir` (unreadable ones are skipped with a warning), filtered by
    dataset and by `KEY=VALUE` conditions on a column or a config key (`loss=focal`, `head_hparams.D=256`)."""
    if not runs_dir.is_dir():
        raise MMCacheError(f"runs folder {runs_dir} does not exist; train something first or pass --runs-dir")
    conds = []
    for w in where:
        key, sep, value = w.partition("=")
        if not sep or not key:
            raise MMCacheError(f"--where expects KEY=VALUE, got {w!r}")
        conds.append((key.strip(), value.strip()))
    from mmcache.runfolder import missing_files

    rows = []
    known: set[str] = set()  # --where keys some run has (a key no run has is a typo, not an empty match)
    read = 0
    cut = find_incomplete(runs_dir)
    for d in find_runs(runs_dir):
        try:
            met = json.loads((d / "metrics.json").read_text())
        except (OSError, ValueError):
            met = None
        if missing_files(d, met if isinstance(met, dict) else None):  # written in place and cut short (older runs)
            cut.append(d)
            continue
        try:
            row = read_run(d, runs_dir)
        except MMCacheError as e:
            print(f"warning: skipped {e}", file=sys.stderr)
            continue
        read += 1
        known.update(k for k, _ in conds if _lookup(row, k) is not _MISSING)
        if dataset is not None and row["dataset"] != folder_name(dataset):
            continue
        if all(_matches(_lookup(row, k), v) for k, v in conds):
            rows.append(row)
    if cut:
        shown = ", ".join(str(p.relative_to(runs_dir)) for p in cut[:3]) + (", ..." if len(cut) > 3 else "")
        print(f"note: skipped {len(cut)} incomplete run folder(s) (being written, or killed before they were "
              f"finished): {shown}", file=sys.stderr)
    unknown = [k for k, _ in conds if k not in known]
    if unknown and read:
        raise MMCacheError(f"--where {unknown[0]!r}: no run has this column or config key; use a column "
                           f"({', '.join(COLUMNS)}) or a config key such as loss or head_hparams.D")
    return rows


def _lookup(row: dict[str, Any], key: str) -> Any:
    if key in row and not key.startswith("_"):
        return row[key]
    cur: Any = row["_config"]
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


_MISSING = object()


def _matches(value: Any, want: str) -> bool:
    if value is _MISSING:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return math.isclose(float(value), float(want), rel_tol=1e-9)
        except ValueError:
            return False
    if isinstance(value, bool) or value is None:
        return json.dumps(value) == want.lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":")) == want.replace(" ", "")
    return str(value) == want


def sort_rows(rows: list[dict[str, Any]], column: str | None) -> list[dict[str, Any]]:
    """Rows by `column` (metrics high first, `seconds` and names low first, dates newest first); rows without a
    value last. Default: newest first. `val` holds each run's own selection metric: rows are grouped by it, each
    group best first (a loss low first)."""
    column = column or "date"
    if rows and column not in rows[0]:
        raise MMCacheError(f"--sort {column!r}: unknown column; choose one of {', '.join(COLUMNS)}")
    present = [r for r in rows if r.get(column) is not None]
    missing = [r for r in rows if r.get(column) is None]
    reverse = column not in ASCENDING
    if column == "val":  # grouped by selection metric (values of different metrics do not compare), best first
        present.sort(key=lambda r: r["val"] if r["_metric"] == "loss" else -r["val"])
        present.sort(key=lambda r: str(r["select"]))
    else:
        present.sort(key=lambda r: r[column], reverse=reverse)
    return present + missing


def best_per_group(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run with the best validation selection value of each (dataset, stores, head, selection metric) group."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        if r.get("val") is None or (isinstance(r["val"], float) and math.isnan(r["val"])):
            continue
        key = tuple(r[k] for k in GROUP)
        cur = best.get(key)
        lower = r["_metric"] == "loss"
        if cur is None or (r["val"] < cur["val"] if lower else r["val"] > cur["val"]):
            best[key] = r
    return list(best.values())


def _cell(v: Any, col: str) -> str:
    if v is None:
        return "-"
    if col in ("val", *METRICS) and isinstance(v, (int, float)):
        return f"{v:.4f}"
    if col in ("seconds", "peak_mem_mb") and isinstance(v, (int, float)):
        return f"{v:.1f}"
    if col == "infer_ms_per_row" and isinstance(v, (int, float)):
        return f"{v:.4f}"
    if col == "lr" and isinstance(v, float):
        return f"{v:g}"
    return str(v)


def runs_table(rows: list[dict[str, Any]], fmt: str = "text", columns: Sequence[str] | None = None) -> str:
    """The table of `rows` as text (rich), markdown or CSV: `columns` (default every column; metric and fold
    columns that no run has are left out)."""
    from mmcache.tables import FORMATS, render

    if fmt not in FORMATS:
        raise MMCacheError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    unknown = [c for c in columns or () if c not in COLUMNS]
    if unknown:
        raise MMCacheError(f"--columns: unknown column(s) {unknown}; choose from {', '.join(COLUMNS)}")
    if not rows:
        return "(no runs)" if fmt != "csv" else ",".join(columns or COLUMNS)
    cols = list(columns) if columns else [c for c in COLUMNS if c not in COST and (
        c not in (*METRICS, "fold") or any(r.get(c) is not None for r in rows))]
    if fmt == "csv":
        body = [[r.get(c) for c in cols] for r in rows]
    else:
        body = [[_cell(r.get(c), c) for c in cols] for r in rows]
    right = ["D", "lr", "fold", "seed", "val", *METRICS, "seconds", *COST]
    return render(cols, body, fmt, right=right)
