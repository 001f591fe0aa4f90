"""The documentation stays true: its marked blocks run as written, its CLI reference is the code's, the site builds.

A ```bash or ```python block of the tutorial or a how-to page runs here when the line before its fence is
`<!-- test -->`. Marked blocks use only the demo dataset and the `*-tiny` presets (no download). The tutorial's
blocks run in order in one empty folder (it generates its own data); each how-to page's blocks run in order in a
copy of a small demo workspace: `data/demo/` (600 rows) and its `clip` image and text stores in `cache/demo/`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
MARKED = re.compile(r"^<!-- test -->\n```(?P<lang>[a-z]*)\n(?P<code>.*?)^```$", re.S | re.M)
PAGES = ["tutorial.md", *sorted(str(p.relative_to(DOCS)) for p in (DOCS / "howto").glob("*.md"))]


def marked_blocks(page: str) -> list[tuple[str, str, int]]:
    """(language, code, line) of each marked block of a docs page, in page order."""
    text = (DOCS / page).read_text()
    return [(m.group("lang"), m.group("code"), text.count("\n", 0, m.start()) + 2) for m in MARKED.finditer(text)]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}", OMP_NUM_THREADS="1", MMCACHE_THREADS="1",
             HF_HUB_OFFLINE="1", MPLBACKEND="Agg", COLUMNS="200")
    return e


def run_block(page: str, lang: str, code: str, line: int, cwd: Path) -> None:
    if lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    elif lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        pytest.fail(f"docs/{page}:{line}: a marked block must be bash or python, not {lang!r}")
    res = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, (f"docs/{page}:{line}: the block failed (exit {res.returncode})\n{code}\n"
                                 f"--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}")


@pytest.fixture(scope="module")
def demo_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("docs-demo")
    run_block("(workspace)", "bash", "mmcache data demo --out data/demo --n 600 >/dev/null\n"
              "mmcache extract demo --data-dir data/demo --image clip=clip-tiny --text clip=clip-tiny --no-progress\n",
              0, ws)
    return ws


def test_pages_mark_their_runnable_blocks() -> None:
    """Markers sit right before a bash or python fence; the tutorial and the how-to pages keep theirs."""
    for page in PAGES:
        text = (DOCS / page).read_text()
        assert text.count("<!-- test -->") == len(marked_blocks(page)), f"docs/{page}: a marker not before a fence"
    assert len(marked_blocks("tutorial.md")) >= 6
    assert sum(len(marked_blocks(p)) for p in PAGES if p != "tutorial.md") >= 5


@pytest.mark.slow
def test_tutorial_runs_as_written(tmp_path: Path) -> None:
    for lang, code, line in marked_blocks("tutorial.md"):
        run_block("tutorial.md", lang, code, line, tmp_path)
    assert (tmp_path / "preds.csv").read_text().startswith("id,")
    assert (tmp_path / "runs" / "demo" / "gated" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if p != "tutorial.md" and marked_blocks(p)])
def test_howto_blocks_run_as_written(page: str, demo_workspace: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(demo_workspace, work, symlinks=True)
    for lang, code, line in marked_blocks(page):
        run_block(page, lang, code, line, work)


def test_cli_reference_is_generated_from_the_commands() -> None:
    from mmcache import clidoc

    heads = clidoc.markdown("heads")
    for command in ("heads train", "heads sweep", "heads runs", "heads robustness", "heads predict"):
        assert f"`{command}`" in heads
    assert "`--epochs <int>`" in heads and "| `50` |" in heads
    assert "`finetune run`" in clidoc.markdown("finetune")
    top = clidoc.markdown("mmcache")
    assert "`mmcache extract`" in top and "`mmcache data fetch`" in top and "`mmcache heads" not in top
    page = (DOCS / "reference" / "cli.md").read_text()
    assert all(f"<!-- cli {prog} -->" in page for prog in ("mmcache", "heads", "finetune"))


def test_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the navigation, or a snippet whose file
    is gone fails here (skipped where the docs extra is not installed)."""
    mkdocs = shutil.which("mkdocs", path=str(BIN))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    res = subprocess.run([mkdocs, "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         env={**env(), "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "cli.html").is_file()
