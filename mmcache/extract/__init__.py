"""Extractors (contract 2) and the batched, resumable runner."""

from __future__ import annotations

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
