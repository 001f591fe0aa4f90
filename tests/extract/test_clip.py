"""The open_clip family: shapes, equality with open_clip, determinism, local weights by path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcache.errors import MMCacheError
from mmcache.extract import build_extractor, resolve_preset
from mmcache.extract.clip import CKPT_NAME, TINY_CLIP_CFG, ClipExtractor

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


# --- Weights decide the activation; local weights are pinned by content; offline hints -------------------------

TINY_ARCH = "MMCacheTiny"


@pytest.fixture
def tiny_arch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny CLIP as an open_clip architecture with two pretrained tags, as ViT-B-32 has: 'openai'
    (trained with QuickGELU) and 'laion' (GELU); returns a checkpoint file of seed-7 weights."""
    import open_clip
    from open_clip.pretrained import _PRETRAINED, _pcfg

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(str(tmp_path / "cfg"))
    monkeypatch.setitem(_PRETRAINED, TINY_ARCH, {
        "openai": _pcfg(hf_hub="mmcache-test/tiny.openai/", quick_gelu=True),
        "laion": _pcfg(hf_hub="mmcache-test/tiny.laion/", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    })
    weights = tmp_path / "open_clip_model.bin"
    torch.save(_full_state(seed=7), weights)
    return weights


def _uses_quick_gelu(ext: ClipExtractor) -> bool:
    from open_clip.transformer import QuickGELU

    acts = [type(m) for m in ext.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))]
    assert acts, "the towers have activations"
    return all(a is QuickGELU for a in acts)


def test_quick_gelu_follows_the_weights_tag(tiny_arch: Path) -> None:
    import open_clip

    ext = build_extractor(f"{TINY_ARCH}:openai", "image", weights=str(tiny_arch))
    assert _uses_quick_gelu(ext)
    assert ext.spec["quick_gelu"] is True and ext.spec["pretrained"] == "openai"
    assert ext.spec["weights"] == str(tiny_arch) and len(ext.spec["weights_sha256"]) == 64
    ref, _, ref_tf = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(tiny_arch), force_quick_gelu=True)
    plain, _, _ = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(tiny_arch))
    imgs = _images(2)
    x = torch.stack([ref_tf(im) for im in imgs])
    got = _encode(ext, imgs)["pooled"]
    with torch.inference_mode():
        torch.testing.assert_close(got, ref.eval().encode_image(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, plain.eval().encode_image(x), rtol=1e-3, atol=1e-3)
    # A tag trained without QuickGELU runs plain GELU, with its own preprocessing (mean/std 0.5).
    laion = build_extractor(f"{TINY_ARCH}:laion", "image", weights=str(tiny_arch))
    assert not _uses_quick_gelu(laion) and laion.spec["quick_gelu"] is False
    assert tuple(laion.transform.transforms[-1].mean) == (0.5, 0.5, 0.5)
    assert laion.spec_hash() != ext.spec_hash()


def test_a_local_file_of_unknown_activation_is_refused_or_told(tiny_arch: Path) -> None:
    with pytest.raises(MMCacheError, match=rf"cannot tell whether .*QuickGELU .*{TINY_ARCH}:openai\[weights="):
        build_extractor(f"{TINY_ARCH}:{tiny_arch}", "image")
    assert _uses_quick_gelu(build_extractor(f"{TINY_ARCH}:{tiny_arch}", "image", quick_gelu=True))
    plain = build_extractor(f"{TINY_ARCH}:{tiny_arch}", "image", quick_gelu=False)
    assert not _uses_quick_gelu(plain) and plain.spec["quick_gelu"] is False
    with pytest.raises(MMCacheError, match="trained with QuickGELU; drop quick_gelu=false"):
        build_extractor(f"{TINY_ARCH}:openai", "image", weights=str(tiny_arch), quick_gelu=False)


def test_builtin_presets_resolve_the_activation_of_their_weights(tmp_path: Path) -> None:
    """The real architectures, resolved without building them: OpenAI weights need QuickGELU, LAION-2B not."""
    from mmcache.extract.clip import resolve_clip_config

    f = tmp_path / "openai.bin"
    f.write_bytes(b"stand-in for a checkpoint")
    _, clip = resolve_preset("clip")
    local = resolve_clip_config({**clip, "weights": str(f)})
    assert local["quick_gelu"] is True and local["weights_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert resolve_clip_config(clip)["quick_gelu"] is True
    assert resolve_clip_config(resolve_preset("ViT-B-32:laion2b_s34b_b79k")[1])["quick_gelu"] is False
    assert resolve_clip_config(resolve_preset(f"ViT-B-32-quickgelu:{f}")[1])["quick_gelu"] is True
    with pytest.raises(MMCacheError, match=r"ViT-B-32:openai\[weights="):
        resolve_clip_config(resolve_preset(f"ViT-B-32:{f}")[1])
    with pytest.raises(MMCacheError, match="no pretrained tag 'nope' for ViT-B-32"):
        resolve_clip_config({"arch": "ViT-B-32", "pretrained": "nope"})


def test_torchscript_archives_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ViT-B-32.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; OpenAI's files are not
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(MMCacheError, match="TorchScript archive .*open_clip_pytorch_model.bin"):
        build_extractor("clip", "image", weights=str(path))


def test_a_replaced_checkpoint_changes_the_spec(tiny_arch: Path, tmp_path: Path) -> None:
    before = build_extractor("clip-tiny", "text", weights=str(tiny_arch))
    torch.save(_full_state(seed=8), tiny_arch)  # same path, same size, other weights
    st = tiny_arch.stat()
    os.utime(tiny_arch, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = build_extractor("clip-tiny", "text", weights=str(tiny_arch))
    assert after.spec["weights"] == before.spec["weights"]
    assert after.spec_hash() != before.spec_hash()
    # An open_clip folder (local-dir:) is pinned by its files too.
    d = tmp_path / "local"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    shutil.copy(tiny_arch, d / "open_clip_pytorch_model.bin")
    a = build_extractor(f"local-dir:{d}", "text")
    torch.testing.assert_close(_encode(a, ["hi"])["pooled"], _encode(after, ["hi"])["pooled"])
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {"std": [1, 1, 1]}}))
    assert build_extractor(f"local-dir:{d}", "text").spec_hash() != a.spec_hash()


