"""The command line as a user meets it: help everywhere, user errors as one line with exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mmcache.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_top_level_help_lists_every_stage() -> None:
    res = run("--help")
    assert res.returncode == 0
    for cmd in ("data", "extract", "cache", "heads", "finetune"):
        assert cmd in res.stdout


@pytest.mark.parametrize("cmd", [["data", "demo"], ["data", "show"], ["extract"], ["cache", "ls"],
                                 ["heads", "train"], ["finetune", "run"]])
def test_every_command_has_useful_help(cmd: list[str]) -> None:
    res = run(*cmd, "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout and "--help" in res.stdout
    # A real description, not just the usage line.
    assert len(res.stdout.strip().splitlines()) > 5


def test_unknown_dataset_is_one_line_error(tmp_path: Path) -> None:
    res = run("data", "show", "no-such-dataset", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown dataset 'no-such-dataset'")
    assert "demo" in lines[0]  # names the known datasets


def test_missing_dataset_folder_says_what_to_do(tmp_path: Path) -> None:
    res = run("data", "show", "demo", "--data-dir", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "does not exist" in res.stderr and "--data-dir" in res.stderr


def test_demo_then_show_counts_every_row(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert run("data", "demo", "--out", str(out), "--n", "60").returncode == 0
    res = run("data", "show", "demo", "--data-dir", str(out))
    assert res.returncode == 0, res.stderr
    totals = [int(line.split()[-1]) for line in res.stdout.splitlines() if line.split()[:1] in (["train"], ["val"], ["test"])]
    assert sum(totals) == 60
