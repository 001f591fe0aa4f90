"""Image files of every mode an extractor may meet, the reference reading of a file, a table dataset of images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ORIENTATION = 0x0112  # the EXIF Orientation tag


def picture(seed: int, size: tuple[int, int] = (90, 70)) -> np.ndarray:
    """uint8 RGB [h, w, 3]: gradients plus noise, so resizing and cropping change values everywhere."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(w + h - 2, 1)], -1)
    return np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)


def alpha(seed: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 alpha [h, w]: fully transparent, half and opaque blocks (transparent pixels keep random colours)."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.choice(np.array([0, 128, 255], dtype=np.uint8), ((h + 7) // 8, (w + 7) // 8))
    return np.kron(blocks, np.ones((8, 8), dtype=np.uint8))[:h, :w]


def sixteen_bit(size: tuple[int, int]) -> np.ndarray:
    """uint16 [h, w] spanning the whole 16-bit range (an 8-bit clip turns nearly all of it white)."""
    w, h = size
    return np.linspace(0, 65535, w * h).reshape(h, w).astype(np.uint16)


def write_mode_images(root: Path, size: tuple[int, int] = (90, 70), seed: int = 0) -> dict[str, Path]:
    """One file per mode / format: RGB, RGBA, P (PNG, PNG with transparency, GIF), L, LA, 1, CMYK, 16-bit, EXIF."""
    root.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(picture(seed, size))
    a = Image.fromarray(alpha(seed, size))
    out: dict[str, Path] = {}

    def save(name: str, im: Image.Image, **kw: object) -> None:
        out[name] = root / name
        im.save(out[name], **kw)

    save("rgb.png", rgb)
    save("rgba.png", Image.merge("RGBA", (*rgb.split(), a)))
    pal = rgb.quantize(64)
    save("p.png", pal)
    save("p_transparent.png", pal, transparency=0)
    save("p_transparent.gif", pal, transparency=3)
    save("l.png", rgb.convert("L"))
    save("la.png", Image.merge("LA", (rgb.convert("L"), a)))
    save("bilevel.png", rgb.convert("1"))
    save("cmyk.jpg", rgb.convert("CMYK"), quality=95)
    save("gray16.png", Image.fromarray(sixteen_bit(size)))
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored sideways: a viewer rotates it 90 degrees clockwise
    save("exif_rotated.jpg", rgb, quality=95, exif=exif.tobytes())
    return out


def reference_image(path: Path) -> Image.Image:
    """The image a library's own preprocessing is given: as PIL opens it, EXIF orientation applied.

    A 16-bit single-channel image, which the libraries would clip, is first scaled to 8 bits
    (its top byte), as mmcache documents.
    """
    im = ImageOps.exif_transpose(Image.open(path))
    if im.mode.startswith("I;16"):
        im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8))
    return im


def write_table(root: Path, images: list[Path | str]) -> Path:
    """A `table` dataset folder (data.csv: id, image, text, label, split) over `images`."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "text", "label", "split"])
        for i, p in enumerate(images):
            w.writerow([f"r{i:03d}", str(p), f"row {i}", ("neg", "pos")[i % 2], ("train", "test")[i % 2]])
    return root
