"""`finetune run`: fine-tune the live encoders end to end with a head (optionally LoRA, torchrun/DDP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmcache.cliutil import run_app
from mmcache.errors import MMCacheError
from mmcache.runfolder import name_option

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Fine-tune the encoders end to end with the same heads as `heads train`.")


_ENC = "PRESET or NAME=PRESET, with options PRESET\\[key=value,...], as `mmcache extract` takes them."
_STORE = ("the feature store NAME (cache-dir/DATASET/MODALITY/NAME.h5) instead of a live encoder; those raw inputs "
          "are never decoded.")


@app.callback()
def _group() -> None:
    """Fine-tune the encoders end to end with the same heads as `heads train`."""


@app.command("run")
def run(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="Registered dataset name (e.g. demo, mvsa, hateful-memes), or several "
                                              "(mmhs150k,fakeddit) with --label-map.",
                                         callback=name_option("--dataset", "demo"))],
    image: Annotated[str | None, typer.Option("--image", "--vtype", help=f"Image encoder (clip, resnet, ...). {_ENC}")] = None,
    text: Annotated[str | None, typer.Option("--text", "--ttype", help=f"Text encoder (e.g. clip, roberta). {_ENC}")] = None,
    context: Annotated[str | None, typer.Option("--context", "--ctype", help=f"Context-text encoder. {_ENC}")] = None,
    video: Annotated[str | None, typer.Option("--video", "--videotype", help=f"Video encoder (e.g. r3d). {_ENC}")] = None,
    audio: Annotated[str | None, typer.Option("--audio", "--atype", help=f"Audio encoder (e.g. mel). {_ENC}")] = None,
    image_store: Annotated[str | None, typer.Option(help=f"Read the image features from {_STORE}")] = None,
    text_store: Annotated[str | None, typer.Option(help=f"Read the text features from {_STORE}")] = None,
    context_store: Annotated[str | None, typer.Option(help=f"Read the context features from {_STORE}")] = None,
    video_store: Annotated[str | None, typer.Option(help=f"Read the video features from {_STORE}")] = None,
    audio_store: Annotated[str | None, typer.Option(help=f"Read the audio features from {_STORE}")] = None,
    # Text, not a Path: streamed shards may be URLs (https://host/train-{000000..000099}.tar, pipe:...), which a
    # path would mangle ("https:/host").
    data_dir: Annotated[str | None, typer.Option(help="Dataset folder (default data/<dataset>); several datasets: a "
                                                      "folder holding each one's, or NAME=PATH,NAME=PATH; with "
                                                      "--stream, shards: a brace pattern, glob, folder or URL.")] = None,
    context_from: Annotated[str | None, typer.Option(
        help="captions/NAME: the context text --context reads (default: the dataset's own, else its captions).")] = None,
    cache_dir: Annotated[Path, typer.Option(help="Cache folder holding the feature stores (--*-store) and captions "
                                                 "stores.")] = Path("cache"),
    stream: Annotated[bool, typer.Option("--stream", help="Train on WebDataset shards read as a stream, never unpacked: "
                                                          "--data-dir names the training shards ('train-{000000..000099}"
                                                          ".tar', a glob or a folder), --val-data the validation "
                                                          "shards.")] = False,
    val_data: Annotated[str | None, typer.Option(help="With --stream: the folder of validation (and test) shards, "
                                                       "read unpacked by the webdataset adapter.")] = None,
    steps_per_epoch: Annotated[int | None, typer.Option(help="With --stream: optimizer steps per epoch (default: the "
                                                             "samples sizes.json beside the shards counts).")] = None,
    shuffle_buffer: Annotated[int, typer.Option(help="With --stream: samples each DataLoader worker mixes in its "
                                                     "shuffle buffer.")] = 1000,
    head: Annotated[str | None, typer.Option(help="Head: linear, gated, xattn, scabg, transformer (default: linear, "
                                                  "or the --init-head run's).")] = None,
    D: Annotated[int | None, typer.Option("--D", help="Branch width D of the head (default: the head's).")] = None,
    dropout: Annotated[float | None, typer.Option(help="Head dropout (default: the head's).")] = None,
    hp: Annotated[list[str] | None, typer.Option("--hp", help="Extra head hyperparameter KEY=VALUE (repeatable).")] = None,
    loss: Annotated[str, typer.Option(help="Criterion: ce, focal, scabg.")] = "ce",
    loss_opt: Annotated[list[str] | None, typer.Option(help="Criterion option KEY=VALUE (repeatable), as in "
                                                            "`heads train`.")] = None,
    contrastive_weight: Annotated[float, typer.Option(
        help="Add W x CLIP's symmetric InfoNCE between the image and text pooled embeddings of each row (learned "
             "temperature) to the loss; 0 = off.")] = 0.0,
    contrastive_classes: Annotated[str | None, typer.Option(
        help="Comma list of primary-task classes whose rows' pairs the contrastive loss counts (default: all).")]
    = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Batch size per process.")] = 32,
    lr: Annotated[float, typer.Option(help="Encoder (or LoRA adapter) learning rate.")] = 1e-5,
    head_lr: Annotated[float, typer.Option(help="Head learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.01,
    warmup: Annotated[float, typer.Option(help="Share of the steps warming the learning rates up, then cosine.")]
    = 0.1,
    patience: Annotated[int, typer.Option(help="Early stopping: epochs without a better val metric (0 off).")] = 0,
    ema: Annotated[float, typer.Option(help="Decay of an exponential moving average of the trained weights (e.g. "
                                            "0.999), evaluated, selected and saved instead of them (0 = off).")] = 0.0,
    logit_adjust: Annotated[float | None, typer.Option(help="TAU: subtract TAU * log(train class prior) from the "
                                                             "logits at evaluation and prediction (negative TAU adds "
                                                             "it; default 0, -1 for scabg-ref).")] = None,
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters (peft) instead of the full encoders.")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    lora_targets: Annotated[str | None, typer.Option(help="Comma list of module names to adapt "
                                                              "(default per family: clip attn, roberta query,value).")] = None,
    freeze_encoders: Annotated[bool, typer.Option(help="Keep encoders frozen; train the head on live features.")] = False,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this (0 = no clipping).")] = 1.0,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute encoder activations in "
                                                     "the backward pass: less memory, more time.")] = False,
    amp: Annotated[bool, typer.Option(help="bf16 autocast on CUDA.")] = True,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers decoding raw inputs.")] = 2,
    limit: Annotated[int | None, typer.Option(help="Use only the first N rows of each split (smoke runs).")] = None,
    select: Annotated[str | None, typer.Option(help="Validation metric for the best epoch (default: the dataset's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str | None, typer.Option(help="cuda / cpu (default cuda if available).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
    run_name: Annotated[str | None, typer.Option(help="Run folder name (default: generated).",
                                                 callback=name_option("--run-name"))] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Reuse an existing --run-name folder; start over even "
                                                           "when it holds a checkpoint.")] = False,
    save_every: Annotated[int, typer.Option(help="Also checkpoint every N optimizer steps.")] = 0,
    epoch_checkpoint: Annotated[bool, typer.Option(help="Checkpoint at every epoch end; --no-epoch-checkpoint: at the "
                                                        "last epoch's end only (and every --save-every steps).")]
    = True,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last checkpoint of --run-name (or of the newest "
                                                      "run of these options); a named run continues by itself.")]
    = False,
    init_head: Annotated[Path | None, typer.Option(help="Start the head from this `heads train` run folder (same "
                                                        "head, hyperparameters and input shapes).")] = None,
    fold: Annotated[int | None, typer.Option(help="Cross-validation fold for datasets without official splits.")] = None,
    label_map: Annotated[Path | None, typer.Option(help="Several datasets: JSON {dataset: {class: target or null}} "
                                                        "onto one label space.")] = None,
    upsample: Annotated[list[str] | None, typer.Option(help="Several datasets: NAME=K repeats that dataset's training "
                                                            "rows K times per epoch (repeatable).")] = None,
    track: Annotated[str | None, typer.Option(help="Also log to mlflow (MLFLOW_TRACKING_URI) or tensorboard "
                                                    "(<runs-dir>/tensorboard/); needs mmcache[track].")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars (notes and the table stay).")]
    = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes: only the result table and "
                                                              "the run folder.")] = False,
) -> None:
    """Fine-tune encoders + head end to end on raw data; writes a run folder like `heads train`.

    Example: finetune run --dataset mvsa --image clip --text clip --lora --epochs 5
    Hybrid (cached image regions, live VisualBERT): finetune run --dataset hateful-memes --text visualbert --image-store frcnn
    A killed run continues from its last checkpoint: rerun the same command with the same --run-name.
    Streamed shards: finetune run --dataset webdataset --data-dir 'shards/train-{000000..000099}.tar' --stream
    --val-data shards/val --steps-per-epoch 1000 --image clip --text clip
    Multi-GPU: torchrun --nproc-per-node 4 -m mmcache.finetune.cli run --dataset mvsa --image clip --text clip
    """
    from mmcache.cliutil import given_options, parse_kv
    from mmcache.data.combined import parse_upsample
    from mmcache.finetune.run import FinetuneConfig, check_config, finetune
    from mmcache.progress import progress_enabled

    hparams = parse_kv(hp, "--hp")
    for key, value in (("D", D), ("dropout", dropout)):
        if value is not None:
            if key in hparams and hparams[key] != value:
                raise MMCacheError(f"--{key} {value} and --hp {key}={hparams[key]} disagree; give {key} once")
            hparams[key] = value
    given = given_options(ctx)  # flags the run would not use are refused even when given their default value
    if freeze_encoders and (lr != 1e-5 or "lr" in given):  # the encoders' learning rate; the Python API leaves it be
        raise MMCacheError("--lr is the encoders' learning rate, and --freeze-encoders trains none; drop --lr (the "
                           "head's is --head-lr)")
    encoders = {m: p for m, p in (("image", image), ("text", text), ("context", context), ("video", video),
                                  ("audio", audio)) if p}
    stores = {m: n for m, n in (("image", image_store), ("text", text_store), ("context", context_store),
                                ("video", video_store), ("audio", audio_store)) if n}
    cfg = FinetuneConfig(
        dataset=dataset, encoders=encoders, stores=stores, data_dir=str(data_dir) if data_dir else None, runs_dir=str(runs_dir),
        context_from=context_from, cache_dir=str(cache_dir),
        stream=stream, val_data=str(val_data) if val_data else None, steps_per_epoch=steps_per_epoch,
        shuffle_buffer=shuffle_buffer,
        head=head, head_hparams=hparams, loss=loss, loss_options=parse_kv(loss_opt, "--loss-opt"), epochs=epochs,
        batch_size=batch_size, lr=lr, head_lr=head_lr, weight_decay=weight_decay, warmup=warmup,
        early_stopping=patience, overwrite=overwrite, lora=lora, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_targets=lora_targets.split(",") if lora_targets else None,
        freeze_encoders=freeze_encoders, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
        grad_checkpointing=grad_checkpointing, save_every=save_every, epoch_checkpoint=epoch_checkpoint, resume=resume,
        contrastive_weight=contrastive_weight,
        contrastive_classes=contrastive_classes.split(",") if contrastive_classes is not None else None,
        init_head=str(init_head) if init_head else None, amp=amp, num_workers=num_workers, limit=limit,
        select_metric=select, seed=seed, device=device, run_name=run_name, ema=ema, logit_adjust=logit_adjust,
        dataset_options={k: v for k, v in (("fold", fold), ("label_map", str(label_map) if label_map else None))
                         if v is not None},
        upsample=parse_upsample(upsample), track=track, quiet=quiet,
    )
    check_config(cfg, given)  # as finetune does first, and also the unused flags typed at their default value
    with progress_enabled(not no_progress):
        res = finetune(cfg)
    if res is not None:  # rank 0
        from mmcache.engine import results_table

        typer.echo(results_table(res))
        typer.echo(f"run folder: {res.run_dir}")


def main() -> None:
    """Console-script entry point (`finetune run ...`)."""
    run_app(app)


if __name__ == "__main__":
    main()
