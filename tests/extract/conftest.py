"""Shared fixtures for extractor tests: a small demo dataset on disk, offline hubs."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

N_DEMO = 40


@pytest.fixture(autouse=True)
def _user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """mmcache's user cache (weight hashes) under the test's tmp_path, never in ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache" / "mmcache"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process without network and without HF_HUB_OFFLINE: the Hub check says unreachable, the Hugging Face
    cache is empty, and any socket connection fails the test (no test may touch the network)."""
    import huggingface_hub.constants as hub_constants

    from mmcache.extract import weights

    def no_connect(self: socket.socket, *args: object) -> None:
        raise AssertionError("a test opened a network connection")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(weights, "hub_reachable", lambda: False)
    monkeypatch.setattr(weights, "_switched_offline", False)
    monkeypatch.setattr(socket.socket, "connect", no_connect)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-row demo dataset (images + data.csv), written once per session; tests must not modify it."""
    from mmcache.data.demo import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo"), n=N_DEMO, seed=3, size=32)


@pytest.fixture
def demo_ds(demo_root: Path):  # noqa: ANN201
    """The demo dataset loaded through its adapter."""
    from mmcache.data import load_dataset

    return load_dataset("demo", demo_root)


@pytest.fixture
def broken_root(demo_root: Path, tmp_path: Path) -> Path:
    """A copy of the demo with one corrupt, one empty and one missing image (rows 1, 2, 3)."""
    root = tmp_path / "broken"
    shutil.copytree(demo_root, root)
    (root / "images" / "demo00001.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    (root / "images" / "demo00002.jpg").write_bytes(b"")
    (root / "images" / "demo00003.jpg").unlink()
    return root
