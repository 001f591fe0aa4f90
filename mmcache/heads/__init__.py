"""Fusion heads (contract 4), their losses, and the fast trainer."""

from __future__ import annotations

from mmcache.heads.base import HEADS, Features, Head, InputSpec, build_head, register_head

__all__ = ["HEADS", "Features", "Head", "InputSpec", "build_head", "register_head"]
