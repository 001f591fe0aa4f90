"""The options of end-to-end fine-tuning (`finetune run`): `FinetuneConfig`, the engine's shared options
(`mmcache.engine.config.BaseConfig`, with fine-tuning's defaults) and those of live encoders. `lr` is the head's
learning rate, as in `heads train`; `encoder_lr` the encoders'. Importing it loads no torch."""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import InitVar, dataclass
from typing import Any, ClassVar

from mmcache.engine.config import SET, BaseConfig, option, redefault
from mmcache.errors import MMCacheError


@dataclass(kw_only=True)
class FinetuneConfig(BaseConfig):
    """Everything that determines a fine-tuning run (written to the run folder as config.json): the engine's shared
    options (`BaseConfig`, with fine-tuning's defaults) and those of live encoders."""

    command: ClassVar[str] = "finetune run"

    dataset: str = redefault(BaseConfig, "dataset", help="Registered dataset name (e.g. demo, mvsa, hateful-memes), "
                                                         "or several (mmhs150k,fakeddit) with --label-map.")
    encoders: dict[str, str] = option(cli="none", label="the encoders (--image/--text/...)",
                                      help="modality -> extractor preset, e.g. {image: clip, text: "
                                           "rob=roberta[pooling=cls]}")
    stores: dict[str, str] = option(factory=dict, cli="none", label="the stores (--image-store/...)",
                                    help="modality -> feature store name read from cache_dir")
    # Text, not a Path: streamed shards may be URLs (https://host/train-{000000..000099}.tar, pipe:...).
    data_dir: str | None = option(None, help="Dataset folder (default data/<dataset>); several datasets: a folder "
                                             "holding each one's, or NAME=PATH,NAME=PATH; with --stream, shards: a "
                                             "brace pattern, glob, folder or URL.")
    cache_dir: str = redefault(BaseConfig, "cache_dir", "cache",
                               help="Cache folder holding the feature stores (--*-store) and captions stores.")
    head: str | None = redefault(BaseConfig, "head", None, help="Head: linear, gated, xattn, scabg, transformer "
                                                               "(default: linear, or the --init-head run's).")
    # CLIP's symmetric InfoNCE between two modalities' pooled embeddings of each row (learned temperature), added
    # to the loss with this weight (0 = off); only rows whose primary-task class is in `contrastive_classes` count.
    contrastive_weight: float = option(0.0, help="Add W x CLIP's symmetric InfoNCE between the image and text "
                                                        "pooled embeddings of each row (learned temperature) to the "
                                                        "loss; 0 = off.")
    contrastive_classes: list[str] | None = option(
        None, cli="comma", requires=("contrastive_weight", SET), why="chooses the rows of the contrastive loss, which "
        "is off", add="--contrastive-weight W (e.g. 0.5)",
        help="Comma list of primary-task classes whose rows' pairs the contrastive loss counts (default: all).")
    epochs: int = redefault(BaseConfig, "epochs", 3)
    batch_size: int = redefault(BaseConfig, "batch_size", 32)
    encoder_lr: float = option(1e-5, low=0, help="The encoders' (or LoRA adapters') learning rate (--lr is the "
                                                 "head's).")
    lr: float = redefault(BaseConfig, "lr", 1e-3, low_open=False)
    weight_decay: float = redefault(BaseConfig, "weight_decay", 0.01)
    optimizer: str = redefault(BaseConfig, "optimizer", "adamw")
    warmup: float = redefault(BaseConfig, "warmup", 0.1)
    lora: bool = option(False, help="Train LoRA adapters (peft) instead of the full encoders.")
    lora_r: int = option(8, low=1, integer=True, help="LoRA rank.")
    lora_alpha: int = option(16, low=0, low_open=True, help="LoRA alpha.")
    lora_dropout: float = option(0.05, low=0, high=1, cli="none", help="LoRA dropout.")
    lora_targets: list[str] | None = option(None, cli="comma", help="Comma list of module names to adapt (default "
                                                                    "per family: clip attn, roberta query,value).")
    freeze_encoders: bool = option(False, help="Keep encoders frozen; train the head on live features.")
    grad_accum: int = option(1, low=1, integer=True, help="Gradient accumulation steps.")
    max_grad_norm: float = option(1.0, low=0, help="Clip the gradient norm to this (0 = no clipping).")
    grad_checkpointing: bool = option(False, help="Recompute encoder activations in the backward pass: less memory, "
                                                  "more time.")
    amp: bool = option(True, help="bf16 autocast on CUDA; ignored on CPU.")
    num_workers: int = option(2, low=0, integer=True, help="DataLoader workers decoding raw inputs.")
    limit: int | None = option(None, low=1, integer=True, help="Use only the first N rows of each split (smoke runs).")
    overwrite: bool = redefault(BaseConfig, "overwrite", False, help="Reuse an existing --run-name folder; start over "
                                                                     "even when it holds a checkpoint.")
    save_every: int = option(0, low=0, integer=True, help="Also checkpoint every N optimizer steps.")
    epoch_checkpoint: bool = option(True, help="Checkpoint at every epoch end; --no-epoch-checkpoint: at the last "
                                               "epoch's end only (and every --save-every steps).")
    resume: bool = option(False, per_run=True, excludes=("overwrite",),
                          why="continues a run's last checkpoint and --overwrite starts the run over",
                          help="Continue the last checkpoint of --run-name (or of the newest run of these options); a "
                               "named run continues by itself.")
    init_head: str | None = option(None, help="Start the head from this `heads train` run folder (same head, "
                                              "hyperparameters and input shapes).")
    dataset_options: dict[str, Any] = option(factory=dict, cli="none", label="the dataset options (--fold/...)",
                                             help="the dataset adapter's options (fold, label_map)")
    context_from: str | None = option(None, help="captions/NAME: the context text --context reads (default: the "
                                                 "dataset's own, else its captions).")
    # Training samples streamed from WebDataset shards (`finetune/stream.py`): `data_dir` names the training shards,
    # `val_data` the validation (and test) shards; an epoch is `steps_per_epoch` optimizer steps (None: the samples
    # a sizes.json beside the shards counts).
    stream: bool = option(False, help="Train on WebDataset shards read as a stream, never unpacked: --data-dir names "
                                      "the training shards ('train-{000000..000099}.tar', a glob or a folder), "
                                      "--val-data the validation shards.")
    val_data: str | None = option(None, requires=("stream", True), why="applies to streamed shards",
                                  add="--stream (with --dataset webdataset)",
                                  help="With --stream: the folder of validation (and test) shards, read unpacked by "
                                       "the webdataset adapter.")
    steps_per_epoch: int | None = option(None, low=1, integer=True, requires=("stream", True),
                                         why="applies to streamed shards", add="--stream (with --dataset webdataset)",
                                         help="With --stream: optimizer steps per epoch (default: the samples "
                                              "sizes.json beside the shards counts).")
    shuffle_buffer: int = option(1000, low=1, integer=True, requires=("stream", True), why="applies to streamed shards",
                                 add="--stream (with --dataset webdataset)",
                                 help="With --stream: samples each DataLoader worker mixes in its shuffle buffer.")

    # The older Python spelling: `FinetuneConfig(lr=ENCODERS, head_lr=HEAD)` still means what it meant.
    head_lr: InitVar[float | None] = None

    def __post_init__(self, head_lr: float | None) -> None:
        if head_lr is not None:
            warnings.warn("FinetuneConfig(head_lr=...) is the older spelling: lr is now the head's learning rate and "
                          "encoder_lr the encoders'; read as lr=head_lr, encoder_lr=lr", DeprecationWarning,
                          stacklevel=3)
            self.encoder_lr, self.lr = self.lr, head_lr

    @classmethod
    def upgrade(cls, obj: dict[str, Any]) -> dict[str, Any]:
        """A config written when `lr` was the encoders' learning rate and `head_lr` the head's: `encoder_lr` and
        `lr` now."""
        if "head_lr" in obj:
            obj = dict(obj)
            obj["encoder_lr"] = obj.pop("lr", cls.__dataclass_fields__["encoder_lr"].default)
            obj["lr"] = obj.pop("head_lr")
        return obj

    def check(self, given: Collection[str] = ()) -> None:
        """The rules across several options of fine-tuning (after the per-field checks)."""
        check_finetune(self, given)


