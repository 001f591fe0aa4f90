"""Seeded fuzz of the image path: every row of a run ends extracted or recorded as failed with a reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcache.cache.store import StoreReader, store_path
from mmcache.data import load_dataset
from mmcache.extract.decode import MAX_ASPECT
from mmcache.extract.runner import Request, extract

from .imagefiles import picture, sixteen_bit, write_mode_images, write_table

SIZE = (48, 36)


def odd_modes(root: Path) -> list[Path]:
    """Modes and formats beyond the usual ones (TIFF holds most of them)."""
    rgb = Image.fromarray(picture(7, SIZE))
    a16 = sixteen_bit(SIZE)
    images = {
        "lab.tif": rgb.convert("LAB"), "ycbcr.tif": rgb.convert("YCbCr"), "pa.tif": rgb.quantize(16).convert("PA"),
        "i16b.tif": Image.frombytes("I;16B", SIZE, a16.astype(">u2").tobytes()),
        "i32.tif": Image.fromarray(a16.astype(np.int32)), "float.tif": Image.fromarray(a16.astype(np.float32) / 65535),
        "rgb.webp": rgb, "rgb.bmp": rgb, "cmyk.tif": rgb.convert("CMYK"),
    }
    for name, im in images.items():
        im.save(root / name)
    return [root / n for n in images]


def elongated(root: Path) -> tuple[list[Path], list[Path]]:
    """(over the aspect cap, at it): tiny files that would blow up a short-side resize."""
    over, within = [], []
    for i, (w, h) in enumerate([(8000, 1), (1, 3000), (MAX_ASPECT * 2 + 1, 2), (4000, 3)]):
        over.append(root / f"long{i}.png")
        Image.new("RGB", (w, h), (200, 30, 30)).save(over[-1])
    for i, (w, h) in enumerate([(MAX_ASPECT, 1), (2, 2 * MAX_ASPECT)]):
        within.append(root / f"ok_long{i}.png")
        Image.new("L", (w, h), 90).save(within[-1])
    return over, within


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Truncate, flip random bytes, or flip bytes in the header (where the sizes live)."""
    kind = rng.integers(3)
    if kind == 0:
        return data[: int(len(data) * rng.uniform(0.05, 0.95))]
    b = bytearray(data)
    top = len(b) if kind == 1 else min(len(b), 64)
    for i in rng.integers(0, top, size=int(rng.integers(1, 9))):
        b[i] ^= int(rng.integers(1, 256))
    return bytes(b)


def test_fuzzed_images_end_extracted_or_failed_with_a_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(2024)
    media = tmp_path / "media"
    valid = list(write_mode_images(media, size=SIZE).values())
    media.mkdir(exist_ok=True)
    valid += odd_modes(media)
    over, within = elongated(media)
    fuzzed = []
    for k in range(48):
        src = valid[k % len(valid)]
        fuzzed.append(media / f"fuzz{k:02d}{src.suffix}")
        fuzzed[-1].write_bytes(mutate(src.read_bytes(), rng))
    junk = media / "junk.png"
    junk.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    rows = [*valid, *within, *over, *fuzzed, junk]
    ds = load_dataset("table", write_table(tmp_path / "table", rows))
    by_path = {s.image: s.id for s in ds.samples}

    reqs = [Request("image", "clip", "clip-tiny"), Request("image", "res", "resnet-tiny")]
    sums = extract(ds, reqs, cache_dir=tmp_path / "cache", batch_size=8, progress=False, dtype="float32")

    ids = set(ds.ids())
    failed_sets = []
    for sm in sums:
        reader = StoreReader(store_path(tmp_path / "cache", ds.name, "image", sm.name))
        done, failed = set(reader.ids), dict(reader.failed)
        assert done | set(failed) == ids and not done & set(failed), sm.name
        assert sm.written == len(done) and set(sm.failed) == set(failed)
        pooled = reader.load(sorted(done))["pooled"]
        assert np.isfinite(pooled).all() and (np.abs(pooled).sum(1) > 0).all(), sm.name  # never zero-filled
        by_id = {s.id: s for s in ds.samples}
        for sid, reason in failed.items():
            assert reason and Path(by_id[sid].image).name in reason, (sid, reason)  # names the file
        failed_sets.append(set(failed))
        # Valid files of every mode, and shapes at the aspect limit, are extracted; longer ones fail as such.
        assert {by_path[str(p)] for p in [*valid, *within]} <= done, sm.name
        for p in over:
            assert "more elongated than" in failed[by_path[str(p)]]
        assert "corrupt or not an image" in failed[by_path[str(junk)]]
    # One decode serves both encoders: a sample fails for both or for neither.
    assert failed_sets[0] == failed_sets[1]
    fuzz_ids = {by_path[str(p)] for p in fuzzed}
    assert 0 < len(fuzz_ids & failed_sets[0]) < len(fuzz_ids)  # the fuzz hits both outcomes


@pytest.mark.parametrize("preset", ["clip-tiny", "resnet-tiny", "frcnn-tiny"])
def test_an_8000x1_png_is_failed_not_resized(tmp_path: Path, preset: str) -> None:
    line = tmp_path / "line.png"
    Image.new("RGB", (8000, 1), (10, 200, 10)).save(line)
    ok = tmp_path / "ok.png"
    Image.fromarray(picture(1, SIZE)).save(ok)
    ds = load_dataset("table", write_table(tmp_path / "table", [line, ok]))
    (sm,) = extract(ds, [Request("image", "x", preset)], cache_dir=tmp_path / "cache", progress=False)
    assert sm.written == 1 and list(sm.failed) == ["r000"]
    assert "8000x1 pixels, more elongated than" in sm.failed["r000"] and "line.png" in sm.failed["r000"]
