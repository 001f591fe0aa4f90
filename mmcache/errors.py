"""The one exception type for errors a user can cause and fix."""

from __future__ import annotations


class MMCacheError(Exception):
    """A user-caused error (bad input, missing file, unknown preset, stale store).

    The message must say what went wrong *and* what to do about it; the CLI prints
    it as one line and exits non-zero, without a traceback.
    """
