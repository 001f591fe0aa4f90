"""Shared decoders of raw fields: images (PIL) and texts; each runs once per sample in a worker.

Video and audio decoders live in `mmcache.extract.media`. A decoder raises `DecodeError`
with a reason for a missing, empty or corrupt input; the runner records the sample as
failed for every extractor that needed that field.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmcache.extract.base import DecodeError, register_decoder

# A pixel bomb (or a file lying about its size) is a failed item, not a crashed run.
Image.MAX_IMAGE_PIXELS = 200_000_000


@register_decoder("image")
def decode_image(value: Any, options: dict[str, int]) -> Image.Image:
    """Open an image file fully (so truncation shows here, not later) as RGB."""
    if value is None or value == "":
        raise DecodeError("no image for this sample")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    path = os.fspath(value)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise DecodeError(f"image file {path} not found") from None
    if size == 0:
        raise DecodeError(f"image file {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) on some broken EXIF / palette data; the pixels still decode.
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DecodeError(f"image file {path} is corrupt or not an image ({type(e).__name__}: {e})") from None


def _text(field: str, value: Any) -> str:
    if value is None:
        raise DecodeError(f"no {field} for this sample")
    return str(value)


@register_decoder("text")
def decode_text(value: Any, options: dict[str, int]) -> str:
    """The sample's text (an empty string is a valid text; a missing one is a failure)."""
    return _text("text", value)


@register_decoder("context")
def decode_context(value: Any, options: dict[str, int]) -> str:
    """The sample's context text (caption, OCR)."""
    return _text("context text", value)


@register_decoder("entity")
def decode_entity(value: Any, options: dict[str, int]) -> str | None:
    """The target entity of an entity-level sample, or None (extractors that need it decide)."""
    return None if value is None else str(value)
