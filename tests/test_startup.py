"""Start-up: `--help` of every command and every `mmcache data` command load no deep-learning library;
`make test` ends with pytest's pass count."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip", "transformers", "sklearn", "matplotlib")

# Runs each command line through the real entry point, in one fresh interpreter, and reports after each
# which heavy libraries are loaded by then.
PROBE = r"""
import json, sys
import typer
from mmcache.cli import app, main

HEAVY = {heavy}

def commands(cmd, path):
    yield path
    for name, sub in getattr(cmd, "commands", {{}}).items():
        yield from commands(sub, [*path, name])

def loaded():
    return sorted(m for m in HEAVY if m in sys.modules)

lines = [[*p, "--help"] for p in commands(typer.main.get_command(app), [])] + {extra}
report = []
for argv in lines:
    sys.argv = ["mmcache", *argv]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    report.append({{"argv": argv, "code": code, "heavy": loaded()}})
print("REPORT" + json.dumps(report))
"""


def probe(extra: list[list[str]]) -> list[dict]:
    """Run `mmcache --help`, every subcommand's `--help`, then `extra` command lines; one report per line."""
    code = PROBE.format(heavy=repr(set(HEAVY)), extra=repr(extra))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.rsplit("REPORT", 1)[1])


def test_every_help_and_data_command_loads_no_heavy_library(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    report = probe([["data", "list"], ["data", "demo", "--out", str(demo), "--n", "30", "--seed", "1"],
                    ["data", "show", "demo", "--data-dir", str(demo), "--check", "--samples", "2"]])
    helps = [r["argv"] for r in report if r["argv"][-1] == "--help"]
    # The walk reached every stage and the leaf commands below them.
    for argv in (["--help"], ["extract", "--help"], ["heads", "train", "--help"], ["heads", "sweep", "--help"],
                 ["finetune", "run", "--help"], ["cache", "verify", "--help"], ["data", "show", "--help"]):
        assert argv in helps
    for r in report:
        assert r["code"] == 0, f"`mmcache {' '.join(r['argv'])}` exited {r['code']}"
        assert r["heavy"] == [], f"`mmcache {' '.join(r['argv'])}` imported {r['heavy']}; import them where needed"
    assert (demo / "data.csv").is_file()


def test_console_scripts_import_no_heavy_library() -> None:
    code = ("import sys; import mmcache.heads.cli, mmcache.finetune.cli, mmcache.extract.cli, mmcache.data.cli, "
            "mmcache.cache.cli; import mmcache.extract, mmcache.heads, mmcache.data; "
            f"print(sorted(m for m in {set(HEAVY)!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_registries_still_fill_on_first_use() -> None:
    code = ("import sys; from mmcache.extract import PRESETS, build_extractor; from mmcache.heads import HEADS; "
            "print('clip-tiny' in PRESETS, 'gated' in HEADS, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "True", "True"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_ends_with_the_pass_count(tmp_path: Path) -> None:
    recipe = subprocess.run(["make", "-n", "--no-print-directory", "test"], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert recipe.returncode == 0, recipe.stderr
    line = next(x for x in recipe.stdout.splitlines() if "pytest" in x)
    argv = shlex.split(line)
    assert "tests" in argv, line
    # The same command and the project's pytest settings, on one tiny test instead of the suite.
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    i = argv.index("tests")
    argv[i:i + 1] = [str(tmp_path / "test_one.py"), "-c", str(ROOT / "pyproject.toml")]
    if not (ROOT / argv[0]).exists():
        argv[0] = sys.executable
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^1 passed in ", res.stdout, re.M), res.stdout
