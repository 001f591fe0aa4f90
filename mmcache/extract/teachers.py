"""Teachers for distillation: per-class `logits` computed from raw inputs only, never from labels.

`nli-teacher`: an MNLI model scores, for each class of the dataset, a hypothesis about the
sample (e.g. "The mention of <entity> conveys a negative opinion." / "... is purely
objective.") against the text as premise; logits[c] = the entailment logit of class c.
`clip-teacher`: CLIP zero-shot scores of the image (and the text) against a prompt per class.

The runner gives a teacher the dataset's class names (`label_space`) and the decoded raw
fields (text, entity, image); gold labels never reach it, so teacher outputs cannot leak them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmcache.errors import MMCacheError
from mmcache.extract.base import DecodeError, Extractor, register_family, register_preset
from mmcache.extract.clip import CLIP_OPTIONS, TINY_CLIP_CFG, build_clip_model, resolve_clip_config
from mmcache.extract.roberta import TINY_ROBERTA, hf_weights_spec, load_hf
from mmcache.extract.roberta import offline_example as hf_offline_example

# Class names read as "no opinion"; their hypothesis says the mention is objective.
NEUTRAL_NAMES = {"neutral", "none", "objective", "other", "no", "nothate", "not hateful", "real", "true"}
NLI_TEMPLATES = {
    "entity": "The mention of {entity} conveys a {label} opinion.",
    "entity_neutral": "The mention of {entity} is purely objective.",
    "text": "This text conveys a {label} opinion.",
    "text_neutral": "This text is purely objective.",
}

# Every teacher takes the dataset's class names (given by the runner) and the task to score.
TEACHER_OPTIONS = ("label_space", "task")

register_preset("nli-teacher", "nli-teacher", model="roberta-large-mnli", max_length=128)
# A wider init than the default 0.02 so the tiny classifier separates hypotheses visibly in tests.
register_preset("nli-teacher-tiny", "nli-teacher", model="tiny", tiny={**TINY_ROBERTA, "initializer_range": 0.2}, seed=0,
                max_length=48)
register_preset("clip-teacher", "clip-teacher", arch="ViT-B-32", pretrained="openai")
register_preset("clip-teacher-tiny", "clip-teacher", arch="tiny", model_cfg=TINY_CLIP_CFG, seed=0)


def _class_names(config: dict[str, Any], preset: str) -> tuple[str, list[str]]:
    space = config.get("label_space")
    if not space:
        raise MMCacheError(f"teacher {preset!r} needs the dataset's class names; run it through `mmcache extract`")
    task = config.get("task") or next(iter(space))
    if task not in space:
        raise MMCacheError(f"teacher {preset!r}: task {task!r} is not one of the dataset's tasks {list(space)}")
    return task, [str(n) for n in space[task]]


@register_family("nli-teacher")
class NliTeacher(Extractor):
    """Entailment logits of one hypothesis per class, with the sample text as premise (and its entity)."""

    modalities = ("teacher",)
    options = ("model", "revision", "tiny", "seed", "max_length", "templates", "entail_index", *TEACHER_OPTIONS)

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__(preset, config, modality)
        self.task, self.classes = _class_names(self.config, preset)
        self.templates = {**NLI_TEMPLATES, **self.config.get("templates", {})}
        self.max_length = int(self.config.get("max_length", 128))
        self.config.update(hf_weights_spec(str(self.config["model"])))
        example = hf_offline_example("--teacher", preset, str(self.config["model"]))
        self.model, self.tokenizer = load_hf(self.config, kind="classifier", num_labels=3, example=example)
        label2id = {str(k).lower(): int(v) for k, v in (self.model.config.label2id or {}).items()}
        entail = self.config.get("entail_index", label2id.get("entailment"))
        if entail is None:
            raise MMCacheError(
                f"{self.config['model']}: no 'entailment' label in its config ({label2id}); set entail_index, "
                "e.g. nli-teacher[entail_index=2]"
            )
        self.entail_index = int(entail)
        self.requires_grad_(False)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Text (premise) and entity (named in the hypotheses when present)."""
        return ("text", "entity")

    def hypotheses(self, entity: str | None) -> list[str]:
        """One hypothesis per class, in the dataset's class order."""
        kind = "entity" if entity else "text"
        out = []
        for name in self.classes:
            key = f"{kind}_neutral" if name.lower() in NEUTRAL_NAMES else kind
            out.append(self.templates[key].format(entity=entity, label=name.lower()))
        return out

    def preprocess(self, decoded: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Tokenise (text, hypothesis_c) for every class c: [C, max_length]."""
        text = decoded.get("text")
        if not isinstance(text, str):
            raise DecodeError("the NLI teacher needs the sample's text")
        hyps = self.hypotheses(decoded.get("entity"))
        enc = self.tokenizer([text] * len(hyps), hyps, padding="max_length", truncation="only_first",
                             max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Entailment logit per (sample, class): [B, C]."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b, c, length = ids.shape
        logits = self.model(input_ids=ids.reshape(b * c, length), attention_mask=mask.reshape(b * c, length)).logits
        return {"logits": logits[:, self.entail_index].reshape(b, c)}


@register_family("clip-teacher")
class ClipTeacher(Extractor):
    """CLIP zero-shot: logit_scale * cos(image [+ text], prompt_c) for a prompt per class."""

    modalities = ("teacher",)
    options = (*CLIP_OPTIONS, "template", "use_text", *TEACHER_OPTIONS)
    choices = {"use_text": (True, False), "quick_gelu": (True, False)}
    # An open_clip model (encode_image, encode_text, logit_scale), and the class prompts' embeddings (a buffer).
    model: Any
    prompts: torch.Tensor

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__(preset, config, modality)
        self.task, self.classes = _class_names(self.config, preset)
        self.template = str(self.config.get("template", "a photo that conveys a {label} feeling."))
        self.use_text = bool(self.config.get("use_text", True))
        self.config = resolve_clip_config(self.config)
        self.model, self.transform, self.tokenizer = build_clip_model(self.config, "--teacher", preset)
        self.requires_grad_(False)
        with torch.no_grad():
            prompts = self.tokenizer([self.template.format(label=n.lower()) for n in self.classes])
            self.register_buffer("prompts", F.normalize(self.model.encode_text(prompts).float(), dim=-1))

    @property
    def inputs(self) -> tuple[str, ...]:
        """Image, and the text when `use_text`."""
        return ("image", "text") if self.use_text else ("image",)

    def preprocess(self, decoded: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Image tensor (+ token ids of the sample text)."""
        out = {"image": self.transform(decoded["image"])}
        if self.use_text:
            if not isinstance(decoded.get("text"), str):
                raise DecodeError("the CLIP teacher needs the sample's text (or use_text=false)")
            out["text"] = self.tokenizer([decoded["text"]])[0]
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Scaled cosine of the (image + text) embedding with each class prompt: [B, C]."""
        emb = F.normalize(self.model.encode_image(batch["image"]).float(), dim=-1)
        if self.use_text:
            emb = F.normalize(emb + F.normalize(self.model.encode_text(batch["text"]).float(), dim=-1), dim=-1)
        scale = self.model.logit_scale.exp().float()
        return {"logits": scale * emb @ self.prompts.t()}
