"""`mmcache extract DATASET --image clip,resnet --text clip,roberta`: fill the feature stores of a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mmcache.errors import MMCacheError
from mmcache.runfolder import name_option

_STORES = "Comma-separated NAME=PRESET or PRESET (preset options: PRESET\\[key=value,...]); repeatable."


def _default_workers() -> int:
    from mmcache.extract.runner import usable_cores

    return min(8, max(0, usable_cores() - 1))


def extract(
    dataset: Annotated[str, typer.Argument(help="Registered dataset name (see `mmcache data list`).")],
    image: Annotated[list[str] | None, typer.Option(help=f"Image stores. {_STORES}")] = None,
    text: Annotated[list[str] | None, typer.Option(help=f"Text stores. {_STORES}")] = None,
    context: Annotated[list[str] | None, typer.Option(help=f"Context-text stores (caption, OCR). {_STORES}")] = None,
    video: Annotated[list[str] | None, typer.Option(help=f"Video stores. {_STORES}")] = None,
    audio: Annotated[list[str] | None, typer.Option(help=f"Audio stores. {_STORES}")] = None,
    teacher: Annotated[list[str] | None, typer.Option(help=f"Teacher logits. {_STORES}")] = None,
    caption: Annotated[list[str] | None, typer.Option(
        help="Caption each image (blip, blip\\[beams=3,max_new_tokens=30], NAME=blip:/models/blip) into "
             "cache/<dataset>/captions/<name>.h5, run before the other stores.")] = None,
    context_from: Annotated[str | None, typer.Option(
        help="captions/NAME: the context text --context stores read (default: the dataset's own, else its "
             "captions).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Dataset folder or table file.")] = None,
    cache_dir: Annotated[Path, typer.Option(help="Root of the feature stores.")] = Path("cache"),
    device: Annotated[str | None, typer.Option(help="Device (default cuda when available, else cpu).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per batch.")] = 64,
    num_workers: Annotated[int | None, typer.Option(min=0, help="Decoding workers (default: cores-1, max 8).")] = None,
    dtype: Annotated[str, typer.Option(help="Stored float type: float16 or float32.")] = "float16",
    amp: Annotated[bool, typer.Option(help="bf16/fp16 autocast on GPU.")] = True,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad input.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Try ids recorded as failed again (after fixing files).")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N samples.")] = None,
    split: Annotated[str | None, typer.Option(help="Only this split (train/val/test).")] = None,
    fold: Annotated[int | None, typer.Option(help="Cross-validation fold.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Dataset option KEY=VALUE.")] = None,
    name: Annotated[str | None, typer.Option(
        help="Dataset name for cache/<name>/ (default: the dataset; table/webdataset: the file or folder name).",
        callback=name_option("--name", "memes"))] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace a manifest of the same name that lists other ids.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Extract features of DATASET into feature stores cache/<dataset>/<modality>/<name>.h5 (resumable)."""
    from mmcache.data import load_dataset
    from mmcache.data.cli import dataset_options
    from mmcache.extract.runner import Request, dist_info, format_summary, parse_requests, select_samples
    from mmcache.extract.runner import extract as run
    from mmcache.finetune import preset  # noqa: F401  (registers `finetuned:RUN`, a fine-tuned run's encoder)

    if dtype not in ("float16", "float32"):
        raise MMCacheError(f"--dtype must be float16 or float32, not {dtype!r}")
    requests = [r for m, v in (("image", image), ("text", text), ("context", context), ("video", video),
                               ("audio", audio), ("teacher", teacher)) for r in parse_requests(m, v)]
    captioners: list[Request] = []
    if caption:
        from mmcache.extract.caption import parse_captioners

        captioners = parse_captioners(caption)
    if not requests and not captioners:
        raise MMCacheError("name at least one store, e.g. `mmcache extract demo --image clip --text clip`")
    if context_from and not any(r.modality == "context" for r in requests):
        raise MMCacheError("--context-from chooses the text of --context stores: add --context, e.g. --context roberta")
    ds = load_dataset(dataset, data_dir, as_name=name, progress=progress,
                      **dataset_options(fold, None, None, option))
    common: dict[str, Any] = dict(
        cache_dir=cache_dir, device=device, batch_size=batch_size, dtype=dtype, strict=strict, limit=limit,
        num_workers=_default_workers() if num_workers is None else num_workers, retry_failed=retry_failed,
        split=split, amp=amp, progress=progress, force=force)
    summaries = []
    if captioners:
        from mmcache.extract.caption import build_captioner

        # Captions first: the context stores below may read them.
        built = [build_captioner(r.preset, **r.overrides) for r in captioners]
        summaries += run(ds, captioners, extractors=built, **common)
    source = None
    if any(r.modality == "context" for r in requests):
        from mmcache.extract.caption import context_source

        needed = [s.id for s in select_samples(ds, split, limit)]
        ds, source = context_source(ds, cache_dir, context_from, [r.name for r in captioners], needed)
    if requests:
        summaries += run(ds, requests, context_from=source, **common)
    if dist_info()[0] == 0:
        typer.echo(format_summary(summaries))
