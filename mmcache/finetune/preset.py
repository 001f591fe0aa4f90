"""A fine-tuned run's encoder as an extractor preset: `finetuned:runs/<dataset>/<run>`.

`mmcache extract D --image clip=finetuned:runs/<ds>/<run>` writes the features of the encoder that
`finetune run` trained into a store, so heads can be searched on fine-tuned features. The encoder is
rebuilt as the run built it (its preset, then its LoRA adapters) and the run's `encoders.safetensors`
is loaded; the spec names the run, the base encoder's spec and the sha256 of `encoders.safetensors`,
so a run trained again gives a new spec hash and never resumes into the old store.

Importing this module registers the family (`mmcache extract` and `mmcache predict` do).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mmcache.errors import MMCacheError
from mmcache.extract.base import Extractor, register_family
from mmcache.extract.weights import weights_sha256

PREFIX = "finetuned:"
ENCODERS_FILE = "encoders.safetensors"


def run_config(run: Path) -> dict[str, Any]:
    """config.json of a `finetune run` folder; a clear error for anything else."""
    from mmcache.runfolder import check_run

    path = run / "config.json"
    if not path.is_file():
        raise MMCacheError(f"{run} is not a run folder (no config.json); pass runs/<dataset>/<run> of a `finetune run`")
    config = check_run(run)[1]  # the one check of a run folder that is read
    if not isinstance(config.get("encoders"), dict):
        raise MMCacheError(f"{run} is a `heads train` run, not a `finetune run`: its encoders were not trained; use "
                           "the presets of its stores instead")
    return config


def _spec_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if json.dumps(a.get(k), sort_keys=True, default=str)
            != json.dumps(b.get(k), sort_keys=True, default=str)]


def load_finetuned_encoder(run: Path, modality: str, consumer: bool = False) -> tuple[Extractor, dict[str, Any]]:
    """The encoder `finetune run` trained for `modality` in `run`, with its trained weights, frozen in eval mode;
    and the run's config. Refused when the base encoder's spec changed since training (e.g. its weights file) or
    `encoders.safetensors` is not the file the run wrote. An encoder that reads another modality's stored features
    while it encodes (VisualBERT over regions) is rebuilt with the options the run took from its store, and only
    when the caller feeds it those features (`consumer`)."""
    from mmcache.finetune.run import STORE_SET_OPTIONS, FinetuneConfig, apply_lora, build_encoder, encoder_consumes

    config = run_config(run)
    encoders = config["encoders"]
    if modality not in encoders:
        raise MMCacheError(f"{run} fine-tuned {', '.join(encoders)} encoders, not {modality!r}")
    cfg = FinetuneConfig.from_json(config)
    trained = config.get("resolved", {}).get("specs", {}).get(modality)
    if encoder_consumes(modality, encoders[modality]) and not consumer:
        raise MMCacheError(f"{run}: its {modality} encoder {encoders[modality]!r} reads "
                           f"{', '.join(encoder_consumes(modality, encoders[modality]))} features from a store while "
                           "it encodes; it cannot be used as an extractor on its own (`mmcache predict --run` "
                           "predicts with the whole run)")
    fixed = {k: trained[k] for k in STORE_SET_OPTIONS if trained is not None and k in trained and consumer}
    enc = build_encoder(modality, encoders[modality], **fixed)
    if trained is not None and "context_from" in trained:
        enc.config["context_from"] = trained["context_from"]  # which texts the run's context encoder read
    diff = _spec_diff(trained, enc.spec) if trained is not None else []
    if diff:
        raise MMCacheError(f"{run}: the {modality} encoder {encoders[modality]!r} is not the one the run was trained "
                           f"from ({', '.join(diff)} changed, e.g. a weights file replaced); restore it, or fine-tune "
                           "again")
    if cfg.lora and not cfg.freeze_encoders:
        targets = config.get("resolved", {}).get("lora_targets", {}).get(modality)  # recorded since they varied
        apply_lora(enc, replace(cfg, lora_targets=targets) if targets else cfg)
    path = run / ENCODERS_FILE
    want = config.get("resolved", {}).get("encoders_sha256")
    if want and path.is_file() and weights_sha256(path) != want:
        raise MMCacheError(f"{path} is not the file this run wrote (its sha256 differs from the one in config.json); "
                           "restore the run's own encoders.safetensors, or fine-tune again")
    if path.is_file():
        from mmcache.runfolder import load_extra_tensors, safetensors_header

        prefix = f"{modality}."
        unexpected = [k for k in safetensors_header(path) if k.startswith(prefix)
                      and k[len(prefix):] not in enc.state_dict()]
        if unexpected:
            raise MMCacheError(f"{path} holds {modality} weights this encoder lacks (e.g. {unexpected[0]}); "
                               "was the run trained with other encoder options?")
        want = {prefix + k: v for k, v in enc.state_dict().items()}
        state = {k[len(prefix):]: v for k, v in load_extra_tensors(path, want, f"the {modality} encoder").items()}
        enc.load_state_dict(state, strict=False)
    elif not cfg.freeze_encoders:
        raise MMCacheError(f"{path} not found: the run trained its encoders but their weights are missing; copy the "
                           "run folder whole (its encoders.safetensors with it), or fine-tune again")
    enc.requires_grad_(False)
    return enc.eval(), config


@register_family("finetuned")
class FinetunedExtractor(Extractor):
    """The encoder of one modality of a `finetune run` folder, with its trained weights."""

    modalities = ("image", "text", "context", "video", "audio")
    options = ("run",)

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__(preset, config, modality)
        run = Path(os.path.expanduser(str(config.get("run", "")))).absolute()
        self.inner, ft = load_finetuned_encoder(run, modality)
        mode = "frozen" if ft.get("freeze_encoders") else "lora" if ft.get("lora") else "full"
        weights = run / ENCODERS_FILE
        self.preset = f"{PREFIX}{run}"
        self.config = {"run": str(run), "encoder": ft["encoders"][modality], "mode": mode,
                       "base": self.inner.spec,
                       "weights_sha256": weights_sha256(weights) if weights.is_file() else None}
        if mode == "lora":
            self.config["lora"] = {k: ft.get(k) for k in ("lora_r", "lora_alpha", "lora_targets")}

    @staticmethod
    def parse_preset(name: str) -> dict[str, Any] | None:
        """`finetuned:PATH` -> {"run": PATH}."""
        if not name.startswith(PREFIX) or len(name) == len(PREFIX):
            return None
        return {"run": os.path.abspath(os.path.expanduser(name[len(PREFIX):]))}

    @property
    def inputs(self) -> tuple[str, ...]:
        """The raw fields the trained encoder reads."""
        return self.inner.inputs

    @property
    def decode_options(self) -> dict[str, int]:
        """The trained encoder's decode options."""
        return self.inner.decode_options

    def preprocess(self, decoded: dict[str, Any]) -> Any:
        """As the trained encoder (the same preprocessing as in training)."""
        return self.inner.preprocess(decoded)

    def collate(self, items: list[Any]) -> Any:
        """As the trained encoder."""
        return self.inner.collate(items)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The trained encoder's named arrays."""
        return self.inner(batch)
