"""`mmcache cache`: list, inspect, verify and remove feature stores; import features computed elsewhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from filelock import FileLock, Timeout

from mmcache.cache.store import (
    DEFAULT_CACHE,
    StoreReader,
    disk_bytes,
    failures_path,
    find_stores,
    lock_path,
    partial_path,
    verify_store,
)
from mmcache.cliutil import run_app
from mmcache.errors import MMCacheError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def human_bytes(n: float) -> str:
    """1536 -> '1.5K'."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def spec_summary(spec: dict[str, Any], spec_hash: str) -> str:
    """A short description of an extractor spec: preset, model, weights, hash."""
    parts = [str(spec[k]) for k in ("preset", "model", "weights", "pretrained", "source")
             if spec.get(k) not in (None, "")]
    return " ".join(dict.fromkeys(parts)) + f" #{spec_hash[:8]}"


def dims(reader: StoreReader) -> str:
    """'pooled 512, tokens 77x768, mask 77'."""
    return ", ".join(f"{k} {'x'.join(map(str, s)) or '1'}" for k, s in reader.shapes.items()) or "-"


def print_table(rows: list[list[str]], header: list[str]) -> None:
    """Print rows as an aligned table (rich); counts right-aligned."""
    from mmcache.tables import render

    typer.echo(render(header, rows, right=["rows", "failed", "size"]))


@app.command("ls")
def ls(
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="Folder holding cache/<dataset>/<modality>/*.h5.")]
    = DEFAULT_CACHE,
) -> None:
    """List the feature stores under the cache folder: rows, dims, dtype, size on disk, spec."""
    if not cache_dir.exists():
        raise MMCacheError(f"cache folder {cache_dir} does not exist; run `mmcache extract` or pass --cache-dir")
    rows: list[list[str]] = []
    for p in find_stores(cache_dir):
        name = str(p.relative_to(cache_dir)) if p != cache_dir else str(p)
        try:
            r = StoreReader(p)
        except MMCacheError as e:
            rows.append([name, "?", "?", "unreadable: see `mmcache cache verify`", "", human_bytes(disk_bytes(p)),
                         str(e).split(" (", 1)[-1].split(";")[0][:60]])
            continue
        rows.append([name, str(len(r)), str(len(r.failed)), dims(r), str(r.attrs.get("dtype", "")),
                     human_bytes(disk_bytes(p)), spec_summary(r.spec, str(r.attrs.get("spec_hash", "")))])
    if not rows:
        typer.echo(f"no feature stores under {cache_dir}")
        return
    print_table(rows, ["store", "rows", "failed", "arrays", "dtype", "size", "spec"])


@app.command("info")
def info(
    path: Annotated[Path, typer.Argument(help="A store (.h5).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as one JSON object.")] = False,
    show_failed: Annotated[int, typer.Option("--failed", help="How many failed ids to list.")] = 20,
) -> None:
    """Show one store: its spec, versions, times, arrays and failed ids with reasons."""
    r = StoreReader(path)
    arrays = {k: {"shape": [len(r), *r.shapes[k]], "dtype": r.dtypes[k].name} for k in r.keys}
    if as_json:
        typer.echo(json.dumps({"path": str(path), "size_on_disk": disk_bytes(path), **r.attrs, "arrays": arrays},
                              indent=1))
        return
    a = r.attrs
    typer.echo(f"store     {path}  ({human_bytes(disk_bytes(path))} on disk)")
    typer.echo(f"dataset   {a.get('dataset')}")
    typer.echo(f"rows      {len(r)} committed, {len(r.failed)} failed (room for {r.capacity})")
    for k, v in arrays.items():
        typer.echo(f"array     {k:<8} {v['shape']} {v['dtype']}")
    typer.echo(f"spec      {a.get('spec_hash')}  {json.dumps(r.spec, sort_keys=True)}")
    typer.echo(f"created   {a.get('created')}")
    typer.echo(f"updated   {a.get('updated')}")
    typer.echo(f"versions  {', '.join(f'{k} {v}' for k, v in a.get('versions', {}).items())}")
    for i, (sid, why) in enumerate(r.failed.items()):
        if i == show_failed:
            listed = failures_path(path)
            where = f", all of them in {listed}" if listed.exists() else ""
            typer.echo(f"failed    ... {len(r.failed) - show_failed} more (--failed N{where})")
            break
        typer.echo(f"failed    {sid}: {why}")


