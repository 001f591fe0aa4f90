"""VisualBERT (transformers' `VisualBertModel`): a single-stream transformer over text tokens and image regions.

The text is tokenised here; the image regions are not computed here but read from a region
feature store (e.g. `frcnn`, whose `tokens [K,d]`, `boxes [K,5]` and `mask [K]` arrays it takes),
so the detector runs once at extraction and only the transformer trains. The family declares this
with `consumes`: `finetune run --text visualbert --image-store frcnn` passes the batch's cached
region arrays to `forward` under `batch["consumed"]["image"]`.

Boxes are position features: the normalised box (x1, y1, x2, y2, area) goes through a linear layer
(zero-initialised, so a pretrained checkpoint starts unchanged) and is added to each region feature
before VisualBERT's own visual projection, as ViLBERT's and MMF's image location embeddings.

Presets: `visualbert` (the public `uclanlp/visualbert-vqa-coco-pre` with the `bert-base-uncased`
tokenizer), `visualbert-tiny` (random init, a fixed WordPiece vocabulary of a small corpus, offline), and
`visualbert:<id-or-dir>` (a folder's own tokenizer is used when it holds one). `visual_dim` (the
region feature width) comes from the store; a checkpoint trained on another width (the public
ones: 2048-d Detectron features) gets a new visual projection.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, ClassVar

import torch
from torch import nn

from mmcache.errors import MMCacheError
from mmcache.extract.base import Extractor, register_family, register_preset
from mmcache.extract.roberta import hf_weights_spec, tiny_corpus, tokenize
from mmcache.extract.weights import hf_loading, hub_revision, is_model_folder, model_folder

PUBLIC = "uclanlp/visualbert-vqa-coco-pre"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
TINY_VISUALBERT: dict[str, Any] = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                   "intermediate_size": 128, "vocab_size": 1000}
register_preset("visualbert", "visualbert", model=PUBLIC, tokenizer="bert-base-uncased", max_length=128)
register_preset("visualbert-tiny", "visualbert", model="tiny", tiny=TINY_VISUALBERT, seed=0, max_length=32)


def tiny_wordpiece_vocab(vocab_size: int = 1000) -> dict[str, int]:
    """A fixed WordPiece vocabulary of the tiny corpus: the specials, every character (alone and as `##`
    continuation), then whole words and `##` word endings by frequency (ties by the text). Built, never trained:
    the same in every process (a trained vocabulary's ties broke differently from one process to the next)."""
    import re
    import unicodedata
    from collections import Counter

    words: Counter[str] = Counter()
    for line in tiny_corpus():
        text = unicodedata.normalize("NFD", line.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words.update(re.findall(r"\w+|[^\w\s]", text))
    chars = sorted({c for w in words for c in w})
    ends: Counter[str] = Counter()
    for w, n in words.items():
        for k in range(1, len(w) - 1):
            ends["##" + w[k:]] += n
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars),
              *sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w)),
              *sorted((e for e in ends if len(e) > 3), key=lambda e: (-ends[e], e))]
    vocab: dict[str, int] = {}
    for t in tokens:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(t, len(vocab))
    return vocab


