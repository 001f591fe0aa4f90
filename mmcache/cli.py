"""The `mmcache` command: one typer app with a subcommand per stage."""

from __future__ import annotations

import typer

from mmcache.cliutil import run_app

app = typer.Typer(
    help="Extract multimodal features once into HDF5 stores, then train fusion heads on them in seconds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from mmcache.cache.cli import app as cache_app
    from mmcache.data.cli import app as data_app
    from mmcache.extract.cli import extract
    from mmcache.finetune.cli import app as finetune_app
    from mmcache.heads.cli import app as heads_app
    from mmcache.predict import predict_cmd

    app.add_typer(data_app, name="data", help="Generate the demo dataset; inspect datasets and fetch their image URLs before "
                  "extracting.")
    app.command("extract", help=extract.__doc__, no_args_is_help=True)(extract)
    app.add_typer(cache_app, name="cache", help="List, inspect, verify and remove feature stores.")
    app.add_typer(heads_app, name="heads", help="Train fusion heads on cached features; predict with them.")
    app.add_typer(finetune_app, name="finetune", help="Fine-tune the encoders end to end with the same heads.")
    app.command("predict", help=predict_cmd.__doc__, no_args_is_help=True)(predict_cmd)


_register()


def main() -> None:
    """Entry point of the `mmcache` console script."""
    run_app(app)


if __name__ == "__main__":
    main()
