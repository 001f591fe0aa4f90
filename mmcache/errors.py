"""The one exception type for errors a user can cause and fix."""

from __future__ import annotations


class MMCacheError(Exception):
    """A user-caused error (bad input, missing file, unknown preset, stale store).

    The message must say what went wrong *and* what to do about it; the CLI prints
    it as one line and exits non-zero, without a traceback.
    """


def out_of_memory(error: BaseException) -> str | None:
    """When `error` is an allocation failure (Python's MemoryError, torch's CPU allocator or CUDA out of
    memory), a short description of it ("tried to allocate 51.2 GB"); else None."""
    import re

    if isinstance(error, MemoryError):
        return "out of memory"
    text = str(error)
    low = text.lower()
    if not isinstance(error, RuntimeError) or not ("out of memory" in low or "can't allocate memory" in low):
        return None
    got = re.search(r"allocate (\d+) bytes", text)
    if got:
        return f"tried to allocate {int(got.group(1)) / 1e9:.1f} GB"
    got = re.search(r"allocate ([\d.]+ [KMGT]i?B)", text)
    return f"tried to allocate {got.group(1)}" if got else "out of memory"
