"""Shared decoders of raw fields: images (PIL) and texts; each runs once per sample in a worker.

Video and audio decoders live in `mmcache.extract.media`. A decoder raises `DecodeError`
with a reason for a missing, empty or corrupt input; the runner records the sample as
failed for every extractor that needed that field.

An image is handed to the extractors in the mode the file has (RGB, RGBA, P, L, LA, CMYK,
...), after its EXIF orientation is applied and a high-bit-depth single-channel image is
scaled to 8 bits; each extractor then applies its own library's preprocessing to it (open_clip's
transform resizes first and converts to RGB after; torchvision's pipelines convert to RGB first).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

from mmcache.extract.base import DecodeError, register_decoder

# Bounds on what one image may cost. The pixel cap is checked on the header, before decoding;
# the aspect cap bounds the short-side resizes of the extractors (an 8000x1 image resized to a
# short side of 232 would be 1.9 million pixels long).
MAX_PIXELS = 200_000_000
MAX_ASPECT = 50
# PIL's own bomb guard stays as a backstop above ours (it raises only past twice this).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# 8-bit modes every extractor's preprocessing handles as they are (resize, then or after convert("RGB")).
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
# Premultiplied modes: their straight-alpha twin.
_STRAIGHT_ALPHA = {"La": "LA", "RGBa": "RGBA"}


def to_8bit(im: Image.Image) -> Image.Image:
    """An image whose mode the extractors handle: 8-bit modes as they are, deeper single-channel ones scaled.

    16-bit integers (I;16, I;16B, ...) and 32-bit integers (I, as 16-bit PNGs open in some
    Pillow versions) are read as 0..65535 and keep their top 8 bits (as Pillow and libpng do
    for 16-bit colour); floats (F) are read as 0..1 when they all lie there, else as 0..255;
    values outside the range are clipped. Pillow's own convert would clip instead of scale.
    """
    mode = im.mode
    if mode in EIGHT_BIT_MODES:
        return im
    if mode.startswith("I"):
        a = np.asarray(im).astype(np.int64)
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), mode="L")
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), mode="L")
    return im.convert(_STRAIGHT_ALPHA.get(mode, "RGBA" if "A" in mode else "RGB"))


def check_size(width: int, height: int, where: str) -> None:
    """DecodeError for an image too large (pixels) or too elongated (aspect ratio) to preprocess safely."""
    if width < 1 or height < 1:
        raise DecodeError(f"{where} has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise DecodeError(f"{where} is {width}x{height} pixels, over the limit of {MAX_PIXELS:,}; "
                          "downscale it to extract it")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise DecodeError(f"{where} is {width}x{height} pixels, more elongated than {MAX_ASPECT}:1; "
                          "crop or pad it to extract it")


def prepare_image(im: Image.Image, where: str) -> Image.Image:
    """Size check, EXIF orientation, 8-bit scaling: the image every extractor's preprocessing receives."""
    check_size(*im.size, where)
    im.load()
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # noqa: BLE001  (an unreadable EXIF block: the pixels are kept as stored)
        pass
    try:
        return to_8bit(im)
    except (ValueError, TypeError, KeyError) as e:
        raise DecodeError(f"{where} has an image mode ({im.mode}) that cannot be read as 8-bit: {e}") from None


@register_decoder("image")
def decode_image(value: Any, options: dict[str, int]) -> Image.Image:
    """Open an image file (a path, or the file's bytes) fully, so truncation shows here, not later; see the
    module docstring for its mode."""
    if value is None or value == "":
        raise DecodeError("no image for this sample")
    if isinstance(value, Image.Image):
        return prepare_image(value.copy(), "the image")
    if isinstance(value, (bytes, bytearray, memoryview)):  # an image file's bytes (a streamed tar member)
        if not len(value):
            raise DecodeError("the image is empty (0 bytes)")
        return _open_image(io.BytesIO(value), "the image")
    path = os.fspath(value)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise DecodeError(f"image file {path} not found") from None
    if size == 0:
        raise DecodeError(f"image file {path} is empty (0 bytes)")
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed below)
    except OSError as e:
        raise DecodeError(f"image file {path} cannot be read ({e.strerror or e})") from None
    with f:
        return _open_image(f, f"image file {path}")


def _open_image(f: BinaryIO, where: str) -> Image.Image:
    """Decode the image file read from `f` fully; any failure is a DecodeError naming `where`."""
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) on some broken EXIF / palette data; the pixels still decode.
            warnings.simplefilter("ignore")
            return prepare_image(Image.open(f), where)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"{where} is over the limit of {MAX_PIXELS:,} pixels ({e}); downscale it") from None
    except Exception as e:  # noqa: BLE001  (Pillow's plugins raise many types for a corrupt file)
        reason = str(e).replace(f" {f!r}", "")  # Pillow names the file object; `where` names the image
        raise DecodeError(f"{where} is corrupt or not an image ({type(e).__name__}: {reason})") from None


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
