"""CLIP image and text encoders through open_clip: projected `pooled` + pre-projection `tokens`.

Presets: `clip` (ViT-B-32, openai weights), `clip-b16`, `clip-l14`, `clip-tiny` (random
init, fixed seed, offline) and any `ARCH:TAG` open_clip knows (`ViT-B-32:laion2b_s34b_b79k`)
or `ARCH:/path/to/weights.bin` for a local checkpoint. A local copy of a tagged checkpoint is
`PRESET[weights=PATH]` (e.g. `clip[weights=...]`): it runs with the tag's activation (QuickGELU
for OpenAI weights) and preprocessing, and the spec pins the file by its sha256.
`clip[augment=true]` (image tower, `finetune run`) trains on open_clip's train preprocessing.
`clip[projection=false]` stores the pooled features before the final projection (the CLIP paper's linear probes
read those; its README the projected ones): the ViT image tower's pooled output before `proj`, the text tower's
pooled output before `text_projection`; a ModifiedResNet image tower or a Hugging Face text tower is refused.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.extract.base import DecodeError, Extractor, register_family, register_preset
from mmcache.extract.weights import hub_offline, offline_hint, weights_sha256

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


# Config keys of the clip family (the teacher adds its own). `weights_sha256` is derived, never given.
CLIP_OPTIONS = ("arch", "pretrained", "weights", "quick_gelu", "model_cfg", "seed")
# A local checkpoint's file name in the hints (what open_clip's Hugging Face repos hold).
CKPT_NAME = "/path/to/open_clip_pytorch_model.bin"


def _looks_like_path(s: str) -> bool:
    suffixes = (".bin", ".pt", ".pth", ".safetensors")
    return os.sep in s or s.startswith((".", "~")) or os.path.exists(s) or s.endswith(suffixes)


def _is_torchscript(path: Path) -> bool:
    """OpenAI's original checkpoints (ViT-B-32.pt) are TorchScript archives: a zip holding code/ and constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())


def _tag_cfg(arch: str, tag: str) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(arch)
        raise MMCacheError(f"open_clip has no pretrained tag {tag!r} for {arch}; known tags: {', '.join(known) or 'none'}")
    return dict(cfg)


def _quick_gelu(arch: str, tag: str | None, weights: str | None, asked: bool | None) -> bool:
    """Whether the model must use QuickGELU: the weights decide (their tag, the arch name, or the user when unknown)."""
    import open_clip

    arch_quick = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    if tag:
        need = arch_quick or bool(_tag_cfg(arch, tag).get("quick_gelu", False))
        if asked is not None and asked != need:
            raise MMCacheError(f"{arch} '{tag}' weights were trained {'with' if need else 'without'} QuickGELU; "
                               f"drop quick_gelu={str(asked).lower()}")
        return need
    if arch_quick:
        if asked is False:
            raise MMCacheError(f"{arch} always uses QuickGELU; drop quick_gelu=false, or name the plain architecture")
        return True
    if asked is not None or weights is None:
        return bool(asked)
    quick_tags = [t for t in open_clip.list_pretrained_tags_by_model(arch)
                  if open_clip.get_pretrained_cfg(arch, t).get("quick_gelu")]
    if not quick_tags:
        return False  # no weights of this architecture were trained with QuickGELU
    example = "openai" if "openai" in quick_tags else quick_tags[0]
    raise MMCacheError(
        f"{weights}: cannot tell whether these {arch} weights need QuickGELU ({', '.join(quick_tags)} weights do, "
        f"others do not); name the tag they hold, e.g. {arch}:{example}[weights={weights}], or add quick_gelu=true "
        "(OpenAI weights) or quick_gelu=false"
    )


