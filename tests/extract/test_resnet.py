"""`resnet` family: shapes, values against torchvision's own pipeline, weights by path, presets."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms._presets import ImageClassification

from mmcache.errors import MMCacheError
from mmcache.extract import PRESETS, build_extractor, resolve_preset
from mmcache.extract.resnet import ResNetExtractor, weights_enum


def image(seed: int, size: tuple[int, int] = (100, 80)) -> Image.Image:
    """A random RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny() -> ResNetExtractor:
    ext = build_extractor("resnet-tiny", "image")
    assert isinstance(ext, ResNetExtractor)
    return ext


def encode(ext: ResNetExtractor, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return ext(ext.collate([ext.preprocess({"image": im}) for im in images]))


def test_shapes_and_dtypes(tiny: ResNetExtractor) -> None:
    x = tiny.preprocess({"image": image(0)})
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 64, 64)
    out = encode(tiny, [image(0), image(1, (50, 90))])
    assert set(out) == {"pooled", "tokens", "mask"}
    assert out["pooled"].dtype == torch.float32 and tuple(out["pooled"].shape) == (2, 512)
    assert tuple(out["tokens"].shape) == (2, 4, 512) and out["mask"].dtype == torch.bool and out["mask"].all()
    # At 64 px layer4 is a 2x2 map, so the 2x2 grid is the map itself and pooled is its mean.
    torch.testing.assert_close(out["tokens"].mean(1), out["pooled"])
    assert not torch.allclose(out["pooled"][0], out["pooled"][1])
    assert tiny.dim == 512 and tiny.inputs == ("image",) and tiny.decode_options == {}


def test_matches_torchvision_pipeline(tiny: ResNetExtractor) -> None:
    # torchvision's eval transform + the classifier up to avgpool is the reference.
    im = image(2)
    ref_tf = ImageClassification(crop_size=64, resize_size=72)
    trunk = torchvision.models.resnet18()
    trunk.load_state_dict(tiny.model.state_dict())
    trunk.fc = torch.nn.Identity()
    trunk.eval()
    with torch.inference_mode():
        ref = trunk(ref_tf(im)[None])
    torch.testing.assert_close(encode(tiny, [im])["pooled"], ref, atol=1e-4, rtol=1e-4)


def test_grid_options() -> None:
    im = image(3)
    six = build_extractor("resnet-tiny", "image", crop=96, resize=96, grid=6)  # 3x3 map -> 6x6 regions
    out = encode(six, [im])
    assert tuple(out["tokens"].shape) == (1, 36, 512) and tuple(out["mask"].shape) == (1, 36)
    one = encode(build_extractor("resnet-tiny", "image", grid=1), [im])
    torch.testing.assert_close(one["tokens"][:, 0], one["pooled"])
    none = encode(build_extractor("resnet-tiny", "image", grid=0), [im])
    assert set(none) == {"pooled"}


def test_seeded_random_init_is_reproducible(tiny: ResNetExtractor) -> None:
    im = image(4)
    again = build_extractor("resnet-tiny", "image")
    other = build_extractor("resnet-tiny", "image", seed=1)
    torch.testing.assert_close(encode(again, [im])["pooled"], encode(tiny, [im])["pooled"])
    assert not torch.allclose(encode(other, [im])["pooled"], encode(tiny, [im])["pooled"])
    assert again.spec_hash() == tiny.spec_hash() != other.spec_hash()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_local_file(tiny: ResNetExtractor, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"resnet18{suffix}"
    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    if suffix == ".pth":
        torch.save({"state_dict": sd}, path)  # a nested training checkpoint is accepted too
    else:
        save_file(sd, str(path))
    loaded = build_extractor("resnet-tiny", "image", weights=str(path), seed=7)
    ims = [image(5), image(6)]
    torch.testing.assert_close(encode(loaded, ims)["pooled"], encode(tiny, ims)["pooled"])
    assert len(loaded.spec["weights_sha256"]) == 64
    assert loaded.spec_hash() != tiny.spec_hash()


def test_bad_weights_are_user_errors(tiny: ResNetExtractor, tmp_path: Path) -> None:
    with pytest.raises(MMCacheError, match="neither a ResNet18_Weights member"):
        build_extractor("resnet-tiny", "image", weights=str(tmp_path / "nope.pth"))
    wrong = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), wrong)
    with pytest.raises(MMCacheError, match="do not fit resnet18"):
        build_extractor("resnet-tiny", "image", weights=str(wrong))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MMCacheError, match="cannot read weights"):
        build_extractor("resnet-tiny", "image", weights=str(junk))
    with pytest.raises(MMCacheError, match="cannot encode 'text'"):
        build_extractor("resnet-tiny", "text")


def test_offline_enum_weights_say_where_to_put_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    with pytest.raises(MMCacheError, match=r"resnet18-f37072fd\.pth.*weights=PATH"):
        build_extractor("resnet-tiny", "image", weights="IMAGENET1K_V1")


def test_presets_use_their_weights_eval_transforms() -> None:
    enums = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
             "resnet101": "ResNet101_Weights", "resnet152": "ResNet152_Weights"}
    checked = 0
    for name in ("resnet", "resnet50", "resnet50-v1", "resnet101", "resnet152"):
        cfg = PRESETS[name]
        tf = weights_enum(enums[cfg["arch"]])[cfg["weights"]].transforms()
        assert (cfg["resize"], cfg["crop"]) == (tf.resize_size[0], tf.crop_size[0]), name
        checked += 1
    assert checked == 5
    assert PRESETS["resnet50-v1"]["resize"] == 256  # the reference recipe: Resize 256 / CenterCrop 224


def test_free_form_names() -> None:
    name, cfg = resolve_preset("resnet34:IMAGENET1K_V1")
    assert (name, cfg["family"], cfg["arch"], cfg["weights"], cfg["resize"], cfg["crop"]) == (
        "resnet34:IMAGENET1K_V1", "resnet", "resnet34", "IMAGENET1K_V1", 256, 224)
    assert resolve_preset("resnet101")[1]["weights"] == "IMAGENET1K_V2"
    with pytest.raises(MMCacheError, match="unknown extractor preset"):
        resolve_preset("resnet50:NO_SUCH_WEIGHTS")
