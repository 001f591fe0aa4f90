"""Captions generated from the images (BLIP), kept in the cache and read back as the `context` text.

`mmcache extract DATASET --caption blip` runs transformers' `BlipForConditionalGeneration` over every
image, in batches, through the same runner as the feature extractors, and keeps the captions in a
store `cache/<dataset>/captions/<name>.h5`: a feature store whose one array, `caption`, holds each
caption as UTF-8 bytes padded with zeros to a fixed width (32 bytes per generated token). So the
captions are keyed by sample id, carry the captioner's spec (model, weights hash, decoding), resume
after a kill, and record unreadable images as failed, exactly as features do.

Datasets without a context text of their own (Hateful Memes) then read the captions as their
`context` field (`context_source`): for later `--context` extractions and for `finetune run`. A
context store built from captions records which captions store (and spec) it read, so texts of
two sources never share a store. Context the dataset ships (Twitter captions, MMHS150K OCR) is
used as before unless `--context-from captions/NAME` asks for the generated captions instead.

Presets: `blip` (Salesforce/blip-image-captioning-base), `blip-large`, `blip-tiny` (random init with a
fixed seed, offline); `blip:<hf-id-or-folder>` or a local `save_pretrained` folder. Options:
`beams` (1 = greedy), `max_new_tokens` (30), `min_new_tokens` (0), `model`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcache.cache.store import StoreReader, store_path
from mmcache.data.base import Dataset
from mmcache.errors import MMCacheError
from mmcache.extract.base import DecodeError, Extractor, check_options
from mmcache.extract.roberta import hf_weights_spec
from mmcache.extract.runner import Request, parse_requests
from mmcache.extract.weights import hf_loading, hub_revision, is_model_folder

CAPTIONS = "captions"  # the store folder: cache/<dataset>/captions/<name>.h5
KEY = "caption"  # the store's one array: UTF-8 bytes, zero padded
BYTES_PER_TOKEN = 32  # a BERT word piece decodes to at most ~20 bytes (plus its space)

# Small shapes for tests and smoke runs: image-dependent captions from a random init (initializer_range 0.2).
TINY_BLIP: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "image_size": 32,
                             "patch_size": 8, "initializer_range": 0.2}

# Preset name -> config, as the extractor presets: data, not code.
CAPTIONERS: dict[str, dict[str, Any]] = {
    "blip": {"model": "Salesforce/blip-image-captioning-base", "beams": 1, "max_new_tokens": 30},
    "blip-large": {"model": "Salesforce/blip-image-captioning-large", "beams": 1, "max_new_tokens": 30},
    "blip-tiny": {"model": "tiny", "tiny": TINY_BLIP, "seed": 0, "beams": 1, "max_new_tokens": 12},
}


def resolve_captioner(name: str) -> tuple[str, dict[str, Any]]:
    """Captioner preset -> (name, config): a preset, `blip:<hf-id-or-folder>`, or a local model folder."""
    if name in CAPTIONERS:
        return name, dict(CAPTIONERS[name])
    if name.startswith("blip:"):
        target = name[len("blip:"):]
        if os.path.isdir(os.path.expanduser(target)):
            target = os.path.abspath(os.path.expanduser(target))
        return name, {"model": target, "beams": 1, "max_new_tokens": 30}
    if os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
        return name, {"model": os.path.abspath(os.path.expanduser(name)), "beams": 1, "max_new_tokens": 30}
    raise MMCacheError(f"unknown captioner {name!r}; known: {', '.join(sorted(CAPTIONERS))}, blip:<hf-id-or-folder> "
                       "or a local BLIP folder (save_pretrained)")


def parse_captioners(values: Sequence[str] | str | None) -> list[Request]:
    """`--caption blip`, `--caption cap=blip[beams=3,max_new_tokens=30]` -> requests for captions stores."""
    return parse_requests(CAPTIONS, values, flag="--caption")


def build_captioner(preset: str, **overrides: Any) -> BlipCaptioner:
    """The captioner of `preset` (config entries replaced by `overrides`, checked like extractor options)."""
    name, cfg = resolve_captioner(preset)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    check_options(name, BlipCaptioner, cfg)
    return BlipCaptioner(name, cfg, CAPTIONS)


@functools.lru_cache(maxsize=2)
def tiny_tokenizer() -> Any:
    """A BERT word-piece tokenizer over a small fixed English vocabulary (BLIP's tokenizer family), with `[DEC]`
    as the decoder's start token as in the public checkpoints."""
    from transformers import BertTokenizer

    from mmcache.data import demo

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    words = ["a", "an", "the", "of", "on", "in", "with", "and", "is", "at", "man", "woman", "people", "dog", "cat",
             "red", "green", "blue", "black", "white", "grey", "text", "meme", "photo", "image", "sitting", "standing"]
    words += [w for phrase in [*demo.SUBJECTS, *demo.NOUNS, *(w for ws in demo.WORDS.values() for w in ws)]
              for w in phrase.split()]
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*specials, *words]))}
    return BertTokenizer(vocab=vocab, bos_token="[DEC]", do_lower_case=True)