@functools.lru_cache(maxsize=4)
def tiny_bert_tokenizer(vocab_size: int = 1000) -> Any:
    """A lower-casing BERT WordPiece tokenizer over `tiny_wordpiece_vocab` (deterministic, offline)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wp = BertWordPieceTokenizer(tiny_wordpiece_vocab(vocab_size), lowercase=True)
    return BertTokenizer(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                         cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _load(cfg: dict[str, Any], visual_dim: int, example: str) -> tuple[Any, Any]:
    """(VisualBertModel, tokenizer): a seeded tiny random init, or a Hub id / local folder whose visual
    projection is re-initialised when it was trained on another region width."""
    from transformers import AutoTokenizer, VisualBertConfig, VisualBertModel

    name = str(cfg["model"])
    rev = hub_revision(cfg, name, is_model_folder(name))
    if name == "tiny":
        tok = tiny_bert_tokenizer(int(cfg["tiny"].get("vocab_size", 1000)))
        conf = VisualBertConfig(**{**cfg["tiny"], "vocab_size": len(tok)}, visual_embedding_dim=visual_dim,
                                pad_token_id=tok.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.get("seed", 0)))
            model = VisualBertModel(conf)
        return model, tok
    local = model_folder(name)
    with hf_loading(name, local, example, f"{name!r}" + (f" at revision {rev}" if rev else ""),
                    "the model") as cache_only:
        conf = VisualBertConfig.from_pretrained(name, local_files_only=cache_only, revision=rev or "main")
        model = VisualBertModel.from_pretrained(name, local_files_only=cache_only, visual_embedding_dim=visual_dim,
                                                ignore_mismatched_sizes=True, revision=rev or "main")
        # The model's own tokenizer (a folder's, or a Hub repo's) wins; else the `tokenizer` option (the public
        # VisualBERT checkpoints ship none: `bert-base-uncased`, the tokenizer they were trained with).
        own = _ships_tokenizer(name, local, cache_only, rev)
    tok_name = name if own else str(cfg.get("tokenizer") or name)
    if not own and not cfg.get("tokenizer"):
        raise MMCacheError(f"{name} holds no tokenizer ({' / '.join(TOKENIZER_FILES)}); save one there or pass "
                           "tokenizer=bert-base-uncased (or its folder) in the preset options")
    if own and not local:
        cfg["tokenizer"] = name  # the spec names the tokenizer the features were computed with
    tok_local = is_model_folder(tok_name)
    tok_example = example.replace("]", f",tokenizer=/models/{tok_name.rstrip('/').rsplit('/', 1)[-1]}]")
    tok_rev = rev if own else None  # the revision pins the model repo (and the tokenizer it ships)
    with hf_loading(tok_name, tok_local, tok_example, f"the tokenizer {tok_name!r}", "the tokenizer") as cache_only:
        tok = AutoTokenizer.from_pretrained(tok_name, local_files_only=cache_only or tok_local,
                                            revision=tok_rev or "main")
    if int(conf.visual_embedding_dim) != visual_dim:
        print(f"note: {name} was trained on {conf.visual_embedding_dim}-d region features, the store holds "
              f"{visual_dim}-d ones: its visual projection starts from a new random init", file=sys.stderr)
    return model, tok


def _ships_tokenizer(name: str, local: bool, cache_only: bool, revision: str | None = None) -> bool:
    """Whether model folder or Hub repo `name` holds a tokenizer (looked up in the Hugging Face cache when the Hub
    cannot be used)."""
    if local:
        return any(os.path.isfile(os.path.join(os.path.expanduser(name), f)) for f in TOKENIZER_FILES)
    from huggingface_hub import file_exists, try_to_load_from_cache

    if cache_only:
        return any(isinstance(try_to_load_from_cache(name, f, revision=revision), str) for f in TOKENIZER_FILES)
    return any(file_exists(name, f, revision=revision) for f in TOKENIZER_FILES)


@register_family("visualbert")
class VisualBertExtractor(Extractor):
    """Text tokens + cached image regions -> `pooled` (VisualBERT's pooler, the [CLS] state as MMF classifies),
    `tokens [T+K,h]` (text then regions) and `mask [T+K]`."""

    modalities = ("text", "context")
    # Arrays this family reads from another modality's feature store at forward time.
    consumes: ClassVar[dict[str, tuple[str, ...]]] = {"image": ("tokens", "boxes", "mask")}
    options = ("model", "revision", "tiny", "seed", "tokenizer", "max_length", "visual_dim", "boxes", "tokens")
    choices = {"boxes": (True, False), "tokens": (True, False)}

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__(preset, config, modality)
        if self.config.get("visual_dim") is None:
            raise MMCacheError(f"preset {preset!r} reads image regions from a feature store: use it in `finetune run` "
                               f"with --image-store NAME (e.g. frcnn), which sets visual_dim from the store")
        self.visual_dim = int(self.config["visual_dim"])
        self.max_length = int(self.config.get("max_length", 128))
        self.use_boxes = bool(self.config.get("boxes", True))
        self.with_tokens = bool(self.config.get("tokens", True))
        self.config.update(hf_weights_spec(str(self.config["model"])))
        folder = f"/models/{str(self.config['model']).rstrip('/').rsplit('/', 1)[-1]}"
        example = f"--{modality} visualbert[model={folder}]"
        self.model, self.tokenizer = _load(self.config, self.visual_dim, example)
        self.model.eval()
        # Box (x1, y1, x2, y2, area) -> region-feature space, added to each region before the visual projection.
        self.box_proj = nn.Linear(5, self.visual_dim) if self.use_boxes else None
        if self.box_proj is not None:
            nn.init.zeros_(self.box_proj.weight)
            nn.init.zeros_(self.box_proj.bias)
        self.requires_grad_(False)

    @staticmethod
    def parse_preset(name: str) -> dict[str, Any] | None:
        """`visualbert:<hf-id-or-dir>` -> a visualbert config (the bert-base-uncased tokenizer for a Hub id)."""
        if not name.startswith("visualbert:"):
            return None
        target = name[len("visualbert:"):]
        if os.path.isdir(os.path.expanduser(target)):
            return {"model": os.path.abspath(os.path.expanduser(target)), "max_length": 128}
        return {"model": target, "tokenizer": "bert-base-uncased", "max_length": 128}

    @property
    def inputs(self) -> tuple[str, ...]:
        """The raw text field this encoder reads (the regions come from a store)."""
        return (self.modality,)

    def preprocess(self, decoded: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Tokenise one text, padded / truncated to `max_length`."""
        return tokenize(self.tokenizer, decoded[self.modality], self.max_length)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Token ids + `batch["consumed"]["image"]` ({tokens [B,K,d], boxes [B,K,5], mask [B,K]}) -> outputs."""
        regions = (batch.get("consumed") or {}).get("image")
        if regions is None:
            raise MMCacheError(f"{self.preset} needs the batch's image regions from a feature store; pass "
                               "--image-store NAME to `finetune run`")
        feats = regions["tokens"].to(self.model.dtype)
        if feats.shape[-1] != self.visual_dim:
            raise MMCacheError(f"{self.preset} was built for {self.visual_dim}-d regions, the store gives "
                               f"{feats.shape[-1]}-d ones")
        if self.box_proj is not None:
            feats = feats + self.box_proj(regions["boxes"].to(feats.dtype))
        vmask = regions["mask"].long()
        mask = batch["attention_mask"]
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, visual_embeds=feats,
                         visual_attention_mask=vmask, visual_token_type_ids=torch.ones_like(vmask))
        res = {"pooled": out.pooler_output}
        if self.with_tokens:
            res.update(tokens=out.last_hidden_state, mask=torch.cat([mask, vmask], dim=1).bool())
        return res
