"""`heads train` / `heads predict`: train fusion heads on cached features, predict with a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from mmcache.cliutil import config_options, parse_floats, parse_kv, run_app  # noqa: F401  (parse_kv: importable here)
from mmcache.errors import MMCacheError
from mmcache.heads.config import TrainConfig

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

# CLI flag -> modality of the store it selects.
STORE_FLAGS = {"vtype": "image", "ttype": "text", "ctype": "context", "atype": "audio", "videotype": "video"}


def interrupted(kept: str) -> NoReturn:
    """Ctrl-C in `heads train` / `heads sweep`: say what is kept (nothing resumes) and exit 130."""
    import sys

    print(f"interrupted: {kept}; nothing resumes, run the command again to train again", file=sys.stderr)
    sys.exit(130)


VType = Annotated[str | None, typer.Option("--vtype", "--image", help="Image store (cache/<ds>/image/<name>.h5).")]
TType = Annotated[str | None, typer.Option("--ttype", "--text", help="Text store (cache/<ds>/text/<name>.h5).")]
CType = Annotated[str | None, typer.Option("--ctype", "--context", help="Context-text store name (e.g. captions).")]
AType = Annotated[str | None, typer.Option("--atype", "--audio", help="Audio store name.")]
VideoType = Annotated[str | None, typer.Option("--videotype", "--video", help="Video store name.")]


# The store flags and the head shortcuts shared by `heads train` and `heads sweep`: not config fields, they make
# two of them (`modalities`, `head_hparams`).
def _stores(vtype: str | None, ttype: str | None, ctype: str | None, atype: str | None,
            videotype: str | None) -> dict[str, str]:
    given = {"vtype": vtype, "ttype": ttype, "ctype": ctype, "atype": atype, "videotype": videotype}
    return {STORE_FLAGS[f]: v for f, v in given.items() if v}


def _head_shortcuts(D: int | None = None, dropout: float | None = None, ablation: int | None = None,
                    use: str | None = None, l2norm: bool = False) -> dict[str, Any]:
    hparams: dict[str, Any] = {k: v for k, v in (("D", D), ("dropout", dropout), ("ablation", ablation))
                               if v is not None}
    if use:
        hparams["modalities"] = [m.strip() for m in use.split(",") if m.strip()]
    if l2norm:
        hparams["l2norm"] = True
    return hparams


@app.command("train")
@config_options(TrainConfig)
def train_cmd(
    vtype: VType = None,
    ttype: TType = None,
    ctype: CType = None,
    atype: AType = None,
    videotype: VideoType = None,
    D: Annotated[int | None, typer.Option("--D", help="Branch width D of the head (linear: 0 = no branch).")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout of the head's branches.")] = None,
    ablation: Annotated[int | None, typer.Option(help="0 all modalities, 1 text only, 2 image only.")] = None,
    use: Annotated[str | None, typer.Option(help="Comma list of modalities the head uses (others are "
                                                     "loaded, so rows match, but get no branch).")] = None,
    l2norm: Annotated[bool, typer.Option("--l2norm", help="L2-normalise each modality's inputs.")] = False,
    folds: Annotated[int | None, typer.Option(help="Cross-validation: one head per fold of K (the dataset's own "
                                                   "fold definition, from the same stores); mean ± std.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar (notes and the table stay).")]
    = False,
    options: Any = None,
) -> None:
    """Train a fusion head on cached features; writes runs/<dataset>/<run>/ and prints val/test metrics."""
    from mmcache.heads.train import train
    from mmcache.progress import progress_enabled

    cfg = options.config(modalities=options.merged("modalities", _stores(vtype, ttype, ctype, atype, videotype)),
                         head_hparams=options.merged("head_hparams", _head_shortcuts(D, dropout, ablation, use,
                                                                                     l2norm)))
    if folds is not None:
        from mmcache.heads.cv import cv_table, train_folds

        try:
            with progress_enabled(not no_progress):
                cv = train_folds(cfg, folds)
        except KeyboardInterrupt:
            interrupted(f"fold run folders finished before it are kept under {Path(cfg.runs_dir) / cfg.dataset} (a "
                        "named run then needs --overwrite or another --run-name)")
        typer.echo(cv_table(cv))
        typer.echo(f"run folders: {cv.folder}/fold0 ... fold{folds - 1}; summary: {cv.folder}/cv.csv, .md, .json, .png")
        return
    try:
        with progress_enabled(not no_progress):
            result = train(cfg)
    except KeyboardInterrupt:
        interrupted("no run folder was written")
    if cfg.quiet:  # train() printed nothing: the table and the run folder, as without --quiet
        from mmcache.engine import results_table

        typer.echo(results_table(result))
        if result.run_dir is not None:
            typer.echo(f"run folder: {result.run_dir}")


@app.command("predict")
def predict_cmd(
    run: Annotated[Path, typer.Option(help="Run folder written by `heads train` or `finetune run`.")],
    dataset: Annotated[str | None, typer.Option(help="Dataset to predict on (default: the run's).")] = None,
    split: Annotated[str | None, typer.Option(help="Split to predict (train, val, test, or all; default test, "
                                                   "all with --data).")] = None,
    data: Annotated[Path | None, typer.Option(help="New inputs (a table, labels optional; a folder of images; an "
                                                   "image): extracted as the run's stores were, as `mmcache predict`.")]
    = None,
    data_dir: Annotated[Path | None, typer.Option(help="Raw files of --dataset for a `finetune run` (default: the "
                                                       "run's).")] = None,
    out: Annotated[Path | None, typer.Option(help="CSV to write (default: <run>/predictions_<ds>_<split>.csv).")]
    = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder (default: the run's).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (default: cuda when available).")] = None,
    load: Annotated[str, typer.Option(help="Features: auto (in memory when they fit with room to spare, else "
                                           "streamed), memory (refused in one line when they cannot fit), stream "
                                           "(batches read from the stores; a seed gives the same run).")] = "auto",
) -> None:
    """Write predictions of a trained run as CSV: id, label, predicted, one probability column per class."""
    from mmcache.runfolder import check_run

    finetuned = isinstance(check_run(run)[1].get("encoders"), dict)  # the one check of a run folder that is read
    if data is not None or finetuned:  # raw inputs, encoded as the run's features were
        from mmcache.predict import predict_to_csv, summary_line

        path, preds = predict_to_csv(run, data=data, dataset=dataset, data_dir=data_dir, split=split, out=out,
                                     run_cache_dir=str(cache_dir) if cache_dir else None, device=device)
        typer.echo(summary_line(path, preds))
        return
    from mmcache.heads.train import predict

    path = predict(run, dataset=dataset, split=split or "test", cache_dir=str(cache_dir) if cache_dir else None,
                   out=out, device=device, load=load)
    typer.echo(f"wrote {path}")


def main() -> None:
    """Console-script entry point."""
    run_app(app)


@app.command("sweep")
@config_options(TrainConfig, skip=("seed", "run_name", "overwrite", "quiet"))
def sweep_cmd(
    grid: Annotated[str | None, typer.Option(help="KEY=V1,V2;KEY2=V3,... : TrainConfig fields (head, lr, epochs, "
                                                  "loss, ...), stores (vtype=clip,resnet;ttype=...), loss.NAME "
                                                  "loss options, other names head hparams (D, dropout, ...).")] = None,
    grid_file: Annotated[Path | None, typer.Option(help="TOML grid file ([grid] table of KEY = [values]; optional "
                                                        "top-level seeds = [...]), crossed with --grid.")] = None,
    ablation_scabg: Annotated[bool, typer.Option("--ablation-scabg", help="Run the SCABG ablation: the full model "
                                                                            "and each part switched off in turn (the "
                                                                            "reference variant's parts with --head "
                                                                            "scabg-ref or --hp variant=reference).")]
    = False,
    vtype: VType = None,
    ttype: TType = None,
    ctype: CType = None,
    atype: AType = None,
    videotype: VideoType = None,
    D: Annotated[int | None, typer.Option("--D", help="Branch width D of the head when the grid does not set it.")]
    = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout of the head's branches.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma list of seeds; each config runs once per seed (default 0, "
                                                   "or the grid file's seeds, or the --config run's seed).")] = None,
    folds: Annotated[int | None, typer.Option(help="Cross-validation: every config on each fold of K (from the same "
                                                   "stores); mean ± std over seeds and folds.")] = None,
    columns: Annotated[str | None, typer.Option(help="Comma list of table columns (default: config, what varies, "
                                                     "runs, the val metric, test accuracy / macro F1, seconds).")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Results stem: writes <out>.csv and <out>.json "
                                                  "(default: <runs-dir>/<dataset>/sweeps/sweep_<time>).")] = None,
    save_runs: Annotated[bool, typer.Option("--save-runs", help="Also write a run folder per run.")] = False,
    max_runs: Annotated[int | None, typer.Option(min=1, help="Allow a sweep of more than 10,000 runs (configs x "
                                                             "seeds x folds), up to this many.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    options: Any = None,
) -> None:
    """Train a grid of configs, all at once where they share stores and shape; print and save a table sorted by
    the validation metric (mean +- std over seeds). Under torchrun, config groups are split across ranks."""
    import time

    from mmcache.heads.sweep import configs_from, format_table, load_grid_file, run_sweep, summarize
    from mmcache.progress import progress_enabled

    try:
        seed_list = [int(s) for s in (seeds or str(options.file.get("seed", 0))).split(",") if s.strip()]
    except ValueError:
        raise MMCacheError(f"--seeds expects a comma list of integers, got {seeds!r}") from None
    if not seed_list or any(not 0 <= s < 2**32 for s in seed_list):
        raise MMCacheError(f"--seeds expects a comma list of whole numbers from 0 to {2**32 - 1}, got {seeds!r}")
    if len(set(seed_list)) < len(seed_list):
        raise MMCacheError(f"--seeds lists a seed twice ({seeds!r}): the same seed gives the same run")
    base = options.config(modalities=options.merged("modalities", _stores(vtype, ttype, ctype, atype, videotype)),
                          head_hparams=options.merged("head_hparams", _head_shortcuts(D, dropout)))
    dataset, fold, cache_dir, runs_dir, head = base.dataset, base.fold, Path(base.cache_dir), Path(base.runs_dir), base.head
    if folds is not None and fold is not None:
        raise MMCacheError("--fold and --folds exclude each other: --folds K runs every fold 0..K-1")
    if folds is not None:  # a dataset with its own splits has no folds: say so once, before any config runs
        from mmcache.manifest import Manifest, manifest_path

        mpath = manifest_path(cache_dir, dataset)
        if mpath.is_file() and Manifest.read(mpath, labels=False).split_seed is None:
            raise MMCacheError(f"--folds: {dataset!r} has its own splits (its manifest records no generated "
                               "fold/seed); cross-validation folds exist for datasets whose splits are generated "
                               "(mvsa-single, mvsa-multiple, a table or webdataset without splits)")
    if grid_file is not None:
        from mmcache.heads.sweep import grid_setting, parse_grid

        file_grid, file_seeds = load_grid_file(grid_file)
        both = {grid_setting(k) for k in parse_grid(file_grid, f"grid file {grid_file}")} & {
            grid_setting(k) for k in parse_grid(grid or "")}
        if both:
            raise MMCacheError(f"--grid and --grid-file {grid_file} both set {sorted(both)}; give each key in one "
                               "of them")
        grid = ";".join(g for g in (file_grid, grid) if g)
        if file_seeds and seeds is None:  # --seeds on the command line wins over the file's
            seed_list = file_seeds
    configs = configs_from(grid, ablation_scabg,
                           reference=head == "scabg-ref" or base.head_hparams.get("variant") == "reference")
    out = out or runs_dir / dataset / "sweeps" / f"sweep_{time.strftime('%Y%m%d-%H%M%S')}"
    cols = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    if cols:  # a column no sweep row can have is refused before anything trains
        from mmcache.heads.sweep import METRIC_COLUMNS, STANDARD_COLUMNS

        possible = {*STANDARD_COLUMNS, *(k for _, ov in configs for k in ov), *METRIC_COLUMNS}
        unknown = [c for c in cols if c not in possible]
        if unknown:
            raise MMCacheError(f"--columns: unknown column(s) {unknown}; choose from config, runs, stores, finetuned, "
                               "head, D, lr, the grid's keys, val_/test_ + accuracy, macro_f1, weighted_f1, auroc, "
                               "top2_accuracy, loss, seconds")
    try:
        with progress_enabled(not no_progress):
            rows = run_sweep(base, configs, seed_list, out=out, save_runs=save_runs, folds=folds,
                             max_runs=max_runs)
    except KeyboardInterrupt:
        stem_dir = runs_dir / dataset / "sweeps" / out.name
        interrupted("no table was written (it is written once every run has finished)"
                    + (f"; the run folders finished before it stay in {stem_dir} (choose another --out to run "
                       "again, or delete them)" if save_runs and stem_dir.is_dir() else ""))
    if rows:  # rank 0 (or the only process)
        typer.echo(format_table(summarize(rows), columns=cols))
        typer.echo(f"wrote {out.with_suffix('.csv')}, {out.with_suffix('.md')}, {out.with_suffix('.json')} and "
                   f"{out.with_suffix('.png')}")


@app.command("runs")
def runs_cmd(
    runs_dir: Annotated[Path, typer.Option(help="Folder searched for run folders (config.json + metrics.json).")]
    = Path("runs"),
    dataset: Annotated[str | None, typer.Option(help="Only runs of this dataset.")] = None,
    sort: Annotated[str | None, typer.Option(help="Column to sort by: val, test_accuracy, seconds, date (default), "
                                                  "...; metrics best first.")] = None,
    where: Annotated[list[str] | None, typer.Option(help="KEY=VALUE on a column or a config key (head=gated, "
                                                         "loss=focal, head_hparams.D=256); repeatable.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="text, md or csv.")] = "text",
    best: Annotated[bool, typer.Option("--best", help="Only the best run (val selection metric) per dataset, "
                                                      "stores and head.")] = False,
    columns: Annotated[str | None, typer.Option(help="Comma list of columns to show (default: all; also params, "
                                                     "peak_mem_mb, infer_ms_per_row).")] = None,
    by_config: Annotated[bool, typer.Option("--by-config", help="One row per configuration (runs that differ only "
                                                                "in seed or fold): mean, std and 95% interval of "
                                                                "the test metric, paired tests against the best.")]
    = False,
) -> None:
    """One table over every run folder (heads train, sweeps with --save-runs, CV folds, finetune run)."""
    from mmcache.runs import best_per_group, collect, runs_table, sort_rows

    cols = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    rows = collect(runs_dir, dataset, where or [])
    if by_config:
        from mmcache.runstats import group_runs, grouped_table
        from mmcache.tables import FORMATS

        if best or sort or cols:
            raise MMCacheError("--by-config shows one row per configuration, best first; drop --best, --sort and "
                               "--columns (filter with --dataset / --where)")
        if fmt not in FORMATS:
            raise MMCacheError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
        typer.echo(grouped_table(group_runs(rows, runs_dir), fmt))
        return
    if best:
        rows = best_per_group(rows)
    typer.echo(runs_table(sort_rows(rows, sort), fmt, cols))


@app.command("robustness")
def robustness_cmd(
    run: Annotated[Path, typer.Option(help="Run folder written by `heads train` (or a sweep with --save-runs).")],
    levels: Annotated[str | None, typer.Option(help="Comma list of perturbation levels from 0 to 1, with 0 "
                                                    "(default 0,0.1,...,1, as MultiBench).")] = None,
    kinds: Annotated[str | None, typer.Option(help="Comma list of missing, noise, token_dropout (default: each that "
                                                   "applies to the run).")] = None,
    reference: Annotated[Path | None, typer.Option(help="Another run of the dataset under the same perturbations, "
                                                        "for effective robustness (MultiBench: late fusion).")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed of the noise and token dropout draws.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (default: cuda when available).")] = None,
) -> None:
    """A trained run on its test split with each modality missing, feature noise and token dropout; writes
    robustness.csv, .md, .json and .png in the run folder, with relative and effective robustness (MultiBench)."""
    from mmcache.heads.robustness import robustness, table

    lv = parse_floats(levels, "--levels")
    ks = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else None
    result = robustness(run, levels=lv, kinds=ks, reference=reference, seed=seed, device=device)
    typer.echo(table(result))
    typer.echo(f"wrote {run / 'robustness.csv'}, .md, .json and .png")


if __name__ == "__main__":
    main()
