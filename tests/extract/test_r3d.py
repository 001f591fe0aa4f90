"""`r3d` family: frames sampled over the whole clip, shapes, values against torchvision, weights by path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.transforms._presets import VideoClassification

from mmcache.extract import DECODERS, PRESETS, build_extractor
from mmcache.extract.media import uniform_indices
from mmcache.extract.r3d import R3DExtractor
from mmcache.extract.resnet import weights_enum
from tests.extract.test_media import frame_ids, write_video


@pytest.fixture(scope="module")
def tiny() -> R3DExtractor:
    ext = build_extractor("r3d-tiny", "video")
    assert isinstance(ext, R3DExtractor)
    return ext


def flat_video(levels: list[int], h: int = 40, w: int = 60) -> torch.Tensor:
    """uint8 [T,H,W,3] whose frame t is a flat gray of levels[t]."""
    return torch.tensor(levels, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, h, w, 3).contiguous()


def encode(ext: R3DExtractor, videos: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return ext(ext.collate([ext.preprocess({"video": v}) for v in videos]))


def test_preprocess_subsamples_uniformly_and_crops(tiny: R3DExtractor) -> None:
    video = flat_video([20 * t for t in range(10)])
    clip = tiny.preprocess({"video": video})
    assert clip.dtype == torch.uint8 and tuple(clip.shape) == (3, 4, 32, 32)
    # 4 of 10 decoded frames, spread over the clip (not frames 0-3).
    assert clip[0, :, 16, 16].tolist() == [20 * t for t in uniform_indices(10, 4)] == [20, 60, 120, 160]


def test_shapes_dtypes_and_determinism(tiny: R3DExtractor) -> None:
    g = torch.Generator().manual_seed(0)
    vids = [torch.randint(0, 256, (6, 40, 60, 3), dtype=torch.uint8, generator=g) for _ in range(2)]
    out = encode(tiny, vids)
    assert set(out) == {"pooled"} and out["pooled"].dtype == torch.float32 and tuple(out["pooled"].shape) == (2, 512)
    assert not torch.allclose(out["pooled"][0], out["pooled"][1])
    torch.testing.assert_close(encode(build_extractor("r3d-tiny", "video"), vids)["pooled"], out["pooled"])
    assert tiny.dim == 512 and tiny.decode_options == {"video_frames": 4, "video_size": 36}


def test_matches_torchvision_pipeline(tiny: R3DExtractor) -> None:
    video = torch.randint(0, 256, (4, 40, 60, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ref_tf = VideoClassification(crop_size=(32, 32), resize_size=(36, 48))
    trunk = torchvision.models.video.r3d_18()
    trunk.load_state_dict(tiny.model.state_dict())
    trunk.fc = torch.nn.Identity()
    trunk.eval()
    with torch.inference_mode():
        ref = trunk(ref_tf(video.permute(0, 3, 1, 2))[None])
    torch.testing.assert_close(encode(tiny, [video])["pooled"], ref, atol=1e-4, rtol=1e-4)


def test_decoded_clip_covers_the_whole_video(tiny: R3DExtractor, tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", n_frames=30, tone=None)
    video = DECODERS["video"](str(path), tiny.decode_options)
    assert tuple(video.shape) == (4, 36, 48, 3)
    assert frame_ids(video) == uniform_indices(30, 4) == [3, 11, 18, 26]
    assert tuple(encode(tiny, [video])["pooled"].shape) == (1, 512)
    # A decoder run for a longer clip (another extractor asked for 16 frames) still spans the video.
    sixteen = DECODERS["video"](str(path), {"video_frames": 16, "video_size": 36})
    clip = tiny.preprocess({"video": sixteen})
    picked = [round(float(clip[0, t].float().mean()) / 8) for t in range(4)]
    assert picked[0] <= 7 and picked[-1] >= 22 and picked == sorted(picked)


def test_weights_from_a_local_file(tiny: R3DExtractor, tmp_path: Path) -> None:
    path = tmp_path / "r3d.pth"
    torch.save(tiny.model.state_dict(), path)
    loaded = build_extractor("r3d-tiny", "video", weights=str(path), seed=3)
    video = torch.randint(0, 256, (4, 40, 60, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(encode(loaded, [video])["pooled"], encode(tiny, [video])["pooled"])
    assert "weights_sha256" in loaded.spec


def test_presets_use_the_kinetics_eval_transform() -> None:
    enums = {"r3d_18": "R3D_18_Weights", "mc3_18": "MC3_18_Weights", "r2plus1d_18": "R2Plus1D_18_Weights"}
    for name in ("r3d", "mc3", "r2plus1d"):
        cfg = PRESETS[name]
        tf = weights_enum(enums[cfg["arch"]])[cfg["weights"]].transforms()
        assert (cfg["resize"], [cfg["size"]] * 2) == (tf.resize_size, tf.crop_size), name
        assert cfg["frames"] == 16
