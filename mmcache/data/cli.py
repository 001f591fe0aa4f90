"""`mmcache data`: generate the demo dataset, show a dataset's splits and classes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)


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


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Registered dataset name (see `mmcache data list`).")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset folder (default data/<name>).")] = None,
    fold: Annotated[Optional[int], typer.Option(help="Cross-validation fold, for datasets without official splits.")] = None,
) -> None:
    """Print counts per split and class, to check against the paper before extracting."""
    from mmcache.data import load_dataset

    opts = {} if fold is None else {"fold": fold}
    ds = load_dataset(name, data_dir, **opts)
    typer.echo(f"{ds.name}: {len(ds.samples)} samples at {ds.root}")
    for task, names in ds.labels.tasks.items():
        width = max(8, *(len(n) for n in names))
        typer.echo(f"\ntask {task!r} ({len(names)} classes)")
        typer.echo("split".ljust(8) + "".join(n.rjust(width + 1) for n in names) + "total".rjust(width + 1))
        for split, per_task in ds.counts().items():
            counts = per_task[task]
            typer.echo(split.ljust(8) + "".join(str(counts[n]).rjust(width + 1) for n in names)
                       + str(len(ds.split(split))).rjust(width + 1))


@app.command("list")
def list_() -> None:
    """List registered dataset names."""
    from mmcache.data import dataset_names

    for n in dataset_names():
        typer.echo(n)
