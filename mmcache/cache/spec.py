"""The spec of a feature store and its hash: what keys a store, so rows of another spec are refused."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as it is stored: plain JSON (tuples become lists, other objects their text), keys sorted."""
    out: dict[str, Any] = json.loads(json.dumps(spec, sort_keys=True, default=str))
    return out


def spec_hash(spec: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a spec, first 16 hex digits (the same for a spec and its stored form)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
