"""Checkpoints of a fine-tuning run: everything it needs to continue where it stopped, never pickled.

A checkpoint is a folder `<run>/checkpoints/<tag>/` holding `state.json` (the structure: numbers,
strings, lists, dicts, with each tensor replaced by a reference) and `tensors.safetensors` (every
tensor: trained weights, optimizer moments, random-generator states, the best state so far).
It is written whole under a temporary name, each file fsynced, then renamed into place; only then
does `checkpoints/latest.json` (itself replaced atomically) point at it and the older folders go.
A kill at any moment leaves `latest.json` naming a complete checkpoint (or no `latest.json`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcache.errors import MMCacheError
from mmcache.utils import fsync_path

CKPT_DIR = "checkpoints"
LATEST = "latest.json"
STATE = "state.json"
TENSORS = "tensors.safetensors"


def to_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`obj` as JSON values, each tensor moved to `tensors` under its path and replaced by a reference.
    Tuples, numpy arrays and dicts with non-string keys (an optimizer's parameter indices) are tagged."""
    if isinstance(obj, torch.Tensor):
        key = path if path not in tensors else f"{path}#{len(tensors)}"  # keys holding dots could meet
        # A copy: saved tensors must not share memory, and a checkpoint never aliases live weights.
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [to_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_tree(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[k, to_tree(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path!r}")


def from_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `to_tree`."""
    if isinstance(obj, list):
        return [from_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(from_tree(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: from_tree(v, tensors) for k, v in obj["__items__"]}
        return {k: from_tree(v, tensors) for k, v in obj.items()}
    return obj


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, state: dict[str, Any], tag: str) -> Path:
    """Write `state` (nested JSON values and tensors) as checkpoint `tag` of `run_dir`, atomically; older ones go."""
    from safetensors.torch import save_file

    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = to_tree(state, tensors)
    name = f"{tag}-{uuid.uuid4().hex[:8]}"  # never the name of a folder already there
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    save_file(tensors, str(tmp / TENSORS))
    fsync_path(tmp / TENSORS)
    _write_json(tmp / STATE, tree)
    fsync_path(tmp)
    final = root / name
    os.rename(tmp, final)
    fsync_path(root)
    _write_json(root / LATEST, {"checkpoint": name, "tag": tag})
    fsync_path(root)
    for p in root.iterdir():  # earlier checkpoints, and temporary folders of a write that was killed
        if p.is_dir() and p.name != name:
            shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest.json` names in `run_dir/checkpoints`, or None when there is none."""
    pointer = run_dir / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MMCacheError(f"{pointer} is unreadable ({e}); delete {pointer.parent} to start the run over") from None
    path = pointer.parent / str(name)
    if not (path / STATE).is_file() or not (path / TENSORS).is_file():
        raise MMCacheError(f"{pointer} names {path}, which is incomplete; delete {pointer.parent} to start over")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in checkpoint folder `path` (tensors on the CPU)."""
    from safetensors.torch import load_file

    try:
        tree = json.loads((path / STATE).read_text())
        tensors = load_file(str(path / TENSORS), device="cpu")
    except (OSError, ValueError) as e:
        raise MMCacheError(f"checkpoint {path} is unreadable ({e}); delete it to start the run over") from None
    return dict(from_tree(tree, tensors))


def remove_checkpoints(run_dir: Path) -> None:
    """Delete `run_dir/checkpoints` (the run finished, or starts over)."""
    shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's random-generator states: python, numpy, torch CPU (and the CUDA device's)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state()`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