@app.command("verify")
def verify(
    paths: Annotated[list[Path], typer.Argument(help="Stores (.h5) or folders to search for stores.")],
    manifest: Annotated[Path | None, typer.Option(
        help="Dataset manifest to check ids against (default: cache/<dataset>/manifest.json).")] = None,
    strict: Annotated[bool, typer.Option(help="Count failed ids as problems too.")] = False,
) -> None:
    """Check stores: shapes, NaN/inf, all-zero rows, duplicate ids, ids vs the manifest, failed ids.

    Exits 1 when any store has a problem.
    """
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MMCacheError(f"{', '.join(missing)}: no such file or folder; `mmcache cache ls` lists the stores")
    stores = [s for p in paths for s in (find_stores(p) if p.is_dir() else [p])]
    if not stores:
        raise MMCacheError(f"no feature stores under {', '.join(map(str, paths))}")
    n_bad = 0
    for p in stores:
        rep = verify_store(p, manifest, strict=strict)
        typer.echo(f"{p}: {'ok' if rep.ok else 'FAILED'} ({rep.rows} rows, {rep.failed} failed)")
        for msg in rep.problems:
            typer.echo(f"  problem: {msg}")
        for msg in rep.warnings:
            typer.echo(f"  warning: {msg}")
        n_bad += not rep.ok
    if n_bad:
        typer.echo(f"{n_bad} of {len(stores)} stores failed verification", err=True)
        raise typer.Exit(1)


@app.command("rm")
def rm(
    paths: Annotated[list[Path], typer.Argument(help="Stores (.h5) to delete.")],
) -> None:
    """Delete stores (and their lock and failed-id list files); refuses a store that a writer is using."""
    for p in paths:
        if p.is_dir() or p.suffix != ".h5":
            raise MMCacheError(f"{p} is not a feature store file (*.h5); `cache rm` deletes stores one by one")
        if not p.exists():
            raise MMCacheError(f"{p} does not exist; `mmcache cache ls` lists the stores")
    for p in paths:
        lock = FileLock(lock_path(p), timeout=0, fallback_to_soft=False)
        try:
            with lock:
                size = disk_bytes(p)
                p.unlink()
                partial_path(p).unlink(missing_ok=True)
                failures_path(p).unlink(missing_ok=True)
                partial_path(failures_path(p)).unlink(missing_ok=True)
        except Timeout:
            raise MMCacheError(f"{p} is being written by another process; stop it before removing the store") from None
        lock_path(p).unlink(missing_ok=True)
        typer.echo(f"removed {p} ({human_bytes(size)})")


@app.command("import", no_args_is_help=True)
def import_cmd(
    dataset: Annotated[str, typer.Argument(help="Dataset name: the store goes to cache/<dataset>/.")],
    modality: Annotated[str, typer.Option("--modality", help="image, text, context, video or audio.")],
    name: Annotated[str, typer.Option("--name", help="Store name: cache/<dataset>/<modality>/<name>.h5 "
                                      "(heads train --vtype/--ttype/--atype NAME).")],
    features: Annotated[list[str], typer.Option(
        "--features", help="A .npz / .safetensors file with arrays pooled [N,d], optionally tokens [N,T,d] + mask "
        "[N,T] (and ids); or a .npy (pooled), with tokens=FILE.npy and mask=FILE.npy given again.")],
    ids: Annotated[Path | None, typer.Option(
        "--ids", help="Ids in row order: a text file, one per line, or a .csv with an id column (else the ids "
        "inside the features file: npz array 'ids', safetensors metadata 'ids').")] = None,
    manifest: Annotated[Path | None, typer.Option(
        "--manifest", help="CSV of id,split,label[,label_<task>]: written as the dataset's manifest when it has none.")]
    = None,
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="Cache folder.")] = DEFAULT_CACHE,
    dtype: Annotated[str, typer.Option("--dtype", help="Store dtype: float16 or float32.")] = "float16",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Write a feature store from arrays computed elsewhere (OpenFace, openSMILE, another pipeline).

    Rows with NaN/inf are recorded as failed, never stored; the spec records the source files and their sha256, so
    the same import again resumes and other files under the same store name are refused.
    """
    from mmcache.cache.importer import import_features, summary

    res = import_features(dataset, modality, name, features, ids_file=ids, manifest=manifest, cache_dir=cache_dir,
                          dtype=dtype, progress=not no_progress)
    for line in summary(res):
        typer.echo(line)


def main() -> None:
    """Console-script entry point."""
    run_app(app)