def check_finetune(cfg: FinetuneConfig, given: Collection[str] = ()) -> None:
    """Fine-tuning's rules across several options, in one line naming the flag (the engine has checked each field's
    type, bounds and what it requires or excludes). An option counts as set when it differs from its default or
    when its field is in `given` (the flags typed on the command line, even at their default value)."""
    from mmcache.finetune.run import encoder_request

    if not cfg.encoders:
        raise MMCacheError("name at least one encoder, e.g. --image clip --text clip")
    for m, spec in cfg.encoders.items():
        if encoder_request(m, spec).preset.startswith("finetuned:"):
            raise MMCacheError(f"--{m} {spec}: fine-tuning starts from a base encoder preset (clip, roberta, ...); a "
                               "fine-tuned run's encoder (finetuned:RUN) serves `mmcache extract` and `mmcache "
                               "predict`; pass the preset that run started from (its config.json names it)")
    if not (isinstance(cfg.contrastive_weight, (int, float)) and 0 <= cfg.contrastive_weight < float("inf")):
        raise MMCacheError(f"--contrastive-weight must be a number >= 0 (0 = off), got {cfg.contrastive_weight!r}")
    if cfg.freeze_encoders:
        clash = [flag for flag, on in (("--lora", cfg.lora), ("--grad-checkpointing", cfg.grad_checkpointing),
                                       ("--encoder-lr", "encoder_lr" in given)) if on]
        if clash:
            raise MMCacheError(f"{clash[0]} applies to encoders that train, and --freeze-encoders trains none (only "
                               f"the head); drop one")
    if not cfg.lora:  # frozen encoders take no adapters either; there only a typed flag is told about
        unused = ["--" + n.replace("_", "-") for n in ("lora_targets", "lora_r", "lora_alpha")
                  if (n in given if cfg.freeze_encoders else cfg.is_set(n, given))]
        if unused:
            raise MMCacheError(f"{unused[0]} sets the LoRA adapters: add --lora, or drop {unused[0]}")


