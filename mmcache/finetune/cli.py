"""`finetune` commands (being built)."""

from __future__ import annotations

import typer

from mmcache.cliutil import run_app

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)


def main() -> None:
    """Console-script entry point."""
    run_app(app)
