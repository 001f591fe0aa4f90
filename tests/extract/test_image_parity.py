"""Every image extractor gives, for every image mode, what its library's own preprocessing gives.

The reference is the library's preprocessing applied to the image as PIL opens it (EXIF
orientation applied; 16-bit scaled to 8 bits first): open_clip's `preprocess` from
`create_model_and_transforms`, torchvision's `weights.transforms()` after its image loader's
convert("RGB") (resnet, frcnn). Inputs go through the shared decoder, as in a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mmcache.extract import DECODERS, build_extractor
from mmcache.extract.clip import TINY_CLIP_CFG
from mmcache.extract.resnet import weights_enum

from .imagefiles import reference_image, write_mode_images

FULL_SIZE_MODES = ("rgba.png", "p_transparent.png", "gray16.png", "exif_rotated.jpg")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Every mode twice: smaller than the models' inputs (enlarged) and larger (shrunk)."""
    root = tmp_path_factory.mktemp("modes")
    small = write_mode_images(root / "small", size=(90, 70), seed=0)
    large = write_mode_images(root / "large", size=(400, 300), seed=1)
    return [*small.values(), *large.values()]


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def ours(ext: Any, paths: list[Path]) -> Any:
    """Preprocessed batch as a run builds it: the shared decoder, then the extractor's preprocess and collate."""
    items = [ext.preprocess({"image": DECODERS["image"](str(p), ext.decode_options)}) for p in paths]
    return ext.collate(items)


def encode(ext: Any, batch: Any) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return ext(batch)


def _clip_reference(preprocess: Any, model: Any, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([preprocess(reference_image(p)) for p in paths])
    with torch.inference_mode():
        return x, model.encode_image(x)


def test_clip_tiny_matches_open_clip_on_every_mode(files: list[Path]) -> None:
    import open_clip

    ext = build_extractor("clip-tiny", "image")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.model.CLIP(**TINY_CLIP_CFG).eval()
    preprocess = open_clip.image_transform(TINY_CLIP_CFG["vision_cfg"]["image_size"], is_train=False)
    want_x, want = _clip_reference(preprocess, model, files)
    got_x = ours(ext, files)
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(encode(ext, got_x)["pooled"], want, rtol=1e-4, atol=1e-5)


def test_clip_from_a_weights_file_matches_create_model_and_transforms(files: list[Path], tmp_path: Path) -> None:
    """A small ViT with ViT-B-32's preprocessing (224 px, bicubic, OpenAI mean/std), loaded by path."""
    import open_clip

    cfg = json.loads(json.dumps(TINY_CLIP_CFG))
    cfg["vision_cfg"].update(image_size=224, patch_size=32)
    b32 = open_clip.get_model_config("ViT-B-32")
    assert b32["vision_cfg"]["image_size"] == 224
    preprocess_keys = {"mean", "std", "interpolation", "resize_mode", "image_mean", "image_std"}
    assert not preprocess_keys & (set(b32["vision_cfg"]) | set(cfg["vision_cfg"]))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "MMCacheTiny224.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "cfg"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        weights = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(open_clip.model.CLIP(**cfg).state_dict(), weights)

    ext = build_extractor(f"MMCacheTiny224:{weights}", "image")
    model, _, preprocess = open_clip.create_model_and_transforms("MMCacheTiny224", pretrained=str(weights))
    want_x, want = _clip_reference(preprocess, model.eval(), files)
    got_x = ours(ext, files)
    assert tuple(got_x.shape[1:]) == (3, 224, 224)
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(encode(ext, got_x)["pooled"], want, rtol=1e-4, atol=1e-5)


def test_clip_teacher_uses_the_open_clip_preprocess(files: list[Path]) -> None:
    import open_clip

    t = build_extractor("clip-teacher-tiny", "teacher", label_space={"label": ["negative", "positive"]},
                        use_text=False)
    preprocess = open_clip.image_transform(TINY_CLIP_CFG["vision_cfg"]["image_size"], is_train=False)
    want_x = torch.stack([preprocess(reference_image(p)) for p in files])
    got = ours(t, files)
    torch.testing.assert_close(got["image"], want_x, rtol=0, atol=1e-6)
    with torch.inference_mode():
        emb = F.normalize(t.model.encode_image(want_x).float(), dim=-1)
        want = t.model.logit_scale.exp() * emb @ t.prompts.t()
    torch.testing.assert_close(encode(t, got)["logits"], want, rtol=1e-4, atol=1e-4)


def test_resnet50_from_a_weights_file_matches_torchvision(files: list[Path], tmp_path: Path) -> None:
    """Full-size ResNet-50 (random init saved to a file) against torchvision's model + IMAGENET1K_V2 transforms."""
    import torchvision

    # A few modes (resnet-tiny below covers all of them): at 224 px the forward is what costs here.
    some = [p for p in files if p.parent.name == "small" and p.name in FULL_SIZE_MODES]
    assert len(some) == len(FULL_SIZE_MODES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        trunk = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(trunk.state_dict(), path)
    trunk.fc = torch.nn.Identity()
    trunk.eval()
    tf = weights_enum("ResNet50_Weights").IMAGENET1K_V2.transforms()
    ext = build_extractor("resnet50", "image", weights=str(path))
    with torch.inference_mode():
        want = trunk(torch.stack([tf(reference_image(p).convert("RGB")) for p in some]))
    got = encode(ext, ours(ext, some))["pooled"]
    assert got.shape == want.shape == (len(some), 2048)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_resnet_preprocessing_matches_torchvision_on_every_mode(files: list[Path]) -> None:
    from torchvision.transforms._presets import ImageClassification

    ext = build_extractor("resnet-tiny", "image")
    tf = ImageClassification(crop_size=ext.config["crop"], resize_size=ext.config["resize"])
    got = ours(ext, files)
    want = torch.stack([tf(reference_image(p).convert("RGB")) for p in files])
    mean, std = ext.mean.view(3, 1, 1), ext.std.view(3, 1, 1)
    torch.testing.assert_close((got.float() / 255 - mean) / std, want, rtol=1e-5, atol=1e-5)


def test_frcnn_matches_the_detectors_own_transform(files: list[Path]) -> None:
    """What the detector's backbone sees equals torchvision's weights.transforms() + the detector's transform."""
    ext = build_extractor("frcnn-tiny", "image")
    tf = weights_enum("FasterRCNN_MobileNet_V3_Large_320_FPN_Weights").COCO_V1.transforms()
    batch = ours(ext, files)
    assert {x.dtype for x in batch} == {torch.uint8, torch.float32}  # both paths: resized on the device / in the worker
    with torch.inference_mode():
        got = ext.image_list(batch)
        want, _ = ext.model.transform([tf(reference_image(p).convert("RGB")) for p in files])
    assert got.image_sizes == want.image_sizes
    assert all(max(s) == 128 or min(s) == 96 for s in got.image_sizes)
    torch.testing.assert_close(got.tensors, want.tensors, rtol=1e-5, atol=1e-5)
    out = encode(ext, batch)
    assert out["mask"].any(1).all() and torch.isfinite(out["pooled"]).all()
