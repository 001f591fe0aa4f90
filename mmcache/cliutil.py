"""Shared CLI plumbing: user errors as one line, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from mmcache.errors import MMCacheError


def run_app(typer_app: Callable[..., object]) -> None:
    """Run a typer app; a user error prints one line and exits 2, with no traceback."""
    try:
        typer_app()
    except MMCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; committed work is kept, rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
