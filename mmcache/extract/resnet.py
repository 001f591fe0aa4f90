"""`resnet` family: torchvision ResNets as image encoders (avgpool vector + a grid of regions).

Also holds the weight loading shared by the torchvision families (resnet, r3d, frcnn):
a weights enum name ("IMAGENET1K_V2", "DEFAULT"), a local state_dict file (.pth / .pt /
.safetensors), or None for a seeded random init (tiny test presets).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.extract.base import Extractor, register_family, register_preset
from mmcache.extract.weights import weights_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_ENUMS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
          "resnet101": "ResNet101_Weights", "resnet152": "ResNet152_Weights"}


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: safetensors, or a torch file read with weights_only (nothing unpickled)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch/safetensors raise many types for a bad file)
        raise MMCacheError(f"{path}: cannot read weights ({type(e).__name__}: {e}); "
                           "pass a state_dict saved with torch.save or safetensors") from e
    # Training checkpoints often nest the weights one level down.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MMCacheError(f"{path}: not a state_dict of tensors; pass the file of model.state_dict()")
    return sd


def weights_enum(enum_name: str) -> Any:
    """The torchvision weights enum class called `enum_name` (e.g. "ResNet50_Weights")."""
    import torchvision.models as tvm
    import torchvision.models.detection as tvd
    import torchvision.models.video as tvv

    for mod in (tvm, tvv, tvd):
        cls = getattr(mod, enum_name, None)
        if cls is not None:
            return cls
    raise MMCacheError(f"torchvision has no weights enum {enum_name!r}; upgrade torchvision or pick another model")


def is_local_weights(weights: str | None, enum_cls: Any) -> bool:
    """True when `weights` names a file rather than an enum member ("IMAGENET1K_V1", "DEFAULT")."""
    return weights is not None and weights != "DEFAULT" and weights not in enum_cls.__members__


def build_torchvision(builder: Callable[..., nn.Module], enum_cls: Any, weights: str | None, seed: int = 0,
                      **kwargs: Any) -> nn.Module:
    """Build a torchvision model with `weights`: an enum member name, a local state_dict path, or None.

    None gives a random init under `seed` (without touching the global RNG). Local files
    must match the architecture exactly (strict load), so a wrong file fails loudly.
    """
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return builder(weights=None, **kwargs)
    if not is_local_weights(weights, enum_cls):
        member = enum_cls.DEFAULT if weights == "DEFAULT" else enum_cls[weights]
        try:
            return builder(weights=member, **kwargs)
        except OSError as e:  # urllib's URLError is an OSError: no network, no cached file
            fname = member.url.rsplit("/", 1)[-1]
            hub = Path(torch.hub.get_dir()) / "checkpoints" / fname
            raise MMCacheError(
                f"cannot load torchvision weights {enum_cls.__name__}.{member.name} ({e}); without network, put "
                f"{member.url} at {hub}, or pass the local file as weights=PATH"
            ) from e
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MMCacheError(
            f"weights {weights!r} is neither a {enum_cls.__name__} member "
            f"({', '.join(enum_cls.__members__)}, DEFAULT) nor an existing file; fix the name or the path"
        )
    with torch.random.fork_rng(devices=[]):
        model = builder(weights=None, **kwargs)  # the random init is overwritten below
    sd = load_state_dict_file(path)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1:3]
        raise MMCacheError(f"{path}: weights do not fit {getattr(builder, '__name__', 'the model')} "
                           f"({' '.join(s.strip() for s in first)}); pass weights of that architecture") from e
    return model


def weights_spec(weights: str | None, enum_cls: Any) -> dict[str, Any]:
    """Extra spec entries that pin local weights by content (a replaced file -> a new spec hash)."""
    if is_local_weights(weights, enum_cls):
        path = Path(str(weights)).expanduser()
        if path.is_file():
            return {"weights_sha256": weights_sha256(path)}
    return {}


class TorchvisionExtractor(Extractor):
    """Shared plumbing of the torchvision families: device lookup and the spec with weight hashes."""

    enum_cls: Any = None
    _weights_spec: dict[str, Any] = {}  # replaced per instance, never mutated
    # The torchvision model, set by each subclass; its submodules are reached by name (m.layer4, m.roi_heads...).
    model: Any
    # Normalisation buffers (register_buffer) of the image/video families.
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def spec(self) -> dict[str, Any]:
        """Config, plus the sha256 of local weight files."""
        return {**super().spec, **self._weights_spec}

    def _device(self) -> torch.device:
        """The device the parameters live on."""
        return next(self.parameters()).device


@register_family("resnet")
class ResNetExtractor(TorchvisionExtractor):
    """ResNet image features: `pooled` = avgpool of layer4; `tokens` = layer4 pooled to a grid x grid map.

    Config: arch (resnet18..152), weights (enum name / path / None), seed, resize, crop,
    mean, std, grid (regions per side; 7 = the native 7x7 map at 224, 6 = 36 regions, 0 = no tokens),
    augment (random crops and flips while `finetune run` trains; never in the spec).
    """

    modalities = ("image",)
    options = ("arch", "weights", "seed", "resize", "crop", "mean", "std", "grid", "augment")
    choices = {"augment": (True, False)}
    # The runner converts the weights to channels_last on CUDA, where cuDNN convs run faster so.
    channels_last = True

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__(preset, config, modality)
        cfg = self.config
        arch = cfg.get("arch", "resnet50")
        if arch not in RESNET_ARCHS:
            raise MMCacheError(f"preset {preset!r}: unknown resnet arch {arch!r}; use one of {list(RESNET_ARCHS)}")
        import torchvision.models as tvm

        self.enum_cls = weights_enum(_ENUMS[arch])
        cfg.setdefault("weights", "DEFAULT")
        cfg.setdefault("resize", 256)
        cfg.setdefault("crop", 224)
        cfg.setdefault("mean", list(IMAGENET_MEAN))
        cfg.setdefault("std", list(IMAGENET_STD))
        cfg.setdefault("grid", 7)
        self._weights_spec = weights_spec(cfg["weights"], self.enum_cls)
        self.model = build_torchvision(getattr(tvm, arch), self.enum_cls, cfg["weights"], int(cfg.get("seed", 0)))
        self.model.eval()
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def parse_preset(cls, name: str) -> dict[str, Any] | None:
        """Free-form `resnetNN[:WEIGHTS]` (e.g. `resnet34`, `resnet50:IMAGENET1K_V1`) -> config."""
        m = re.fullmatch(r"(resnet(?:18|34|50|101|152))(?::(\w+))?", name)
        if m is None:
            return None
        arch, tag = m.group(1), m.group(2) or "DEFAULT"
        enum_cls = weights_enum(_ENUMS[arch])
        if tag not in enum_cls.__members__ and tag != "DEFAULT":
            return None
        tf = (enum_cls.DEFAULT if tag == "DEFAULT" else enum_cls[tag]).transforms()
        return {"arch": arch, "weights": tag, "resize": tf.resize_size[0], "crop": tf.crop_size[0]}

    @property
    def dim(self) -> int:
        """Width of `pooled` and of each token (2048 for resnet50+, 512 for resnet18/34)."""
        return int(self.model.fc.in_features)

    def preprocess(self, decoded: dict[str, Any]) -> torch.Tensor:
        """Image -> RGB (torchvision's image loader) -> resized, centre-cropped uint8 [3,crop,crop].

        The same steps as the weights' `transforms()` (bilinear resize of the short side, centre
        crop); scaling to [0,1] and normalising run on the device.
        """
        from torchvision.transforms.v2 import functional as TF

        img = decoded["image"]
        if getattr(img, "mode", "RGB") != "RGB":
            img = img.convert("RGB")
        if self.augmenting:
            return self._train_transform()(TF.pil_to_tensor(img))
        img = TF.resize(img, [int(self.config["resize"])], interpolation=TF.InterpolationMode.BILINEAR,
                        antialias=True)
        img = TF.center_crop(img, [int(self.config["crop"])])
        return TF.pil_to_tensor(img)

    def _train_transform(self) -> Any:
        """augment=true while training: torchvision's RandomResizedCrop to the crop size (scale 0.9-1.0, as
        open_clip trains) and a random horizontal flip, on the uint8 image."""
        from torchvision.transforms import v2

        crop = int(self.config["crop"])
        return v2.Compose([v2.RandomResizedCrop(crop, scale=(0.9, 1.0), antialias=True),
                           v2.RandomHorizontalFlip()])

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """uint8 [B,3,H,W] -> pooled [B,d], tokens [B,grid^2,d], mask [B,grid^2]."""
        x = batch.to(self._device(), non_blocking=True).float().div_(255)
        x = (x - self.mean) / self.std
        m = self.model
        if m.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        fmap = m.layer4(m.layer3(m.layer2(m.layer1(x)))).float()  # pool in fp32 under autocast
        out = {"pooled": fmap.mean(dim=(2, 3))}
        grid = int(self.config["grid"])
        if grid > 0:
            tokens = F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)
            out["tokens"] = tokens
            out["mask"] = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return out


# Resize/crop follow each weights enum's own eval transforms (V1: 256/224, V2: 232/224).
register_preset("resnet", "resnet", arch="resnet50", weights="IMAGENET1K_V2", resize=232, crop=224, grid=7)
register_preset("resnet50", "resnet", arch="resnet50", weights="IMAGENET1K_V2", resize=232, crop=224, grid=7)
# The reference features of the MVSA literature: torchvision's original weights, Resize 256 / CenterCrop 224.
register_preset("resnet50-v1", "resnet", arch="resnet50", weights="IMAGENET1K_V1", resize=256, crop=224, grid=7)
register_preset("resnet101", "resnet", arch="resnet101", weights="IMAGENET1K_V2", resize=232, crop=224, grid=7)
register_preset("resnet152", "resnet", arch="resnet152", weights="IMAGENET1K_V2", resize=232, crop=224, grid=7)
# Tests and smoke runs: random init (seeded), small input, a 2x2 grid.
register_preset("resnet-tiny", "resnet", arch="resnet18", weights=None, seed=0, resize=72, crop=64, grid=2)