def tiny_blip(tiny: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """(model, processor) of a small random-init BLIP captioner, the same for the same `tiny` and `seed`."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = tiny_tokenizer()
    h, r = int(tiny["hidden_size"]), float(tiny["initializer_range"])
    layers = dict(hidden_size=h, intermediate_size=int(tiny["intermediate_size"]),
                  num_hidden_layers=int(tiny["layers"]), num_attention_heads=int(tiny["heads"]), initializer_range=r)
    conf = BlipConfig(
        vision_config={**layers, "image_size": int(tiny["image_size"]), "patch_size": int(tiny["patch_size"])},
        text_config={**layers, "vocab_size": len(tok), "encoder_hidden_size": h, "max_position_embeddings": 128,
                     "bos_token_id": tok.bos_token_id, "sep_token_id": tok.sep_token_id,
                     "eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id},
        projection_dim=h, initializer_range=r)
    size = int(tiny["image_size"])
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}), tokenizer=tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(conf)
    return model.eval(), processor


def load_blip(cfg: dict[str, Any], example: str) -> tuple[Any, Any]:
    """(model, processor) of a Hub id or `save_pretrained` folder; without network, the Hugging Face cache only."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    name = str(cfg["model"])
    rev = hub_revision(cfg, name, is_model_folder(name))
    if name == "tiny":
        return tiny_blip(cfg["tiny"], int(cfg.get("seed", 0)))
    with hf_loading(name, is_model_folder(name), example, f"BLIP {name!r}" + (f" at revision {rev}" if rev else ""),
                    "the model and its processor") as cache_only:
        processor = BlipProcessor.from_pretrained(name, local_files_only=cache_only, revision=rev or "main")
        model = BlipForConditionalGeneration.from_pretrained(name, local_files_only=cache_only, revision=rev or "main")
    return model.eval(), processor


def _positive(preset: str, cfg: dict[str, Any], key: str, low: int) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise MMCacheError(f"captioner {preset!r}: {key} must be a whole number >= {low}, got {value!r}")
    return value


class BlipCaptioner(Extractor):
    """BLIP image captioning as an extractor of the `captions` store: image in, `caption` bytes out.

    Not a feature family (it writes text, not features): built by `build_captioner`, run by the same
    runner, so batching, decoding workers, failure records, resuming and torchrun work as for features.
    """

    family = "blip"
    modalities = (CAPTIONS,)
    options = ("model", "revision", "tiny", "seed", "beams", "max_new_tokens", "min_new_tokens")

    def __init__(self, preset: str, config: dict[str, Any], modality: str = CAPTIONS) -> None:
        super().__init__(preset, config, modality)
        self.beams = _positive(preset, self.config, "beams", 1)
        self.max_new_tokens = _positive(preset, self.config, "max_new_tokens", 1)
        self.config.setdefault("min_new_tokens", 0)
        self.min_new_tokens = _positive(preset, self.config, "min_new_tokens", 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise MMCacheError(f"captioner {preset!r}: min_new_tokens={self.min_new_tokens} is above "
                               f"max_new_tokens={self.max_new_tokens}")
        self.width = BYTES_PER_TOKEN * self.max_new_tokens
        self.config.update(hf_weights_spec(str(self.config["model"])))
        folder = f"/models/{str(self.config['model']).rstrip('/').rsplit('/', 1)[-1]}"
        example = f"--caption {preset}[model={folder}]" if preset in CAPTIONERS else f"--caption NAME=blip:{folder}"
        self.model, self.processor = load_blip(self.config, example)
        self.requires_grad_(False)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Captions are generated from the image."""
        return ("image",)

    def preprocess(self, decoded: dict[str, Any]) -> torch.Tensor:
        """BLIP's own image preprocessing (resize, rescale, normalise) of one decoded image: [3, H, W]."""
        try:
            return self.processor.image_processor(images=decoded["image"], return_tensors="pt")["pixel_values"][0]
        except (ValueError, TypeError, OSError) as e:
            raise DecodeError(f"BLIP's image processor refused the image ({type(e).__name__}: {e})") from None

    def generate(self, pixel_values: torch.Tensor) -> list[str]:
        """Captions of a batch of preprocessed images (greedy with beams=1, else beam search)."""
        param = next(self.model.parameters())
        ids = self.model.generate(pixel_values=pixel_values.to(param.device, param.dtype), num_beams=self.beams,
                                  max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                                  do_sample=False)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The batch's captions as the store keeps them: `caption` [B, width] uint8."""
        return {KEY: torch.from_numpy(encode_captions(self.generate(pixel_values), self.width))}


def encode_captions(texts: Sequence[str], width: int) -> np.ndarray:
    """Texts as UTF-8 rows of `width` bytes, zero padded; a longer text is cut between characters."""
    out = np.zeros((len(texts), width), dtype=np.uint8)
    for i, t in enumerate(texts):
        raw = t.replace("\0", "").encode("utf-8")
        if len(raw) > width:
            raw = raw[:width].decode("utf-8", "ignore").encode("utf-8")
        out[i, :len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out


def decode_captions(rows: np.ndarray) -> list[str]:
    """The texts of `caption` rows (inverse of `encode_captions`)."""
    return [bytes(r).rstrip(b"\0").decode("utf-8", "replace") for r in np.asarray(rows, dtype=np.uint8)]


def captions_path(cache_dir: Path | str, dataset: str, name: str) -> Path:
    """`cache/<dataset>/captions/<name>.h5`."""
    return store_path(cache_dir, dataset, CAPTIONS, name)


def read_captions(path: Path | str) -> dict[str, str]:
    """Id -> caption of every captioned sample of a captions store (failed ids are left out)."""
    reader = StoreReader(path)
    if KEY not in reader.shapes:
        if not reader.ids:
            return {}
        raise MMCacheError(f"{path} is not a captions store (it has {reader.keys}); captions stores are written by "
                           "`mmcache extract DATASET --caption blip`")
    return dict(zip(reader.ids, decode_captions(reader.load(keys=[KEY])[KEY]), strict=True))


def _store_name(context_from: str) -> str:
    name = context_from.strip().removeprefix(f"{CAPTIONS}/").removesuffix(".h5")
    if not name or "/" in name or name.startswith("."):
        raise MMCacheError(f"--context-from {context_from!r}: write captions/NAME, the captions store "
                           "cache/<dataset>/captions/NAME.h5 (e.g. captions/blip)")
    return name


def context_source(ds: Dataset, cache_dir: Path | str, context_from: str | None = None,
                   captioned: Sequence[str] = (), needed: Iterable[str] | None = None) -> tuple[Dataset, dict[str, Any] | None]:
    """The dataset whose `context` texts context encoders read, and where those came from (None: the dataset).

    With `context_from` (`captions/NAME`) the captions of that store replace the dataset's context. Otherwise a
    dataset with context texts of its own keeps them; one without reads its captions store: the one just written
    (`captioned`), else the only one in the cache. Ids in `needed` (default: all) must be captioned or recorded
    as failed (a failed id has no context, so context stores record it as failed too).
    """
    folder = Path(cache_dir) / ds.name / CAPTIONS
    if context_from is not None:
        name = _store_name(context_from)
    elif any(s.context is not None for s in ds.samples):
        return ds, None
    else:
        names = list(dict.fromkeys(captioned)) or sorted(p.stem for p in folder.glob("*.h5"))
        if not names:
            raise MMCacheError(f"{ds.name!r} has no context text of its own and {folder} holds no captions: generate "
                               f"them with --caption blip (in this command or an earlier one), or drop --context")
        if len(names) > 1:
            raise MMCacheError(f"{ds.name!r} has several captions stores ({', '.join(names)}): choose the context "
                               "with --context-from captions/NAME")
        name = names[0]
    path = captions_path(cache_dir, ds.name, name)
    if not path.exists():
        raise MMCacheError(f"captions store {path} not found: generate it with `mmcache extract {ds.name} "
                           f"--caption {name}=blip` (or another captioner), or pick another with --context-from")
    reader = StoreReader(path)
    captions = read_captions(path)
    todo = [i for i in (ds.ids() if needed is None else needed) if i not in captions and i not in reader.failed]
    if todo:
        raise MMCacheError(f"{path} has no caption for {len(todo)} of the samples asked for (e.g. {todo[:3]}): caption "
                           f"them first with --caption {name}={reader.spec.get('preset', 'blip')} and the same "
                           "--split / --limit")
    source = {"store": f"{CAPTIONS}/{name}", "preset": reader.spec.get("preset"), "spec_hash": reader.attrs["spec_hash"]}
    return replace(ds, samples=[replace(s, context=captions.get(s.id)) for s in ds.samples]), source


__all__ = ["CAPTIONERS", "CAPTIONS", "BlipCaptioner", "build_captioner", "captions_path", "context_source",
           "decode_captions", "encode_captions", "parse_captioners", "read_captions", "resolve_captioner"]
