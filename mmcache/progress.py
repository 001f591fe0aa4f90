"""The one progress-bar policy of every command.

- On a terminal: tqdm's bar, redrawn in place.
- Not on a terminal (a log file, a pipe, a batch job): whole lines, one every `MMCACHE_PROGRESS_INTERVAL` seconds
  (default 30) and a last one when the bar closes; a bar done within the interval writes nothing. A log never
  gets a run of `\\r` redraws on one line.
- Off within `progress_enabled(False)` (every long command's `--no-progress`, or its `--quiet`), and where the
  caller passes `disable=True` (e.g. every rank but the first).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO

from tqdm import tqdm

INTERVAL_ENV = "MMCACHE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0
_ENABLED: ContextVar[bool] = ContextVar("mmcache_progress", default=True)


@contextmanager
def progress_enabled(on: bool) -> Iterator[None]:
    """Within the block, progress bars show only if `on` (an enclosing `False` is not turned back on)."""
    token = _ENABLED.set(_ENABLED.get() and bool(on))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """Whether progress bars show here (see `progress_enabled`)."""
    return _ENABLED.get()


def log_interval() -> float:
    """Seconds between two lines of a bar written to a log (`MMCACHE_PROGRESS_INTERVAL`, default 30)."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is an interactive terminal (a closed or odd stream counts as not one)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class LineBar(tqdm):
    """A tqdm bar for logs: each refresh is one whole line, at most one per `mininterval` seconds, and a last line
    at close once any was written; nothing is redrawn or cleared."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lines = 0
        self._line_t = -1.0
        self._line_n: float = -1
        super().__init__(*args, **kwargs)
        self._line_t = self.start_t

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # a request to clear the line: a log keeps what it has
            return True
        line = (self.__str__() if msg is None else msg).rstrip()
        if line:
            self.fp.write(line + "\n")
            try:
                self.fp.flush()
            except (AttributeError, ValueError, OSError):
                pass
            self._lines += 1
            self._line_t = self._time()
            self._line_n = self.n
        return True

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> bool:
        # tqdm refreshes after every `tqdm.write` too; in a log only the interval brings a new line.
        if self.disable or self._time() - self._line_t < self.mininterval:
            return False
        return bool(super().refresh(nolock=nolock, lock_args=lock_args))

    def clear(self, nolock: bool = False) -> None:
        pass

    def moveto(self, n: int) -> None:
        pass

    def close(self) -> None:
        if getattr(self, "disable", True):
            return
        if self._lines and self.n != self._line_n:  # the final count, once the log has seen the bar at all
            self._ema_dt = lambda: None  # the overall rate
            with self._lock:
                self.display()
        self.disable = True
        self._decr_instances(self)


def bar(iterable: Iterable[Any] | None = None, *, desc: str | None = None, total: float | None = None,
        unit: str = "it", leave: bool = False, disable: bool = False, file: TextIO | None = None,
        **kwargs: Any) -> tqdm:
    """A progress bar over `iterable` (or updated by hand with `total`), by the policy above."""
    stream = file if file is not None else sys.stderr
    off = disable or not enabled()
    if off or is_terminal(stream):
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=off, file=stream, **kwargs)
    interval = log_interval()
    kwargs.pop("dynamic_ncols", None)
    kwargs.pop("mininterval", None)
    return LineBar(iterable, desc=desc, total=total, unit=unit, file=stream, mininterval=interval, delay=interval,
                   miniters=1, ascii=True, **kwargs)


def write(msg: str, file: TextIO | None = None) -> None:
    """A line on stderr (or `file`) that does not break a bar on screen."""
    tqdm.write(msg, file=file if file is not None else sys.stderr)
