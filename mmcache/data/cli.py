"""`mmcache data`: generate the demo dataset, list adapters, show a dataset's splits and classes, fetch image URLs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from mmcache.cliutil import parse_kv
from mmcache.runfolder import name_option

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)

MEDIA = ("image", "video", "audio")


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Folder to write the dataset into.")] = Path("data/demo"),
    n: Annotated[int, typer.Option(help="Number of rows.")] = 3000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    noise: Annotated[float, typer.Option(help="Fraction of labels replaced at random.")] = 0.03,
) -> None:
    """Generate the demo dataset: JPEG shapes + short texts; the label needs both modalities."""
    from mmcache.data.demo import generate_demo

    root = generate_demo(out, n=n, seed=seed, noise=noise)
    typer.echo(f"wrote {n} rows to {root / 'data.csv'} (images under {root / 'images'})")


def dataset_options(fold: int | None, seed: int | None, task: str | None, option: list[str] | None) -> dict[str, Any]:
    """The adapter options given on the command line (only those set)."""
    opts = parse_kv(option, "-o", "-o skip_missing=true")
    opts.update({k: v for k, v in (("fold", fold), ("seed", seed), ("task", task)) if v is not None})
    return opts


def missing_media(samples: list[Any]) -> dict[str, int]:
    """Per media field, how many samples point to a file that does not exist."""
    out = {}
    for f in MEDIA:
        paths = [getattr(s, f) for s in samples if getattr(s, f)]
        if paths:
            out[f] = sum(not os.path.exists(p) for p in paths)
    return out


@app.command("show")
def show(
    dataset: Annotated[str, typer.Argument(help="Registered dataset name (see `mmcache data list`).")],
    data_dir: Annotated[Path | None, typer.Option(help="Dataset folder (default data/<name>).")] = None,
    fold: Annotated[int | None, typer.Option(
        help="Cross-validation fold 0-9, for datasets without official splits (MVSA, table, webdataset).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the generated split (datasets without splits).")] = None,
    task: Annotated[str | None, typer.Option(help="Make this task primary (multi-task datasets).")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="Adapter option KEY=VALUE, repeatable (e.g. -o skip_missing=true).")] = None,
    name: Annotated[str | None, typer.Option(
        help="Dataset name for cache/<name>/ (default: the dataset; table/webdataset: the file or folder name).",
        callback=name_option("--name", "memes"))] = None,
    check: Annotated[bool, typer.Option(help="Also count media files that are missing on disk.")] = False,
    samples: Annotated[int, typer.Option(min=0, help="Print the first N samples as JSON lines.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars while reading.")] = True,
) -> None:
    """Print counts per split and class, to check against the paper before extracting."""
    from mmcache.data import load_dataset
    from mmcache.data.io import split_sort_key
    from mmcache.tables import render

    ds = load_dataset(dataset, data_dir, as_name=name, progress=progress,
                      **dataset_options(fold, seed, task, option))
    typer.echo(f"{ds.name}: {len(ds.samples)} samples at {ds.root}")
    typer.echo(f"tasks: {', '.join(ds.labels.tasks)} (primary {ds.labels.primary!r}, metric {ds.labels.metric})")
    for note in ds.notes:
        typer.echo(f"  - {note}")
    splits = sorted(ds.splits, key=split_sort_key)
    counts = ds.counts()
    for task_name, names in ds.labels.tasks.items():
        rows = []
        for split in splits:
            per_class = counts[split][task_name]
            total = len(ds.split(split))
            rows.append([split, *(per_class[n] for n in names), total - sum(per_class.values()), total])
        header = ["split", *names, "no label", "total"]
        typer.echo(f"\ntask {task_name!r} ({len(names)} classes)")
        typer.echo(render(header, rows, right=header[1:]))
    fields = [f for f in ("text", "image", "video", "audio", "entity", "context")
              if any(getattr(s, f) for s in ds.samples)]
    typer.echo(f"\nfields: {', '.join(fields)}")
    if check:
        typer.echo("missing media files:")
        for split in splits:
            miss = missing_media(ds.split(split))
            typer.echo(f"  {split}: " + (", ".join(f"{k} {v}" for k, v in miss.items()) or "no media fields"))
    for s in ds.samples[:samples]:
        typer.echo(json.dumps(s.to_json(), ensure_ascii=False))


@app.command("fetch")
def fetch_cmd(
    dataset: Annotated[str, typer.Argument(help="fakeddit, mmhs150k, or table (a table with http(s):// images).")],
    data_dir: Annotated[Path | None, typer.Option(help="Dataset folder (default data/<name>).")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="Adapter option KEY=VALUE, as for `data show` (e.g. -o image_column=url).")] = None,
    workers: Annotated[int, typer.Option(min=1, max=512, help="Downloads in parallel (threads).")] = 16,
    timeout: Annotated[float, typer.Option(help="Seconds one download may take.")] = 20.0,
    retries: Annotated[int, typer.Option(min=0, help="Retries of a download that timed out, could not connect or "
                                                     "got a 5xx / 429 answer.")] = 1,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Try the URLs that failed in an earlier run "
                                                                      "again (skipped by default).")] = False,
    max_mb: Annotated[float, typer.Option(help="Largest image accepted, in MB.")] = 50.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Download a dataset's image URLs once into its folder, so its adapter reads local files.

    Resumable (images on disk are never fetched again; rerun after a stop), parallel, and every failure is
    recorded with its reason in fetch.jsonl beside the images."""
    from mmcache.data.fetch import describe, fetch, plan_for

    if timeout <= 0 or max_mb <= 0:
        from mmcache.errors import MMCacheError

        raise MMCacheError(f"--timeout and --max-mb must be positive, got {timeout:g} and {max_mb:g}")
    plan = plan_for(dataset, data_dir, parse_kv(option, "-o", "-o image_column=url"))
    for note in plan.notes:
        typer.echo(f"note: {note}", err=True)
    if not plan.jobs:
        typer.echo(f"{dataset}: no image URLs; nothing to fetch")
        return
    res = fetch(plan, workers=workers, timeout=timeout, retries=retries, retry_failed=retry_failed,
                max_bytes=int(max_mb * 1e6), progress=progress)
    typer.echo(describe(res, dataset))


@app.command("list")
def list_() -> None:
    """List registered datasets, their aliases and what each reads."""
    from mmcache.data.base import DATASETS

    for name in DATASETS.names():
        aliases = DATASETS.aliases_of(name)
        doc = (DATASETS[name].__doc__ or "").strip().splitlines()
        extra = f" (alias {', '.join(aliases)})" if aliases else ""
        typer.echo(f"{name}{extra}: {doc[0] if doc else ''}")
