"""Extractors (contract 2) and the batched, resumable runner.

Importing the package (or `mmcache.extract.cli`) loads no torch: the names below are
resolved on first use, which registers every built-in decoder, family and preset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmcache.extract.base import (
        DECODERS,
        FAMILIES,
        PRESETS,
        DecodeError,
        Extractor,
        build_extractor,
        register_decoder,
        register_family,
        register_preset,
        resolve_preset,
    )

__all__ = ["DECODERS", "FAMILIES", "PRESETS", "DecodeError", "Extractor", "build_extractor",
           "register_decoder", "register_family", "register_preset", "resolve_preset"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import mmcache.extract.builtin  # noqa: F401  (fills the registries)
    from mmcache.extract import base

    return getattr(base, name)
