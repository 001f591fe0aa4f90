"""Fusion heads (contract 4), their losses, and the fast trainer.

Importing the package (or `mmcache.heads.cli`) loads no torch: the names below are
resolved on first use, which registers every built-in head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmcache.heads.base import HEADS, Features, Head, InputSpec, build_head, register_head

__all__ = ["HEADS", "Features", "Head", "InputSpec", "build_head", "register_head"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import mmcache.heads.builtin  # noqa: F401  (fills the registry)
    from mmcache.heads import base

    return getattr(base, name)
