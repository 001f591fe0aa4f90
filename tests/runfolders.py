"""Run folders written by hand for tests: the files a finished run folder holds, with a tiny head."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A safetensors file of `tensors` (name -> (dtype, shape, raw bytes))."""
    header: dict[str, Any] = {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def write_complete_run(d: Path, config: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """`d` holding config.json and metrics.json as given, plus a head.json, model.safetensors, versions.json and
    an empty curves.json, so `heads runs` lists it."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "head.json").write_text(json.dumps({"name": "linear", "inputs": {"image": {"pooled": [4]}},
                                             "tasks": {"label": 2}, "hparams": {}}))
    (d / "model.safetensors").write_bytes(safetensors_bytes({"w": ("F32", [2], b"\x00" * 8)}))
    (d / "versions.json").write_text("{}")
    (d / "curves.json").write_text("[]")
    return d
