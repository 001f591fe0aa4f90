"""CLIP image and text encoders through open_clip: projected `pooled` + pre-projection `tokens`.

Presets: `clip` (ViT-B-32, openai weights), `clip-b16`, `clip-l14`, `clip-tiny` (random
init, fixed seed, offline) and any `ARCH:TAG` open_clip knows (`ViT-B-32:laion2b_s34b_b79k`)
or `ARCH:/path/to/weights.bin` for a local checkpoint.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.extract.base import DecodeError, Extractor, register_family, register_preset

# Tiny random-init CLIP for tests and the demo: colour and word identity survive a random
# ViT / text transformer well enough for a linear probe.
# Width 128 (not 64) lifts a linear probe on the demo from ~0.73 to ~0.80 (image+text).
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}

register_preset("clip", "clip", arch="ViT-B-32", pretrained="openai")
register_preset("clip-b16", "clip", arch="ViT-B-16", pretrained="openai")
register_preset("clip-l14", "clip", arch="ViT-L-14", pretrained="openai")
register_preset("clip-tiny", "clip", arch="tiny", model_cfg=TINY_CLIP_CFG, seed=0)


def _looks_like_path(s: str) -> bool:
    suffixes = (".bin", ".pt", ".pth", ".safetensors")
    return os.sep in s or s.startswith((".", "~")) or os.path.exists(s) or s.endswith(suffixes)


def build_clip_model(cfg: dict[str, Any]) -> tuple[nn.Module, Any, Any]:
    """(model, image transform, tokenizer) for a clip-family config; errors say how to load offline."""
    import open_clip

    weights = cfg.get("weights")
    if weights is not None:
        weights = os.path.expanduser(str(weights))
        if not os.path.isfile(weights):
            raise MMCacheError(f"CLIP weights file {weights} not found; pass an existing open_clip checkpoint file")
    if "model_cfg" in cfg:
        # Seeded in a forked RNG so the same preset is the same model in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.get("seed", 0)))
            model = open_clip.model.CLIP(**copy.deepcopy(cfg["model_cfg"]))
        if weights:
            open_clip.load_checkpoint(model, weights)
        vision = cfg["model_cfg"]["vision_cfg"]
        transform = open_clip.image_transform(vision["image_size"], is_train=False)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["model_cfg"]["text_cfg"]["context_length"])
        return model.eval(), transform, tokenizer
    arch = cfg["arch"]
    tag = cfg.get("pretrained")
    quick_gelu = bool(cfg.get("quick_gelu", False))
    if tag and not weights:
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
        quick_gelu = quick_gelu or bool(tag_cfg.get("quick_gelu", False))
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            arch, pretrained=weights or tag, force_quick_gelu=quick_gelu
        )
        tokenizer = open_clip.get_tokenizer(arch)
    except (RuntimeError, OSError, ValueError) as e:
        raise MMCacheError(
            f"could not load CLIP {arch} ({weights or tag}): {e}. Without network, download the checkpoint "
            f"elsewhere and pass it as a path: --image clip={arch}:/path/to/open_clip_pytorch_model.bin"
        ) from None
    return model.eval(), transform, tokenizer


def _clip_class() -> type[Any]:
    import open_clip

    return open_clip.CLIP


@register_family("clip")
class ClipExtractor(Extractor):
    """open_clip CLIP tower for one modality: `pooled` = projected embedding, `tokens` before projection."""

    modalities = ("image", "text", "context")
    # An open_clip CLIP / CustomTextCLIP: its towers are reached by name and the unused one set to None.
    model: Any

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__(preset, config, modality)
        self.model, self.transform, self.tokenizer = build_clip_model(self.config)
        self.with_tokens = bool(self.config.get("tokens", True))
        visual = self.model.visual
        # ViT towers return (pooled, patch tokens) when asked; other towers (ModifiedResNet) have no tokens.
        self._visual_tokens = self.with_tokens and hasattr(visual, "output_tokens")
        if self._visual_tokens:
            visual.output_tokens = True
        self.pad_id = int(getattr(self.tokenizer, "pad_token_id", None) or 0)
        # Drop the tower this modality does not use, to free its memory.
        if modality == "image" and isinstance(self.model, _clip_class()):
            self.model.transformer = None
            self.model.token_embedding = None
        elif modality != "image":
            self.model.visual = None
        self.requires_grad_(False)

    @staticmethod
    def parse_preset(name: str) -> dict[str, Any] | None:
        """`ARCH:TAG`, `ARCH:/path/weights.bin` or `hf-hub:org/repo` -> a clip config, else None."""
        import open_clip

        if name.startswith(("hf-hub:", "local-dir:")):
            return {"arch": name}
        if ":" not in name:
            return None
        arch, tag = name.split(":", 1)
        if arch not in open_clip.list_models():
            return None
        if _looks_like_path(tag):
            return {"arch": arch, "weights": os.path.abspath(os.path.expanduser(tag))}
        return {"arch": arch, "pretrained": tag}

    @property
    def inputs(self) -> tuple[str, ...]:
        """The raw field this tower reads: image, text or context."""
        return (self.modality,)

    def preprocess(self, decoded: dict[str, Any]) -> torch.Tensor:
        """Image -> normalised tensor [3,H,W]; text -> token ids [context_length]."""
        value = decoded[self.modality]
        if self.modality == "image":
            return self.transform(value)
        if not isinstance(value, str):
            raise DecodeError(f"expected a text, got {type(value).__name__}")
        return self.tokenizer([value])[0]

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Encode a batch of images or token ids."""
        if self.modality == "image":
            return self._encode_image(batch)
        return self._encode_text(batch)

    def _encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model.visual(images)
        if self._visual_tokens:
            pooled, tokens = out
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            return {"pooled": pooled, "tokens": tokens, "mask": mask}
        return {"pooled": out}

    def _encode_text(self, text: torch.Tensor) -> dict[str, torch.Tensor]:
        import open_clip
        from open_clip.transformer import text_global_pool

        m = self.model
        if not isinstance(m, open_clip.CLIP):
            # CustomTextCLIP (HF text towers): the tower itself returns (pooled, tokens).
            m.text.output_tokens = self.with_tokens
            out = m.text(text)
            if not self.with_tokens:
                return {"pooled": out}
            pooled, tokens = out
            return {"pooled": pooled, "tokens": tokens, "mask": text != self.pad_id}
        # Same steps as open_clip's CLIP.encode_text, keeping the token sequence before pooling.
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast) + m.positional_embedding.to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        pooled = text_global_pool(x, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            proj = m.text_projection
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        if not self.with_tokens:
            return {"pooled": pooled}
        return {"pooled": pooled, "tokens": x, "mask": text != self.pad_id}
