"""Contract 2: an extractor turns decoded raw inputs into named feature arrays.

Presets are data (a dict per preset name, as open_clip's model configs); extractor
classes are code, registered by family. `build_extractor("clip", "image")` looks the
preset up, picks the family's class and builds it for one modality.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import default_collate

from mmcache.cache.spec import spec_hash
from mmcache.errors import MMCacheError
from mmcache.registry import Registry

# Store folder names. `context` is a second text (caption, OCR); `teacher` holds logits.
MODALITIES = ("image", "text", "context", "video", "audio", "teacher")
# Raw fields a decoder can produce for a sample (see extract/decode.py).
FIELDS = ("image", "text", "context", "entity", "video", "audio")


class DecodeError(Exception):
    """A raw input (image, video, audio) is missing, empty or corrupt; the runner records it as failed."""


class Extractor(nn.Module):
    """One pretrained encoder for one modality, usable frozen (extract) or live (finetune).

    Subclasses set `family` and implement `preprocess` (runs in DataLoader workers, CPU,
    per sample) and `forward` (runs on the device, per batch). `forward` returns a dict of
    tensors with a leading batch dim: `pooled [B,d]` always, optionally `tokens [B,T,d]`
    (+ `mask [B,T]`, bool, True = real token), `boxes [B,R,5]`, `logits [B,C]`.
    Shapes after the batch dim are fixed per spec (pad to a fixed T), so stores are dense.
    """

    family: ClassVar[str] = ""
    # Modalities this family can serve; the instance serves `self.modality`.
    modalities: ClassVar[tuple[str, ...]] = ()
    # On CUDA the runner converts the module and 4-D float inputs to channels_last (CNNs run faster so).
    channels_last: ClassVar[bool] = False
    # Config keys the family reads (preset data and `preset[key=value]` options); others are refused.
    # None: not checked (a family registered outside mmcache that declares nothing).
    options: ClassVar[tuple[str, ...] | None] = None
    # Options whose value is one of a fixed set, e.g. {"pooling": ("cls", "mean")}; a flag is (True, False).
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # Arrays read from other modalities' feature stores at forward time, e.g. {"image": ("tokens", "boxes",
    # "mask")}: `finetune run` passes the batch's cached rows as `batch["consumed"][modality][key]`.
    consumes: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__()
        if modality not in self.modalities:
            raise MMCacheError(
                f"preset {preset!r} ({self.family}) cannot encode {modality!r}; it serves {list(self.modalities)}"
            )
        self.preset = preset
        self.config = dict(config)
        self.modality = modality
        # Train-time image augmentation (`preset[augment=true]`, families that list the option): applied by
        # `preprocess` only while the extractor is in training mode. Never part of the spec: evaluation and
        # extraction always use the reference preprocessing, so the store hash is the same either way.
        self.augment = bool(self.config.pop("augment", False))
        if self.augment and modality != "image":
            raise MMCacheError(f"preset {preset!r}: augment=true augments images; drop it from --{modality}")

    @property
    def augmenting(self) -> bool:
        """True while `preprocess` draws random augmentations: `augment` is on and the module is in training mode."""
        return self.augment and self.training

    @property
    def inputs(self) -> tuple[str, ...]:
        """Raw fields of a sample this extractor reads (default: the modality's own field)."""
        return ("text",) if self.modality == "text" else (self.modality,)

    @property
    def decode_options(self) -> dict[str, int]:
        """Options for the shared decoder of each input field, e.g. {"video_frames": 16}.

        The runner decodes each field once per sample for all extractors, with the
        element-wise max of their options; an extractor subsamples what it needs.
        """
        return {}

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able description of everything that determines the output (model, weights, preprocessing)."""
        return {"preset": self.preset, "family": self.family, "modality": self.modality, **self.config}

    def spec_hash(self) -> str:
        """Stable short hash of `spec` (stores refuse rows of a different hash)."""
        return spec_hash(self.spec)

    def preprocess(self, decoded: dict[str, Any]) -> Any:
        """Turn one sample's decoded raw fields into model input (CPU, in a worker)."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        """Batch preprocessed items (default: torch's default_collate)."""
        return default_collate(items)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Encode one batch on the module's device."""
        raise NotImplementedError


def _import_families() -> None:
    import mmcache.extract.builtin  # noqa: F401  (decoders, families and presets register on import)


Decoder = Callable[[Any, dict[str, int]], Any]
# Raw field -> decoder(value, options) -> decoded object (PIL image, frames, waveform, str).
# Raises DecodeError for a missing / empty / corrupt input.
DECODERS: Registry[Decoder] = Registry("decoder field", _import_families)


def register_decoder(field: str) -> Callable[[Decoder], Decoder]:
    """Decorator registering the shared decoder of one raw field."""
    return DECODERS.register(field)


ExtractorClass = type[Extractor]
FAMILIES: Registry[ExtractorClass] = Registry("extractor family", _import_families)
# Preset name -> config dict. "family" picks the class; the rest is passed to it.
PRESETS: Registry[dict[str, Any]] = Registry("extractor preset", _import_families)


def register_family(name: str) -> Callable[[ExtractorClass], ExtractorClass]:
    """Decorator registering an Extractor subclass as family `name`."""

    def deco(cls: ExtractorClass) -> ExtractorClass:
        cls.family = name
        return FAMILIES.add(name, cls)

    return deco


def register_preset(name: str, family: str, **config: Any) -> None:
    """Register preset `name` as data: family + its config (model id, weights, preprocessing)."""
    PRESETS.add(name, {"family": family, **config})


def resolve_preset(name: str) -> tuple[str, dict[str, Any]]:
    """Preset name -> (canonical name, config). Families may parse free-form names (e.g. `arch:tag`)."""
    if name in PRESETS:
        return name, dict(PRESETS[name])
    for cls in FAMILIES.values():
        parsed = getattr(cls, "parse_preset", None)
        cfg = parsed(name) if parsed else None
        if cfg is not None:
            return name, {"family": cls.family, **cfg}
    raise PRESETS.unknown(name)


def build_extractor(preset: str, modality: str, **overrides: Any) -> Extractor:
    """Build the extractor of `preset` for `modality`, config entries replaced by `overrides`."""
    name, cfg = resolve_preset(preset)
    family = cfg.pop("family")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    check_options(name, FAMILIES[family], cfg)
    return FAMILIES[family](name, cfg, modality)


def check_options(preset: str, cls: ExtractorClass, config: dict[str, Any]) -> None:
    """Refuse a config key the family does not read (a typo would be recorded and ignored) or a value off its choices."""
    if cls.options is not None:
        unknown = sorted(set(config) - set(cls.options))
        if unknown:
            raise MMCacheError(
                f"preset {preset!r}: unknown option {unknown[0]!r}; {cls.family} presets take "
                f"{', '.join(sorted(cls.options))}"
            )
    for key, allowed in cls.choices.items():
        value = config.get(key)
        # bool is an int subclass: compare types too, so tokens=1 is not taken for True.
        if key in config and not any(value == a and type(value) is type(a) for a in allowed):
            shown = ", ".join(json.dumps(a) for a in allowed)
            raise MMCacheError(f"preset {preset!r}: {key}={json.dumps(value, default=str)} is not one of {shown}")
