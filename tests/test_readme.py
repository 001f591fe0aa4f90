"""The README's Python example runs as written, on a small synthetic cache laid out like the demo's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.heads.conftest import build_cache

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(marker: str) -> str:
    """The first ```python block after `marker` in the README."""
    text = README.read_text()
    start = text.index(marker)
    m = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert m, f"no python block after {marker!r}"
    return m.group(1)


def test_train_a_head_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    build_cache(cache, dataset="demo", n=600)
    for mod in ("image", "text"):  # the demo's store names
        (cache / "demo" / mod / "feat.h5").rename(cache / "demo" / mod / "clip.h5")
    monkeypatch.chdir(tmp_path)
    code = python_block_after("**From Python.**")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    fused = float(re.search(r"gated head: test accuracy ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    image_only = float(re.search(r"image-only probe: test accuracy ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert fused > 0.85 and 0.3 < image_only < 0.75  # fusion reads both scores; the image alone caps near 5/9
    assert not (tmp_path / "runs").exists()  # save=False writes no run folder
