"""`heads runs --by-config`: the run folders grouped by configuration (every setting but the seed and fold), with
the mean, standard deviation and 95% t-interval of the test metric over each group's runs, and each group against
the best one (by mean validation value) on the same test rows: a paired bootstrap over the rows from the runs'
`predictions_test.csv`, and a paired t-test across runs paired by seed and fold (at least 3). `mmcache.stats`
computes both. Reads JSON and CSV only: no torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmcache.stats import BOOTSTRAP, Predictions, boot_metric, compare_to_best, comparison_columns, interval, read_predictions

# config.json keys that tell runs of one configuration apart without changing what it is.
NOT_CONFIG = ("seed", "fold", "run_name", "overwrite", "quiet", "save", "track", "device", "threads", "runs_dir",
              "resolved", "cache_dir", "data_dir", "resume", "out")
GROUP_COLUMNS = ("config", "dataset", "stores", "head", "D", "lr", "select", "runs", "val", "test", "test_std",
                 "test_ci", "vs_best", "p_boot", "p_ttest", "significant", "fit_seconds", "params", "peak_mem_mb",
                 "infer_ms_per_row")


def config_key(cfg: dict[str, Any]) -> str:
    """What a run is, as text: its config.json without seed, fold and where it ran."""
    return json.dumps({k: v for k, v in cfg.items() if k not in NOT_CONFIG}, sort_keys=True, default=str)


def _fit_seconds(runs_dir: Path, run: str) -> float | None:
    """A run's fitting time (metrics.json `fit_seconds`; `seconds` there is the whole command's)."""
    try:
        met = json.loads((runs_dir / run / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    v = met.get("fit_seconds") if isinstance(met, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def group_runs(rows: list[dict[str, Any]], runs_dir: Path, n_boot: int = BOOTSTRAP) -> list[dict[str, Any]]:
    """One summary per configuration of `rows` (`mmcache.runs.collect` rows), best first by mean `val`; each
    group's runs are paired with the best group's by seed and fold."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(config_key(r["_config"]), []).append(r)
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for k, (key, rs) in enumerate(groups.items()):
        first = rs[0]
        metric = boot_metric(first["_metric"] or "accuracy")
        test = [r.get(f"test_{metric}") for r in rs]
        iv = interval([v for v in test if isinstance(v, (int, float))])
        vals = [r["val"] for r in rs if isinstance(r.get("val"), (int, float)) and math.isfinite(r["val"])]
        s: dict[str, Any] = {"config": f"c{k + 1}", "dataset": first["dataset"], "stores": first["stores"],
                             "head": first["head"], "D": first["D"], "lr": first["lr"], "select": first["select"],
                             "runs": len(rs), "val": sum(vals) / len(vals) if vals else None, "metric": metric,
                             "test": iv["mean"], "test_std": iv["std"], "test_low": iv["ci_low"],
                             "test_high": iv["ci_high"], "members": [r["run"] for r in rs], "_key": key}
        for c in ("params", "peak_mem_mb", "infer_ms_per_row"):
            xs = [r[c] for r in rs if isinstance(r.get(c), (int, float))]
            s[c] = sum(xs) / len(xs) if xs else None
        fits = [f for f in (_fit_seconds(runs_dir, r["run"]) for r in rs) if f is not None]
        s["fit_seconds"] = sum(fits) / len(fits) if fits else None
        names[key] = s["config"]
        out.append(s)
    # Best first within each (dataset, selection metric): other groups are not compared with each other.
    out.sort(key=lambda s: (str(s["dataset"]), str(s["select"]), s["val"] is None,
                            (s["val"] or 0.0) if (s["select"] or "").endswith(":loss") else -(s["val"] or 0.0)))
    by_set: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in out:
        by_set.setdefault((str(s["dataset"]), str(s["select"])), []).append(s)
    for members in by_set.values():
        ranked = [s for s in members if s["val"] is not None and s["test"] is not None]
        if len(ranked) < 2:
            continue
        best = ranked[0]
        metric = best["metric"]
        column = f"test_{metric}"
        rows_of = {s["config"]: groups[s["_key"]] for s in ranked}
        preds: dict[str, list[Predictions | None]] = {}
        for name, rs in rows_of.items():
            preds[name] = [read_predictions(runs_dir / r["run"]) if not Path(r["run"]).is_absolute()
                           else read_predictions(Path(r["run"])) for r in rs]
        res = compare_to_best(rows_of, best["config"], column, preds, metric, n_boot=n_boot)
        best["vs_best"] = "best"
        for s in ranked[1:]:
            s.update(comparison_columns(res.get(s["config"], {})))
    for s in out:
        s.pop("_key")
    return out


def _cell(s: dict[str, Any], c: str) -> str:
    v = s.get(c)
    if c == "test" and isinstance(v, float):
        return f"{s['metric']} {v:.4f}"
    if c == "test_ci":
        return f"{s['test_low']:.4f} to {s['test_high']:.4f}" if isinstance(s.get("test_low"), float) else "-"
    if v is None:
        return "-"
    if c == "vs_best" and isinstance(v, float):
        lo, hi = s.get("vs_best_low"), s.get("vs_best_high")
        return f"{v:+.4f}" + (f" [{lo:+.4f}, {hi:+.4f}]" if isinstance(lo, float) and isinstance(hi, float) else "")
    if c == "significant":
        return "yes" if v else "no"
    if c in ("val", "test_std") and isinstance(v, float):
        return f"{v:.4f}"
    if c in ("p_boot", "p_ttest") and isinstance(v, float):
        return f"{v:.3f}"
    if c == "params" and isinstance(v, (int, float)):
        return f"{int(v):,}"
    if c in ("fit_seconds", "peak_mem_mb") and isinstance(v, float):
        return f"{v:.1f}"
    if c == "infer_ms_per_row" and isinstance(v, float):
        return f"{v:.4f}"
    if c == "lr" and isinstance(v, float):
        return f"{v:g}"
    return str(v)


def grouped_table(summary: list[dict[str, Any]], fmt: str = "text") -> str:
    """The groups as a table (text, md or csv), with a line per group naming its runs below in text and md."""
    from mmcache.tables import render

    if not summary:
        return "(no runs)"
    cols = [c for c in GROUP_COLUMNS if c in ("config", "runs", "test", "test_ci")
            or any(s.get(c) is not None for s in summary)]
    if fmt == "csv":
        body = [[s.get(c) if c != "test_ci" else (f"{s['test_low']}..{s['test_high']}"
                                                   if s.get("test_low") is not None else None) for c in cols]
                for s in summary]
        return render(cols, body, "csv")
    body = [[_cell(s, c) for c in cols] for s in summary]
    right = [c for c in cols if c not in ("config", "dataset", "stores", "head", "select", "significant")]
    table = render(cols, body, fmt, right=right,
                   title="test: mean over the runs of the selection metric (accuracy for loss); test_ci: its 95% "
                         "t-interval; vs_best: paired bootstrap over the test rows against the best config (by val), "
                         "p_ttest: paired t-test across seeds/folds (3 or more); significant: p < 0.05")
    lines = [f"{s['config']}: {', '.join(s['members'])}" for s in summary]
    return table + "\n\n" + "\n".join(lines)
