"""The one progress-bar policy: in place on a terminal, whole lines at a modest rate in a log, off on request."""

from __future__ import annotations

import io
import time

import pytest
from typer.testing import CliRunner

from mmcache.progress import INTERVAL_ENV, bar, progress_enabled, write


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_at_the_interval_and_a_last_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0.05")
    log = io.StringIO()
    for i in bar(range(40), desc="work", unit="row", file=log):
        time.sleep(0.005)
        if i == 10:
            write("warning: row 10 skipped", file=log)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    assert 2 <= len(lines) <= 8, lines  # about 0.2 s of work: a line per 0.05 s, not one per row
    assert "warning: row 10 skipped" in lines
    bars = [ln for ln in lines if ln.startswith("work:")]
    assert bars[-1].startswith("work: 100%") and "40/40" in bars[-1]
    assert len(bars) == len(set(bars))  # no line written twice (the last is not repeated at close)


def test_a_short_bar_writes_nothing_to_a_log_and_off_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INTERVAL_ENV, raising=False)  # the default: 30 s
    log = io.StringIO()
    assert sum(bar(range(1000), desc="quick", file=log)) == sum(range(1000))
    assert log.getvalue() == ""
    monkeypatch.setenv(INTERVAL_ENV, "0")
    tty = Terminal()
    with progress_enabled(False):
        with progress_enabled(True):  # an inner block does not turn an outer --no-progress back on
            list(bar(range(5), desc="x", file=log))
            list(bar(range(5), desc="x", file=tty))
    assert log.getvalue() == "" and tty.getvalue() == ""
    list(bar(range(5), desc="x", file=log, disable=True))
    assert log.getvalue() == ""


def test_a_terminal_gets_tqdm_redrawn_in_place() -> None:
    tty = Terminal()
    for _ in bar(range(3), desc="tty", file=tty, mininterval=0):
        pass
    assert "\r" in tty.getvalue() and "tty" in tty.getvalue()


@pytest.mark.parametrize("command", [["extract"], ["heads", "train"], ["heads", "sweep"], ["finetune", "run"],
                                     ["predict"], ["data", "fetch"], ["data", "show"]])
def test_every_long_command_takes_no_progress(command: list[str]) -> None:
    from mmcache.cli import app

    res = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--no-progress" in res.output, res.output
