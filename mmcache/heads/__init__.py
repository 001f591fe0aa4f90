"""Fusion heads (contract 4), their losses, and the fast trainer."""

from __future__ import annotations

# Head modules register themselves on import: importing the package makes every head buildable by name.
from mmcache.heads import gated, linear, scabg, xattn  # noqa: F401
from mmcache.heads.base import HEADS, Features, Head, InputSpec, build_head, register_head

__all__ = ["HEADS", "Features", "Head", "InputSpec", "build_head", "register_head"]
