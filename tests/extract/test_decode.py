"""The image decoder: modes kept, high bit depths scaled, EXIF orientation applied, size and aspect caps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmcache.extract import DECODERS, DecodeError
from mmcache.extract import decode as decode_mod
from mmcache.extract.decode import MAX_ASPECT, decode_image

from .imagefiles import ORIENTATION, picture, sixteen_bit, write_mode_images

SIZE = (40, 30)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_mode_images(tmp_path_factory.mktemp("modes"), size=SIZE)


def test_registered_as_the_image_decoder() -> None:
    assert DECODERS["image"] is decode_image


@pytest.mark.parametrize("name, mode", [("rgb.png", "RGB"), ("rgba.png", "RGBA"), ("p.png", "P"),
                                        ("p_transparent.png", "P"), ("p_transparent.gif", "P"), ("l.png", "L"),
                                        ("la.png", "LA"), ("bilevel.png", "1"), ("cmyk.jpg", "CMYK")])
def test_eight_bit_modes_are_handed_over_as_opened(files: dict[str, Path], name: str, mode: str) -> None:
    # Each extractor applies its own library's conversion; the decoder must not convert first.
    got = decode_image(str(files[name]), {})
    want = Image.open(files[name])
    assert got.mode == want.mode == mode and got.size == want.size
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.info.get("transparency") == want.info.get("transparency")
    if mode == "P":
        assert got.getpalette() == want.getpalette()


def _save(im: Image.Image, path: Path) -> str:
    im.save(path)
    return str(path)


def test_sixteen_bit_png_is_scaled_not_clipped(files: dict[str, Path]) -> None:
    got = decode_image(str(files["gray16.png"]), {})
    a = sixteen_bit(SIZE)
    assert got.mode == "L"
    np.testing.assert_array_equal(np.asarray(got), (a >> 8).astype(np.uint8))
    assert (np.asarray(got) == 255).mean() < 0.01  # Pillow's convert("RGB") makes ~99.6% of it white


def test_other_high_bit_depth_modes(tmp_path: Path) -> None:
    a16 = sixteen_bit(SIZE)
    want = (a16 >> 8).astype(np.uint8)
    big_endian = Image.frombytes("I;16B", SIZE, a16.astype(">u2").tobytes())
    int32 = Image.fromarray(a16.astype(np.int32))
    assert (big_endian.mode, int32.mode) == ("I;16B", "I")
    for name, im in (("be.tif", big_endian), ("i32.tif", int32)):
        got = decode_image(_save(im, tmp_path / name), {})
        assert got.mode == "L", name
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
    # 32-bit integers past the 16-bit range, and negatives, are clipped.
    wide = Image.fromarray(np.array([[-5, 0, 65535, 10**6]], dtype=np.int32))
    np.testing.assert_array_equal(np.asarray(decode_image(wide, {})), [[0, 0, 255, 255]])
    # Floats: 0..1 when they all lie there, else 0..255 (clipped).
    unit = np.linspace(0, 1, SIZE[0] * SIZE[1]).reshape(SIZE[1], SIZE[0]).astype(np.float32)
    got = decode_image(_save(Image.fromarray(unit), tmp_path / "unit.tif"), {})
    assert got.mode == "L"
    np.testing.assert_allclose(np.asarray(got).astype(float), unit * 255, atol=0.5 + 1e-6)
    wide_f = Image.fromarray(np.array([[-3.0, 0.4, 2.0, 254.6, 300.0, np.nan]], dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(decode_image(wide_f, {})), [[0, 0, 2, 255, 255, 0]])


def test_premultiplied_modes_become_straight_alpha() -> None:
    rgba = Image.fromarray(np.dstack([picture(1, SIZE), np.full((SIZE[1], SIZE[0]), 255, np.uint8)]))
    assert decode_image(rgba.convert("RGBa"), {}).mode == "RGBA"
    assert decode_image(rgba.convert("LA").convert("La"), {}).mode == "LA"


@pytest.mark.parametrize("orientation, op", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270),
                                             (8, Image.Transpose.ROTATE_90), (2, Image.Transpose.FLIP_LEFT_RIGHT)])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, op: Image.Transpose) -> None:
    stored = Image.fromarray(picture(2, SIZE))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = tmp_path / "phone.png"  # lossless, so the pixels can be compared exactly
    stored.save(path, exif=exif.tobytes())
    got = decode_image(str(path), {})
    upright = stored.transpose(op)
    assert got.size == upright.size
    np.testing.assert_array_equal(np.asarray(got), np.asarray(upright))
    assert got.getexif().get(ORIENTATION, 1) == 1  # never applied twice downstream


def test_exif_on_a_jpeg(files: dict[str, Path]) -> None:
    got = decode_image(str(files["exif_rotated.jpg"]), {})
    stored = Image.open(files["exif_rotated.jpg"])
    assert stored.size == SIZE and got.size == (SIZE[1], SIZE[0])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))


def test_elongated_images_fail_with_their_size(tmp_path: Path) -> None:
    # 108 bytes on disk; resized to a short side of 232 it would be 1.9 million pixels long.
    line = tmp_path / "line.png"
    Image.new("RGB", (8000, 1), (200, 10, 10)).save(line)
    with pytest.raises(DecodeError, match=rf"{line}.*8000x1 pixels.*{MAX_ASPECT}:1"):
        decode_image(str(line), {})
    with pytest.raises(DecodeError, match=r"1x60 pixels"):
        decode_image(Image.new("L", (1, 60)), {})
    assert decode_image(Image.new("L", (MAX_ASPECT, 1)), {}).size == (MAX_ASPECT, 1)  # the limit itself is fine
    assert decode_image(Image.new("L", (2, 2 * MAX_ASPECT)), {}).size == (2, 2 * MAX_ASPECT)


def test_pixel_cap_is_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(picture(3, SIZE)).save(path)
    monkeypatch.setattr(decode_mod, "MAX_PIXELS", SIZE[0] * SIZE[1] - 1)
    loads: list[str] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.mode))
    with pytest.raises(DecodeError, match=r"40x30 pixels, over the limit of 1,199"):
        decode_image(str(path), {})
    assert not loads  # refused from the header, nothing decoded


def test_in_memory_images_are_prepared_on_a_copy() -> None:
    rgba = Image.fromarray(np.dstack([picture(4, SIZE), np.zeros((SIZE[1], SIZE[0]), np.uint8)]))
    before = np.asarray(rgba).copy()
    got = decode_image(rgba, {})
    assert got is not rgba and got.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(rgba), before)
    sixteen = Image.fromarray(sixteen_bit(SIZE))
    assert decode_image(sixteen, {}).mode == "L" and sixteen.mode == "I;16"


def test_broken_inputs_are_decode_errors(tmp_path: Path, files: dict[str, Path]) -> None:
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(files["rgb.png"].read_bytes()[:200])
    with pytest.raises(DecodeError, match=r"cut\.png is corrupt or not an image"):
        decode_image(str(truncated), {})
    with pytest.raises(DecodeError, match="not found"):
        decode_image(str(tmp_path / "missing.png"), {})
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DecodeError, match="empty"):
        decode_image(str(tmp_path / "empty.png"), {})
    with pytest.raises(DecodeError, match="no image"):
        decode_image(None, {})
