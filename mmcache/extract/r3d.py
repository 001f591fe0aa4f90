"""`r3d` family: torchvision video ResNets (r3d_18, mc3_18, r2plus1d_18; Kinetics-400) as clip encoders.

Frames come from the shared `video` decoder, sampled uniformly over the whole clip (not
the first N frames); `pooled` is the 512-d global average of the last block.
"""

from __future__ import annotations

from typing import Any

import torch

from mmcache.errors import MMCacheError
from mmcache.extract.base import register_family, register_preset
from mmcache.extract.media import DEFAULT_VIDEO_FRAMES, uniform_indices
from mmcache.extract.resnet import TorchvisionExtractor, build_torchvision, weights_enum, weights_spec

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
VIDEO_ARCHS = {"r3d_18": "R3D_18_Weights", "mc3_18": "MC3_18_Weights", "r2plus1d_18": "R2Plus1D_18_Weights"}


@register_family("r3d")
class R3DExtractor(TorchvisionExtractor):
    """Video ResNet clip features: `pooled [512]`.

    Config: arch (r3d_18 / mc3_18 / r2plus1d_18), weights (enum name / path / None), seed,
    frames (clip length, sampled uniformly over the clip), resize ([h, w] before the crop,
    as torchvision's Kinetics eval transform), size (square centre crop), mean, std.
    """

    modalities = ("video",)
    options = ("arch", "weights", "seed", "frames", "resize", "size", "mean", "std")

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__(preset, config, modality)
        cfg = self.config
        arch = cfg.setdefault("arch", "r3d_18")
        if arch not in VIDEO_ARCHS:
            raise MMCacheError(f"preset {preset!r}: unknown video arch {arch!r}; use one of {list(VIDEO_ARCHS)}")
        import torchvision.models.video as tvv

        self.enum_cls = weights_enum(VIDEO_ARCHS[arch])
        cfg.setdefault("weights", "KINETICS400_V1")
        cfg.setdefault("frames", DEFAULT_VIDEO_FRAMES)
        cfg.setdefault("resize", [128, 171])
        cfg.setdefault("size", 112)
        cfg.setdefault("mean", list(KINETICS_MEAN))
        cfg.setdefault("std", list(KINETICS_STD))
        cfg["resize"] = [int(v) for v in cfg["resize"]]
        self._weights_spec = weights_spec(cfg["weights"], self.enum_cls)
        self.model = build_torchvision(getattr(tvv, arch), self.enum_cls, cfg["weights"], int(cfg.get("seed", 0)))
        self.model.eval()
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        """Width of `pooled` (512)."""
        return int(self.model.fc.in_features)

    @property
    def decode_options(self) -> dict[str, int]:
        """Ask the decoder for `frames` frames over the clip, shrunk to the resize's short side."""
        return {"video_frames": int(self.config["frames"]), "video_size": min(self.config["resize"])}

    def preprocess(self, decoded: dict[str, Any]) -> torch.Tensor:
        """uint8 frames [T,H,W,3] -> `frames` frames, resized and centre-cropped, uint8 [3,frames,size,size]."""
        # transforms (v1) functional: its uint8 resize rounds as the Kinetics eval transform does.
        from torchvision.transforms import functional as TF

        video = decoded["video"]
        if not isinstance(video, torch.Tensor):
            video = torch.as_tensor(video)
        # The shared decoder may hold more frames (another extractor asked for more): subsample uniformly.
        idx = uniform_indices(video.shape[0], int(self.config["frames"]))
        clip = video[idx].permute(0, 3, 1, 2)  # [T,3,H,W]
        # antialias=False as torchvision's Kinetics eval transform (the weights were trained so);
        # the decoder has already shrunk frames with an area filter, so little aliasing is left.
        clip = TF.resize(clip, self.config["resize"], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        clip = TF.center_crop(clip, [int(self.config["size"])])
        return clip.permute(1, 0, 2, 3).contiguous()

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """uint8 [B,3,T,H,W] -> pooled [B,512]."""
        x = batch.to(self._device(), non_blocking=True).float().div_(255)
        x = (x - self.mean) / self.std
        m = self.model
        x = m.layer4(m.layer3(m.layer2(m.layer1(m.stem(x)))))
        return {"pooled": m.avgpool(x).flatten(1)}


register_preset("r3d", "r3d", arch="r3d_18", weights="KINETICS400_V1", frames=16, resize=[128, 171], size=112)
register_preset("mc3", "r3d", arch="mc3_18", weights="KINETICS400_V1", frames=16, resize=[128, 171], size=112)
register_preset("r2plus1d", "r3d", arch="r2plus1d_18", weights="KINETICS400_V1", frames=16, resize=[128, 171],
                size=112)
# Tests and smoke runs: random init (seeded), 4 frames of 32x32.
register_preset("r3d-tiny", "r3d", arch="r3d_18", weights=None, seed=0, frames=4, resize=[36, 48], size=32)
