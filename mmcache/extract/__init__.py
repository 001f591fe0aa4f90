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

# Decoders and families register themselves on import.
from mmcache.extract import decode, clip, roberta, teachers  # noqa: E402,F401  isort: skip
from mmcache.extract import frcnn, media, mel, r3d, resnet  # noqa: E402,F401  isort: skip

__all__ = ["DECODERS", "FAMILIES", "PRESETS", "DecodeError", "Extractor", "build_extractor",
           "register_decoder", "register_family", "register_preset", "resolve_preset"]
