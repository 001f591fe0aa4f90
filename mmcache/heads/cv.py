"""Cross-validation on the cache: `heads train --folds K` trains one head per fold from the same stores.

The features do not depend on the fold, only the split does: the stores are loaded once and each fold's
splits are computed from the dataset's definition (`CachedData.for_fold`, the splits `mmcache extract
--fold K` would write), so nothing is extracted again. The folds train in one `train_many` call; each fold
writes its run folder `<cv folder>/fold<k>/` (fold and seed in its config.json), and the CV folder gets
`cv.csv` (one row per fold), `cv.md`, `cv.json` (rows + mean, std and 95% t-interval) and `cv.png`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcache.engine import RunResult, new_run_dir
from mmcache.errors import MMCacheError
from mmcache.heads.sweep import default_columns, result_row, summarize, write_results
from mmcache.heads.train import TrainConfig, run_stem, run_tags, train_many


@dataclass
class CVResult:
    """Per-fold results and rows (fold, seed, val/test metrics, seconds), the summary (mean and std over folds)."""

    folder: Path | None
    results: list[RunResult]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def fold_configs(cfg: TrainConfig, k: int, folder: Path | None) -> list[TrainConfig]:
    """One config per fold of `k`: the same config with `fold`, `folds` and the run folder `<folder>/fold<j>`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise MMCacheError(f"--folds must be a whole number >= 2, got {k!r}")
    if cfg.fold is not None:
        raise MMCacheError("--fold and --folds exclude each other: --folds K trains every fold 0..K-1")
    return [dataclasses.replace(cfg, fold=j, folds=k, run_name=f"{folder.name}/fold{j}" if folder is not None else None,
                                overwrite=True)
            for j in range(k)]


def train_folds(cfg: TrainConfig, k: int) -> CVResult:
    """Train `cfg` on each of the `k` folds (stores loaded once); print and return per-fold rows and mean ± std."""
    from mmcache.tracking import require

    require(cfg.track)
    folder = None
    if cfg.save:
        folder = new_run_dir(cfg.runs_dir, cfg.dataset, cfg.run_name, ["cv", *run_stem(cfg), f"k{k}"], cfg.overwrite)
    cfgs = fold_configs(cfg, k, folder)
    results = train_many(cfgs)
    done = [r for r in results if isinstance(r, RunResult)]
    if len(done) != len(results):  # train_many raises the first error itself; this is a guard
        raise next(r for r in results if isinstance(r, MMCacheError))
    name = folder.name if folder is not None else "cv"
    rows = [result_row(name, {}, c.seed, r, c.fold) for c, r in zip(cfgs, done, strict=True)]
    summary = summarize(rows)[0]
    files: list[Path] = []
    if folder is not None:
        files = write_results(rows, folder / "cv")
    if cfg.track:
        from mmcache.tracking import track

        track(cfg.track, cfg.dataset, cfg.runs_dir, [(f"fold{c.fold}", r, run_tags(c, "heads"))
                                                     for c, r in zip(cfgs, done, strict=True)],
              parent=(name, {**{k_: v for k_, v in cfg.to_json().items() if k_ not in ("fold", "folds")}, "folds": k}),
              files=files)
    return CVResult(folder=folder, results=done, rows=rows, summary=summary)


def cv_table(cv: CVResult, fmt: str = "text") -> str:
    """Per-fold rows, then the mean ± std over folds and the 95% t-interval of the mean."""
    from mmcache.tables import render

    cols = [c for c in default_columns([cv.summary]) if c.startswith(("val_", "test_"))]
    other = [c for c in ("test_weighted_f1", "test_auroc") if c not in cols and any(c in r for r in cv.rows)]
    cols += other
    header = ["fold", "seed", *cols, "best_epoch", "seconds"]
    rows: list[list[Any]] = []
    for r in cv.rows:
        rows.append([r["fold"], r["seed"], *(f"{r[c]:.4f}" if isinstance(r.get(c), float) else "-" for c in cols),
                     r["best_epoch"], f"{r['seconds']:.2f}"])
    s = cv.summary
    mean_row: list[Any] = ["mean ± std", ""]
    mean_row += [f"{s[c]:.4f} ± {s.get(c + '_std', 0.0):.4f}" if isinstance(s.get(c), float) else "-" for c in cols]
    mean_row += ["", f"{s['seconds']:.2f}"]
    rows.append(mean_row)
    if any(isinstance(s.get(c + "_low"), float) for c in cols):  # the t-interval of the mean over folds
        rows.append(["95% interval", "", *(f"{s[c + '_low']:.4f} to {s[c + '_high']:.4f}"
                                           if isinstance(s.get(c + "_low"), float) else "-" for c in cols), "", ""])
    return render(header, rows, fmt, right=[*cols, "best_epoch", "seconds"])
