"""RoBERTa-style text encoders through transformers: pooled sentence vector + token sequence.

Presets: `roberta` (roberta-base, masked mean of the last layer), `roberta-cls`,
`roberta-pooler`, `roberta-sum4`, `roberta-large`, and `roberta-tiny` (random init with a
byte-level BPE tokenizer trained on the fly, offline). Any Hugging Face id or local
directory: `roberta:<id-or-dir>` or a bare local directory holding `config.json`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch

from mmcache.errors import MMCacheError
from mmcache.extract.base import DecodeError, Extractor, register_family, register_preset
from mmcache.extract.weights import hf_loading, hub_revision, is_model_folder, model_folder, weights_sha256

POOLINGS = ("cls", "pooler", "mean", "sum4")

register_preset("roberta", "roberta", model="roberta-base", pooling="mean", max_length=128)
register_preset("roberta-cls", "roberta", model="roberta-base", pooling="cls", max_length=128)
register_preset("roberta-pooler", "roberta", model="roberta-base", pooling="pooler", max_length=128)
register_preset("roberta-sum4", "roberta", model="roberta-base", pooling="sum4", max_length=128)
register_preset("roberta-large", "roberta", model="roberta-large", pooling="mean", max_length=128)
TINY_ROBERTA: dict[str, Any] = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
                                "intermediate_size": 128, "vocab_size": 1000}
register_preset("roberta-tiny", "roberta", model="tiny", tiny=TINY_ROBERTA, seed=0, pooling="mean", max_length=32)


def tiny_corpus() -> list[str]:
    """A small fixed English corpus (plus the demo's words) to train the tiny tokenizers on (the `-tiny` presets')."""
    from mmcache.data import demo

    base = [
        "the quick brown fox jumps over the lazy dog",
        "i love this picture so much, it made my day",
        "this is the worst service i have ever seen",
        "what a beautiful morning at the station today",
        "the weather is neither good nor bad, just cloudy",
        "we watched the game and the crowd was loud",
        "my friend and i walked past the new poster online",
        "honestly i cannot stand people who talk during movies",
        "the president spoke about the economy and jobs",
        "a sticker, a logo and a painting on the wall",
        "great news! the team won again this season",
        "sad to hear that the shop closed for good",
        "is this an opinion or is it purely objective?",
        "the mention of the brand conveys a positive opinion",
    ]
    words = [w for ws in demo.WORDS.values() for w in ws] + demo.SUBJECTS + demo.NOUNS
    return base + [" ".join(words)] * 3 + [f"{s} {w} this {n}" for s in demo.SUBJECTS for w in words[:5]
                                            for n in demo.NOUNS]


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 1000) -> Any:
    """A RoBERTa tokenizer with a byte-level BPE vocabulary trained on `tiny_corpus()` (deterministic)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(tiny_corpus(), vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                            show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # transformers annotates merges as str | list[str], but passes them to tokenizers' BPE, which takes pairs.
    return RobertaTokenizer(vocab=model["vocab"], merges=merges)  # type: ignore[arg-type]


def tiny_config(tiny: dict[str, Any], num_labels: int | None = None) -> Any:
    """A small RobertaConfig; 514 positions as roberta-base, so max_length never changes the init."""
    from transformers import RobertaConfig

    extra: dict[str, Any] = {}
    if num_labels is not None:
        extra = {"num_labels": num_labels, "id2label": {0: "contradiction", 1: "neutral", 2: "entailment"},
                 "label2id": {"contradiction": 0, "neutral": 1, "entailment": 2}}
    return RobertaConfig(max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, **{**tiny, **extra})


def hf_weights_spec(name: str) -> dict[str, Any]:
    """Spec entries pinning a local model folder (absolute `model` path + `weights_sha256`); none for a Hub id or 'tiny'."""
    if name != "tiny" and is_model_folder(name):
        path = os.path.abspath(os.path.expanduser(name))
        if not os.path.isdir(path):
            raise MMCacheError(f"model folder {path} not found; pass the folder written by save_pretrained "
                               "(model and tokenizer)")
        return {"model": path, "weights_sha256": weights_sha256(path)}
    return {}


def offline_example(flag: str, preset: str, model: str) -> str:
    """How to pass a downloaded copy of `model` on the command line, keeping the preset's other options."""
    from mmcache.extract.base import PRESETS

    folder = f"/models/{model.rstrip('/').rsplit('/', 1)[-1]}"
    return f"{flag} {preset}[model={folder}]" if preset in PRESETS else f"{flag} NAME=roberta:{folder}"


def load_hf(cfg: dict[str, Any], kind: str = "model", num_labels: int | None = None,
            example: str = "--text roberta=roberta:/models/roberta-base") -> tuple[Any, Any]:
    """(model, tokenizer) for a `model` id or directory, or a seeded tiny random init when model == 'tiny'.

    `example` (how to pass a local copy on the command line) completes the error said without network.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForSequenceClassification if kind == "classifier" else AutoModel
    name = str(cfg["model"])
    rev = hub_revision(cfg, name, is_model_folder(name))
    if name == "tiny":
        from transformers import RobertaForSequenceClassification, RobertaModel

        tok = tiny_tokenizer(int(cfg["tiny"].get("vocab_size", 1000)))
        conf = tiny_config({**cfg["tiny"], "vocab_size": len(tok)}, num_labels)
        cls = RobertaForSequenceClassification if kind == "classifier" else RobertaModel
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.get("seed", 0)))
            model = cls(conf)
        return model.eval(), tok
    local = model_folder(name, "model and tokenizer")
    with hf_loading(name, local, example, f"{name!r}" + (f" at revision {rev}" if rev else ""),
                    "the model and tokenizer") as cache_only:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=cache_only, revision=rev or "main")
        model = auto.from_pretrained(name, local_files_only=cache_only, revision=rev or "main")
    return model.eval(), tok


def tokenize(tokenizer: Any, text: Any, max_length: int) -> dict[str, torch.Tensor]:
    """One decoded text -> `input_ids` and `attention_mask`, padded / truncated to `max_length`."""
    if not isinstance(text, str):
        raise DecodeError(f"expected a text, got {type(text).__name__}")
    enc = tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0]}


@register_family("roberta")
class RobertaExtractor(Extractor):
    """A transformers encoder: `pooled` by cls / pooler / mean / sum4, `tokens` of the last layer + mask."""

    modalities = ("text", "context")
    options = ("model", "revision", "tiny", "seed", "pooling", "max_length", "tokens")
    choices = {"pooling": POOLINGS, "tokens": (True, False)}

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__(preset, config, modality)
        self.pooling = str(self.config.get("pooling", "mean"))
        if self.pooling not in POOLINGS:
            raise MMCacheError(f"preset {preset!r}: pooling {self.pooling!r} is not one of {list(POOLINGS)}")
        self.max_length = int(self.config.get("max_length", 128))
        self.with_tokens = bool(self.config.get("tokens", True))
        self.config.update(hf_weights_spec(str(self.config["model"])))
        example = offline_example(f"--{modality}", preset, str(self.config["model"]))
        self.model, self.tokenizer = load_hf(self.config, example=example)
        if self.pooling == "pooler" and getattr(self.model, "pooler", None) is None:
            raise MMCacheError(f"{self.config['model']} has no pooler layer; use pooling=cls, mean or sum4")
        if self.pooling == "sum4" and self.model.config.num_hidden_layers < 4:
            raise MMCacheError(f"{self.config['model']} has fewer than 4 layers; sum4 pooling needs at least 4")
        self.requires_grad_(False)

    @staticmethod
    def parse_preset(name: str) -> dict[str, Any] | None:
        """`roberta:<hf-id-or-dir>`, `hf:<id-or-dir>` or a local model folder -> a roberta config."""
        for prefix in ("roberta:", "hf:"):
            if name.startswith(prefix):
                target = name[len(prefix):]
                if os.path.isdir(os.path.expanduser(target)):
                    target = os.path.abspath(os.path.expanduser(target))
                return {"model": target, "pooling": "mean", "max_length": 128}
        if os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
            return {"model": os.path.abspath(os.path.expanduser(name)), "pooling": "mean", "max_length": 128}
        return None

    @property
    def inputs(self) -> tuple[str, ...]:
        """The raw text field this encoder reads."""
        return (self.modality,)

    def preprocess(self, decoded: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Tokenise one text, padded / truncated to `max_length`."""
        return tokenize(self.tokenizer, decoded[self.modality], self.max_length)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Encode a batch of token ids; pooled vectors use the attention mask, so padding never counts."""
        mask = batch["attention_mask"]
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask,
                         output_hidden_states=self.pooling == "sum4")
        last = out.last_hidden_state
        m = mask.unsqueeze(-1).to(last.dtype)
        if self.pooling == "cls":
            pooled = last[:, 0]
        elif self.pooling == "pooler":
            pooled = out.pooler_output
        elif self.pooling == "mean":
            pooled = (last * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            summed = torch.stack(out.hidden_states[-4:]).sum(0)
            pooled = (summed * m).sum(1) / m.sum(1).clamp(min=1)
        res = {"pooled": pooled}
        if self.with_tokens:
            res.update(tokens=last, mask=mask.bool())
        return res