def resolve_clip_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A clip-family config completed with what decides the model: `quick_gelu`, and local weights' `weights_sha256`.

    The activation follows the weights: a pretrained tag knows it (open_clip's table), as does a
    `-quickgelu` architecture; for a local file of an architecture whose weights differ (ViT-B-32:
    OpenAI and LAION-400M QuickGELU, LAION-2B not), the tag it holds or `quick_gelu` must be given.
    """
    import open_clip

    cfg = dict(cfg)
    weights = cfg.get("weights")
    if weights is not None:
        path = Path(os.path.expanduser(str(weights))).absolute()
        if not path.is_file():
            raise MMCacheError(f"CLIP weights file {path} not found; pass an existing open_clip checkpoint file")
        if _is_torchscript(path):
            raise MMCacheError(
                f"{path} is a TorchScript archive (OpenAI's original release), which cannot be read without unpickling "
                "code; pass open_clip's checkpoint of the same weights instead (open_clip_pytorch_model.bin from "
                "huggingface.co/timm/<model>.openai)"
            )
        cfg["weights"] = str(path)
        cfg["weights_sha256"] = weights_sha256(path)
    asked = cfg.pop("quick_gelu", None)
    if "model_cfg" in cfg:  # the config is the architecture: the activation goes into it
        if asked is not None:
            cfg["model_cfg"] = {**cfg["model_cfg"], "quick_gelu": bool(asked)}
        return cfg
    arch = str(cfg["arch"])
    if weights is not None and arch.startswith(("hf-hub:", "local-dir:")):
        raise MMCacheError(f"{arch} brings its own weights; drop weights={weights}")
    if arch.startswith("local-dir:"):
        cfg["weights_sha256"] = weights_sha256(arch[len("local-dir:"):])
        return cfg
    if arch.startswith("hf-hub:"):
        return cfg  # the repo's open_clip_config.json decides
    if arch not in open_clip.list_models():
        raise MMCacheError(f"open_clip has no architecture {arch!r}; see open_clip.list_models()")
    cfg["quick_gelu"] = _quick_gelu(arch, cfg.get("pretrained"), cfg.get("weights"), asked)
    return cfg


def offline_example(flag: str, preset: str, cfg: dict[str, Any]) -> str:
    """How to name a downloaded copy of a clip-family config's weights, e.g. `--image clip[weights=/path/...]`."""
    arch = str(cfg.get("arch"))
    if arch.startswith("hf-hub:"):
        return f"{flag} NAME=local-dir:/path/to/{arch[len('hf-hub:'):].rsplit('/', 1)[-1]} (the repo's files)"
    # The preset keeps its tag, so the copy runs with the tag's activation and preprocessing.
    return f"{flag} {preset}[weights={CKPT_NAME}]"


def _first_line(e: BaseException) -> str:
    """The gist of an exception in one short line (torch's load errors put it on the line after a heading)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= 200 else text[:200] + "..."


@contextlib.contextmanager
def _quiet_open_clip_errors() -> Iterator[None]:
    """Mute open_clip's own error logs (root logger) while loading: a failure is raised as one MMCacheError line."""

    def keep(record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}open_clip{os.sep}" in record.pathname)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def build_clip_model(cfg: dict[str, Any], flag: str = "--image", preset: str = "clip") -> tuple[nn.Module, Any, Any]:
    """(model, image transform, tokenizer) for a config from `resolve_clip_config`; errors say how to load offline.

    `flag` and `preset` (the command-line option and preset name) make the offline hint copyable.
    """
    import open_clip

    weights = cfg.get("weights")
    if "model_cfg" in cfg:
        # Seeded in a forked RNG so the same preset is the same model in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.get("seed", 0)))
            model = open_clip.model.CLIP(**copy.deepcopy(cfg["model_cfg"]))
        if weights:
            try:
                open_clip.load_checkpoint(model, weights)
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                raise MMCacheError(f"{weights}: cannot load as weights of this CLIP ({_first_line(e)}); pass a "
                                   "checkpoint of the same architecture (the whole model, both towers)") from None
        vision = cfg["model_cfg"]["vision_cfg"]
        transform = open_clip.image_transform(vision["image_size"], is_train=False)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["model_cfg"]["text_cfg"]["context_length"])
        return model.eval(), transform, tokenizer
    arch, tag = str(cfg["arch"]), cfg.get("pretrained")
    tag_cfg = _tag_cfg(arch, tag) if tag and not arch.startswith(("hf-hub:", "local-dir:")) else {}
    extra: dict[str, Any] = {}
    if weights and tag_cfg:
        # A local copy of a tagged checkpoint: the tag's preprocessing, as open_clip gives the tag itself.
        extra = {f"image_{k}": tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    downloads = not weights and (bool(tag) or arch.startswith("hf-hub:"))
    offline = hub_offline() if downloads else None
    try:
        with _quiet_open_clip_errors():
            model, _, transform = open_clip.create_model_and_transforms(
                arch, pretrained=weights or tag, force_quick_gelu=bool(cfg.get("quick_gelu", False)), **extra
            )
            tokenizer = open_clip.get_tokenizer(arch)
    except (RuntimeError, OSError, ValueError) as e:
        first = _first_line(e)
        if weights:
            raise MMCacheError(f"{weights}: cannot load as CLIP {arch} weights ({first}); "
                               "pass an open_clip checkpoint of that architecture") from None
        example = offline_example(flag, preset, cfg)
        hub = f" (huggingface.co/{tag_cfg['hf_hub'].rstrip('/')})" if tag_cfg.get("hf_hub") else ""
        what = f"CLIP {arch} '{tag}' weights{hub}" if tag else f"CLIP {arch}"
        if offline:
            raise MMCacheError(offline_hint(what, offline, example)) from None
        raise MMCacheError(f"could not load {what}: {first}; without network, download the checkpoint elsewhere "
                           f"and pass it: {example}") from None
    return model.eval(), transform, tokenizer


def _clip_class() -> type[Any]:
    import open_clip

    return open_clip.CLIP


@register_family("clip")
class ClipExtractor(Extractor):
    """open_clip CLIP tower for one modality: `pooled` = projected embedding, `tokens` before projection."""

    modalities = ("image", "text", "context")
    options = (*CLIP_OPTIONS, "tokens", "augment", "projection")
    choices = {"tokens": (True, False), "quick_gelu": (True, False), "augment": (True, False),
               "projection": (True, False)}
    # An open_clip CLIP / CustomTextCLIP: its towers are reached by name and the unused one set to None.
    model: Any

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__(preset, config, modality)
        if self.config.get("projection", True) is True:
            self.config.pop("projection", None)  # the default: the spec (and its hash) stays as without the option
        self.projection = bool(self.config.get("projection", True))
        self.config = resolve_clip_config(self.config)
        self.model, self.transform, self.tokenizer = build_clip_model(self.config, f"--{modality}", preset)
        self.with_tokens = bool(self.config.get("tokens", True))
        visual = self.model.visual
        if not self.projection:
            self._drop_projection(modality, preset)
        # ViT towers return (pooled, patch tokens) when asked; other towers (ModifiedResNet) have no tokens.
        self._visual_tokens = self.with_tokens and hasattr(visual, "output_tokens")
        if self._visual_tokens:
            visual.output_tokens = True
        self.pad_id = int(getattr(self.tokenizer, "pad_token_id", None) or 0)
        # augment=true: open_clip's own train preprocessing (RandomResizedCrop to the input size, scale 0.9-1.0,
        # then the model's normalisation) while training; `transform` (the reference) otherwise.
        self.train_transform: Any = None
        if self.augment:
            import open_clip
            from open_clip.transform import PreprocessCfg, image_transform_v2

            pp = PreprocessCfg(**open_clip.get_model_preprocess_cfg(self.model))
            self.train_transform = image_transform_v2(pp, is_train=True)
        # Drop the tower this modality does not use, to free its memory.
        if modality == "image" and isinstance(self.model, _clip_class()):
            self.model.transformer = None
            self.model.token_embedding = None
        elif modality != "image":
            self.model.visual = None
        self.requires_grad_(False)

    def _drop_projection(self, modality: str, preset: str) -> None:
        """projection=false: the pooled features before the tower's final projection."""
        import open_clip

        if modality == "image":
            visual = self.model.visual
            if not isinstance(getattr(visual, "proj", None), nn.Parameter):
                raise MMCacheError(f"{preset}[projection=false]: the image tower {type(visual).__name__} has no "
                                   "separate final projection (a ViT tower has); drop projection=false")
            visual.proj = None  # open_clip's VisionTransformer returns the pooled output unprojected then
        elif not isinstance(self.model, open_clip.CLIP):
            raise MMCacheError(f"{preset}[projection=false]: the text tower is a Hugging Face model whose projection "
                               "is part of the tower; drop projection=false")

    @staticmethod
    def parse_preset(name: str) -> dict[str, Any] | None:
        """`ARCH:TAG`, `ARCH:/path/weights.bin` or `hf-hub:org/repo` -> a clip config, else None."""
        import open_clip

        if name.startswith("hf-hub:"):
            return {"arch": name}
        if name.startswith("local-dir:"):
            return {"arch": "local-dir:" + os.path.abspath(os.path.expanduser(name[len("local-dir:"):]))}
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
            return (self.train_transform if self.augmenting else self.transform)(value)
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
        if m.text_projection is not None and self.projection:
            proj = m.text_projection
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        if not self.with_tokens:
            return {"pooled": pooled}
        return {"pooled": pooled, "tokens": x, "mask": text != self.pad_id}
