"""Start-up and import rules: `--help` of every command and every `mmcache data` command load no deep-learning
library; no module uses another module's private (underscore) names (a helper two modules share is public in
the module that owns it; read from the source with `ast`); `make test` ends with pytest's pass count."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmcache

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip", "transformers", "sklearn", "matplotlib")
PACKAGE = Path(mmcache.__file__).parent

# (importing module, "defining.module.name") pairs allowed for now, each with its reason. Empty: none.
ALLOWED: dict[tuple[str, str], str] = {}

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


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def imported_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ImportFrom reads (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[:-(node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_uses(path: Path, modules: set[str], package: Path = PACKAGE) -> list[tuple[str, str, int]]:
    """(importing module, "module.name", line) for each private name of another mmcache module that `path`
    imports (`from m import _x`) or reads as an attribute (`m._x`, `pkg.m._x`)."""
    me = module_name(path, package)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[str, str, int]] = []
    aliases: dict[str, str] = {}  # local name -> the mmcache module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = imported_from(node, me, path.name == "__init__.py")
            if source.split(".")[0] != "mmcache":
                continue
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                if private(alias.name) and source != me:
                    found.append((me, f"{source}.{alias.name}", node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mmcache":  # `import a.b` binds `a`; `import a.b as c` binds `c`
                    aliases[alias.asname or "mmcache"] = alias.name if alias.asname else "mmcache"
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and private(node.attr)):
            continue
        chain: list[str] = []
        value = node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in aliases:
            owner = ".".join([aliases[value.id], *reversed(chain)])
            if owner in modules and owner != me:
                found.append((me, f"{owner}.{node.attr}", node.lineno))
    return found


def all_private_uses() -> list[tuple[str, str, int]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return [use for p in paths for use in private_uses(p, modules)]


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [f"{me} (line {line}) uses {name}" for me, name, line in all_private_uses() if (me, name) not in ALLOWED]
    assert not bad, ("private names used outside their module; make the helper public in the module that owns "
                     "it:\n" + "\n".join(bad))


def test_allowed_private_uses_still_exist() -> None:
    uses = {(me, name) for me, name, _ in all_private_uses()}
    stale = [f"{me} -> {name}" for me, name in ALLOWED if (me, name) not in uses]
    assert not stale, "allowed private uses that are gone; remove them from ALLOWED:\n" + "\n".join(stale)


def test_the_scan_sees_each_form(tmp_path: Path) -> None:
    src = tmp_path / "mmcache" / "pkg"
    src.mkdir(parents=True)
    probe = src / "probe.py"
    probe.write_text("from mmcache.data.table import _get, read_rows\n"
                     "from . import sibling\n"
                     "from .sibling import _helper\n"
                     "import mmcache.extract.runner as runner\n"
                     "import mmcache.utils\n"
                     "x = sibling._hidden + runner._part_path + mmcache.utils._private + sibling.__name__\n",
                     encoding="utf-8")
    modules = {"mmcache.data.table", "mmcache.pkg.sibling", "mmcache.pkg.probe", "mmcache.extract.runner",
               "mmcache.utils"}
    found = {name for _, name, _ in private_uses(probe, modules, tmp_path / "mmcache")}
    assert found == {"mmcache.data.table._get", "mmcache.pkg.sibling._helper", "mmcache.pkg.sibling._hidden",
                     "mmcache.extract.runner._part_path", "mmcache.utils._private"}


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