def test_offline_fails_fast_with_a_hint_that_extract_and_finetune_accept(tiny_arch: Path, offline: None) -> None:
    from mmcache.extract.runner import parse_requests
    from mmcache.finetune.run import build_encoder

    t0 = time.perf_counter()
    with pytest.raises(MMCacheError) as err:
        build_extractor(f"{TINY_ARCH}:openai", "text")
    msg = str(err.value)
    assert time.perf_counter() - t0 < 10 and "\n" not in msg
    assert "huggingface.co/mmcache-test/tiny.openai" in msg and "no network" in msg and "HF_HUB_OFFLINE=1" in msg
    hint = msg.split("e.g. ", 1)[1].split(";", 1)[0]
    assert hint == f"--text {TINY_ARCH}:openai[weights={CKPT_NAME}]"
    store = hint.split(" ", 1)[1].replace(CKPT_NAME, str(tiny_arch))
    (req,) = parse_requests("text", store)
    for ext in (build_extractor(req.preset, "text", **req.overrides), build_encoder("text", store)):
        assert ext.spec["quick_gelu"] is True and _uses_quick_gelu(ext)
    with pytest.raises(MMCacheError, match="one encoder per modality"):
        build_encoder("text", "clip-tiny,clip-tiny")


def test_offline_hint_of_the_clip_preset_names_the_quick_gelu_weights(offline: None) -> None:
    with pytest.raises(MMCacheError) as err:
        build_extractor("clip", "context")
    msg = str(err.value)
    assert "huggingface.co/timm/vit_base_patch32_clip_224.openai" in msg
    assert f"--context clip[weights={CKPT_NAME}]" in msg and "--image" not in msg


def test_weights_of_another_shape_are_one_line_errors(tmp_path: Path) -> None:
    half = tmp_path / "image_tower_only.bin"
    torch.save(build_extractor("clip-tiny", "image").model.state_dict(), half)  # the text tower was dropped
    with pytest.raises(MMCacheError, match=r"cannot load as weights of this CLIP \(Error\(s\) in loading .*Missing key"):
        build_extractor("clip-tiny", "image", weights=str(half))
