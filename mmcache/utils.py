"""Small shared helpers: seeding, library versions, device choice, JSON files."""

from __future__ import annotations

import json
import os
import random
import subprocess
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

LIBS = ("mmcache", "torch", "torchvision", "open_clip_torch", "transformers", "h5py", "numpy", "scikit-learn")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    """Installed versions of the libraries that determine results, plus the git commit if any."""
    out: dict[str, str] = {}
    for lib in LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    commit = git_commit()
    if commit:
        out["git_commit"] = commit
    return out


def git_commit() -> str | None:
    """The commit of the mmcache source tree, when it is a git checkout."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def init_distributed(cpu: bool = False) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; under torchrun (world > 1) the default
    process group is initialised once: nccl when CUDA is there and `cpu` is not asked, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and not cpu else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(device: str | None = None) -> str:
    """`device` if given (checked: a device torch knows and this machine has), else cuda when available, else cpu.
    An unknown or absent device is an MMCacheError naming it and the devices there are."""
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    from mmcache.errors import MMCacheError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MMCacheError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    have = ["cpu"]
    if torch.cuda.is_available():
        have += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        have.append("mps")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise MMCacheError(f"--device {device!r}: no such GPU on this machine; devices here: {', '.join(have)}")
    if dev.type == "mps" and "mps" not in have:
        raise MMCacheError(f"--device {device!r}: Apple MPS is not available here; devices here: {', '.join(have)}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise MMCacheError(f"--device {device!r} is not supported; devices here: {', '.join(have)}")
    return device


def check_output_file(path: Path | str | None, flag: str = "--out") -> None:
    """Refuse, before any work, an output file path that is an existing folder."""
    if path is not None and Path(path).is_dir():
        from mmcache.errors import MMCacheError

        raise MMCacheError(f"{flag} {path} is a folder; give a file name, e.g. {Path(path) / 'predictions.csv'}")


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write a file atomically: a uniquely named temp file beside it, fsynced, then renamed into place, so a kill
    (or a second writer) never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per writer; opened as usual, so the file gets the permissions the umask gives.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """`atomic_write_bytes` of `text` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_path(path: Path | str) -> None:
    """fsync a file or a folder (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path | str) -> str:
    """sha256 of a file's bytes, read in 1 MB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a kill never leaves half a file."""
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))

