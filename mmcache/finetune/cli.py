"""`finetune run`: fine-tune the live encoders end to end with a head (optionally LoRA, torchrun/DDP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mmcache.cliutil import config_options, run_app
from mmcache.errors import MMCacheError
from mmcache.finetune.config import FinetuneConfig

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Fine-tune the encoders end to end with the same heads as `heads train`.")


_ENC = "PRESET or NAME=PRESET, with options PRESET\\[key=value,...], as `mmcache extract` takes them."
_STORE = ("the feature store NAME (cache-dir/DATASET/MODALITY/NAME.h5) instead of a live encoder; those raw inputs "
          "are never decoded.")


@app.callback()
def _group() -> None:
    """Fine-tune the encoders end to end with the same heads as `heads train`."""


@app.command("run")
@config_options(FinetuneConfig)
def run(
    ctx: typer.Context,
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
    D: Annotated[int | None, typer.Option("--D", help="Branch width D of the head (default: the head's).")] = None,
    dropout: Annotated[float | None, typer.Option(help="Head dropout (default: the head's).")] = None,
    head_lr: Annotated[float | None, typer.Option(hidden=True, help="Older name of --lr (the head's learning "
                                                                   "rate).")] = None,
    fold: Annotated[int | None, typer.Option(help="Cross-validation fold for datasets without official splits.")] = None,
    label_map: Annotated[Path | None, typer.Option(help="Several datasets: JSON {dataset: {class: target or null}} "
                                                        "onto one label space.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars (notes and the table stay).")]
    = False,
    options: Any = None,
) -> None:
    """Fine-tune encoders + head end to end on raw data; writes a run folder like `heads train`.

    --lr is the head's learning rate, as in `heads train`; --encoder-lr the encoders' (or LoRA adapters').

    Example: finetune run --dataset mvsa --image clip --text clip --lora --epochs 5
    Hybrid (cached image regions, live VisualBERT): finetune run --dataset hateful-memes --text visualbert --image-store frcnn
    A killed run continues from its last checkpoint: rerun the same command with the same --run-name.
    Streamed shards: finetune run --dataset webdataset --data-dir 'shards/train-{000000..000099}.tar' --stream
    --val-data shards/val --steps-per-epoch 1000 --image clip --text clip
    Multi-GPU: torchrun --nproc-per-node 4 -m mmcache.finetune.cli run --dataset mvsa --image clip --text clip
    """
    import sys

    from mmcache.finetune.run import check_config, finetune
    from mmcache.progress import progress_enabled

    given = set(options.given)  # flags the run would not use are refused even when given their default value
    if head_lr is not None:
        if "lr" in given:
            raise MMCacheError("--head-lr is the older name of --lr (the head's learning rate); give --lr only")
        print("note: --head-lr is now --lr (the head's learning rate, as in `heads train`); the encoders' is "
              "--encoder-lr", file=sys.stderr)
        options.values["lr"] = head_lr
        given.add("lr")
    elif "lr" in given and "encoder_lr" not in given and not options.values.get("freeze_encoders"):
        print(f"note: --lr {options.values['lr']:g} sets the head's learning rate (as in `heads train`); the "
              f"encoders' is --encoder-lr (now {options.values['encoder_lr']:g})", file=sys.stderr)
    hparams = options.merged("head_hparams", {})
    for key, value in (("D", D), ("dropout", dropout)):
        if value is not None:
            if key in hparams and hparams[key] != value and "head_hparams" in given:
                raise MMCacheError(f"--{key} {value} and --hp {key}={hparams[key]} disagree; give {key} once")
            hparams[key] = value
    encoders = {m: p for m, p in (("image", image), ("text", text), ("context", context), ("video", video),
                                  ("audio", audio)) if p}
    stores = {m: n for m, n in (("image", image_store), ("text", text_store), ("context", context_store),
                                ("video", video_store), ("audio", audio_store)) if n}
    data_options = {k: v for k, v in (("fold", fold), ("label_map", str(label_map) if label_map else None))
                    if v is not None}
    cfg = options.config(encoders=encoders or options.file.get("encoders", {}),
                         stores=stores or options.file.get("stores", {}), head_hparams=hparams,
                         dataset_options=options.merged("dataset_options", data_options))
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
