"""The open_clip family: shapes, equality with open_clip, determinism, local weights by path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcache.errors import MMCacheError
from mmcache.extract import build_extractor, resolve_preset
from mmcache.extract.clip import TINY_CLIP_CFG, ClipExtractor

D = TINY_CLIP_CFG["embed_dim"]
W_IMG = TINY_CLIP_CFG["vision_cfg"]["width"]
W_TXT = TINY_CLIP_CFG["text_cfg"]["width"]
CTX = TINY_CLIP_CFG["text_cfg"]["context_length"]
GRID = (TINY_CLIP_CFG["vision_cfg"]["image_size"] // TINY_CLIP_CFG["vision_cfg"]["patch_size"]) ** 2


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def _encode(ext: ClipExtractor, values: list) -> dict[str, torch.Tensor]:
    batch = ext.collate([ext.preprocess({ext.modality: v}) for v in values])
    with torch.inference_mode():
        return ext(batch)


def test_tiny_shapes_and_dtypes() -> None:
    img = _encode(build_extractor("clip-tiny", "image"), _images())
    assert img["pooled"].shape == (3, D) and img["pooled"].dtype == torch.float32
    assert img["tokens"].shape == (3, GRID, W_IMG) and img["mask"].dtype == torch.bool and bool(img["mask"].all())
    txt = _encode(build_extractor("clip-tiny", "text"), ["a red circle", "", "i adore this sticker at the station"])
    assert txt["pooled"].shape == (3, D) and txt["tokens"].shape == (3, CTX, W_TXT)
    assert txt["mask"].sum(1).tolist() == [5, 2, 9]  # start + words + end; the empty text keeps start/end
    ctx = build_extractor("clip-tiny", "context")
    assert ctx.inputs == ("context",)
    no_tok = _encode(build_extractor("clip-tiny", "image", tokens=False), _images(1))
    assert set(no_tok) == {"pooled"}
    torch.testing.assert_close(no_tok["pooled"], img["pooled"][:1])


def test_deterministic_across_processes() -> None:
    code = ("import torch; from mmcache.extract import build_extractor; "
            "e = build_extractor('clip-tiny', 'text'); "
            "print(repr(float(sum(p.double().sum() for p in e.parameters()))))")
    here = float(sum(p.double().sum() for p in build_extractor("clip-tiny", "text").parameters()))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert float(out.stdout.strip()) == here


def test_local_weights_file_through_open_clip_factory(tmp_path: Path) -> None:
    """The real-weights path: an open_clip architecture + a checkpoint file loaded by path."""
    import open_clip

    # Register the tiny architecture as an open_clip model config, as real ones are.
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "MMCacheTiny.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(str(tmp_path / "cfg"))
    trained = build_extractor("clip-tiny", "image", seed=7)  # stands in for trained weights
    weights = tmp_path / "open_clip_model.bin"
    torch.save(_full_state(seed=7), weights)
    name, cfg = resolve_preset(f"MMCacheTiny:{weights}")
    assert cfg == {"family": "clip", "arch": "MMCacheTiny", "weights": str(weights)}
    loaded = build_extractor(f"MMCacheTiny:{weights}", "image")
    imgs = _images(2)
    want = _encode(trained, imgs)
    got = _encode(loaded, imgs)
    torch.testing.assert_close(got["pooled"], want["pooled"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["tokens"], want["tokens"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got["pooled"], _encode(build_extractor("clip-tiny", "image"), imgs)["pooled"])
    # The same file through the preset's `weights` key.
    by_key = build_extractor("clip-tiny", "text", weights=str(weights))
    torch.testing.assert_close(_encode(by_key, ["hello"])["pooled"],
                               _encode(build_extractor("clip-tiny", "text", seed=7), ["hello"])["pooled"])


def _full_state(seed: int) -> dict[str, torch.Tensor]:
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.model.CLIP(**TINY_CLIP_CFG).state_dict()


def test_parse_preset_and_errors(tmp_path: Path) -> None:
    assert ClipExtractor.parse_preset("ViT-B-32:laion2b_s34b_b79k") == {"arch": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    assert ClipExtractor.parse_preset("ViT-L-14:/w/clip.bin") == {"arch": "ViT-L-14", "weights": "/w/clip.bin"}
    assert ClipExtractor.parse_preset("NotAnArch:foo") is None
    assert ClipExtractor.parse_preset("roberta-base") is None
    assert resolve_preset("clip")[1] == {"family": "clip", "arch": "ViT-B-32", "pretrained": "openai"}
    with pytest.raises(MMCacheError, match="not found"):
        build_extractor(f"ViT-B-32:{tmp_path / 'missing.bin'}", "image")
    with pytest.raises(MMCacheError, match="cannot encode 'video'"):
        build_extractor("clip-tiny", "video")
    with pytest.raises(MMCacheError, match="unknown extractor preset"):
        build_extractor("clip-huge-nonexistent", "image")
