"""Captions: BLIP captions generated into a crash-safe store, read back as the `context` of later extractions and of
`finetune run`; a tiny random-init BLIP saved with save_pretrained stands in for the public checkpoint."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmcache.cache.store import StoreReader, store_path, verify_store
from mmcache.data import load_dataset
from mmcache.errors import MMCacheError
from mmcache.extract import build_extractor
from mmcache.extract.caption import (
    CAPTIONS,
    build_captioner,
    captions_path,
    context_source,
    decode_captions,
    encode_captions,
    read_captions,
    tiny_blip,
)
from mmcache.extract.caption import TINY_BLIP as TINY

COLOURS = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (128, 128, 128), (10, 10, 10), (250, 250, 250),
           (200, 200, 20), (20, 200, 200)]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init BLIP (model + processor) written with save_pretrained, as a downloaded copy would be."""
    folder = tmp_path_factory.mktemp("blip") / "blip-small"
    model, processor = tiny_blip(TINY, seed=1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_memes(root: Path, corrupt: str | None = "img/00003.png") -> Path:
    """Hateful Memes in its layout: 8 coloured memes over train / dev_seen / test_seen, one image corrupt."""
    splits = {"train": range(0, 5), "dev_seen": range(5, 7), "test_seen": range(7, 8)}
    for split, rows in splits.items():
        lines = []
        for i in rows:
            img = f"img/{i:05d}.png"
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40 + 7 * i, 30 + 5 * i), COLOURS[i]).save(root / img)
            lines.append(json.dumps({"id": i, "img": img, "text": f"meme number {i}", "label": i % 2}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG not really")
    return root


def cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """`mmcache ...` in-process; returns the exit code."""
    from mmcache.cli import main

    monkeypatch.setattr(sys, "argv", ["mmcache", *argv])
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def memes_args(root: Path, cache: Path, *extra: str) -> list[str]:
    return ["extract", "hateful-memes", "--data-dir", str(root), "--cache-dir", str(cache), "--device", "cpu",
            "--num-workers", "0", "--batch-size", "3", "--no-progress", *extra]


def direct_captions(folder: Path, images: list[Path], beams: int = 1, max_new_tokens: int = 30) -> list[str]:
    """What transformers' own BLIP API says for these images (the reference the store must equal)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(folder)
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    with torch.inference_mode():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
        ids = model.generate(pixel_values=pixels, num_beams=beams, max_new_tokens=max_new_tokens, do_sample=False)
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


def test_captions_round_trip_through_the_cache_and_feed_context(blip_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    root, cache = write_memes(tmp_path / "hm"), tmp_path / "cache"
    rc = cli(memes_args(root, cache, "--caption", f"cap=blip:{blip_dir}", "--context", "roberta-tiny"), monkeypatch)
    out = capsys.readouterr().out
    assert rc == 0 and "captions/cap" in out and "context/roberta-tiny" in out
    path = captions_path(cache, "hateful-memes", "cap")
    assert path == cache / "hateful-memes" / "captions" / "cap.h5"
    reader = StoreReader(path)
    # Keyed by id, with the captioner's spec: the local folder pinned by its content hash, greedy decoding.
    assert reader.spec["model"] == str(blip_dir) and len(reader.spec["weights_sha256"]) == 64
    assert reader.spec["beams"] == 1 and reader.spec["max_new_tokens"] == 30 and reader.spec["modality"] == CAPTIONS
    assert list(reader.failed) == ["3"] and "corrupt or not an image" in reader.failed["3"]
    assert verify_store(path).ok, verify_store(path).problems
    captions = read_captions(path)
    ids = ["0", "1", "2", "4", "5", "6", "7"]
    assert sorted(captions) == sorted(ids)
    want = direct_captions(blip_dir, [root / f"img/{int(i):05d}.png" for i in ids])
    assert [captions[i] for i in ids] == want
    assert len(set(want)) > 1, "the tiny model must caption different images differently for this test to mean much"
    # The context store encoded the captions, row by row, and records where its texts came from.
    ctx = StoreReader(store_path(cache, "hateful-memes", "context", "roberta-tiny"))
    assert ctx.spec["context_from"] == {"store": "captions/cap", "preset": f"blip:{blip_dir}",
                                        "spec_hash": reader.attrs["spec_hash"]}
    assert sorted(ctx.ids) == sorted(ids) and "no context text" in ctx.failed["3"]
    enc = build_extractor("roberta-tiny", "context")
    with torch.inference_mode():
        direct = enc(enc.collate([enc.preprocess({"context": captions[i]}) for i in ids]))["pooled"]
    np.testing.assert_allclose(ctx.load(ids, keys=["pooled"])["pooled"].astype(np.float32), direct.numpy(),
                               rtol=2e-3, atol=2e-3)
    # A rerun resumes: nothing left to caption or encode.
    assert cli(memes_args(root, cache, "--caption", f"cap=blip:{blip_dir}", "--context", "roberta-tiny"),
               monkeypatch) == 0
    rerun = capsys.readouterr().out
    assert re.search(r"^\s*captions/cap\s+0\s+8\s+0\s", rerun, re.M), rerun  # written 0, skipped 8, failed 0
    assert StoreReader(path).ids == reader.ids


def test_beam_search_options_and_several_sources(blip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root, cache = write_memes(tmp_path / "hm", corrupt=None), tmp_path / "cache"
    greedy = ["--caption", f"cap=blip:{blip_dir}[max_new_tokens=8]"]
    assert cli(memes_args(root, cache, *greedy, "--split", "train"), monkeypatch) == 0
    beams = ["--caption", f"beam=blip:{blip_dir}[beams=3,max_new_tokens=8]"]
    assert cli(memes_args(root, cache, *beams, "--split", "train"), monkeypatch) == 0
    images = [root / f"img/{i:05d}.png" for i in range(5)]
    got = read_captions(captions_path(cache, "hateful-memes", "beam"))
    assert [got[str(i)] for i in range(5)] == direct_captions(blip_dir, images, beams=3, max_new_tokens=8)
    assert StoreReader(captions_path(cache, "hateful-memes", "beam")).spec["beams"] == 3
    # Other decoding into the same store is another spec: refused, never mixed.
    capsys.readouterr()
    assert cli(memes_args(root, cache, "--caption", f"cap=blip:{blip_dir}[beams=2,max_new_tokens=8]"), monkeypatch) == 2
    assert "built with a different spec" in capsys.readouterr().err
    # Two captions stores: the context must be chosen.
    assert cli(memes_args(root, cache, "--context", "roberta-tiny", "--split", "train"), monkeypatch) == 2
    err = capsys.readouterr().err
    assert "several captions stores (beam, cap)" in err and "--context-from captions/NAME" in err
    assert cli(memes_args(root, cache, "--context", "rob=roberta-tiny", "--context-from", "captions/beam",
                          "--split", "train"), monkeypatch) == 0
    spec = StoreReader(store_path(cache, "hateful-memes", "context", "rob")).spec
    assert spec["context_from"]["store"] == "captions/beam"
    # The same context store over the other captions is another spec too.
    assert cli(memes_args(root, cache, "--context", "rob=roberta-tiny", "--context-from", "captions/cap",
                          "--split", "train"), monkeypatch) == 2
    assert "built with a different spec" in capsys.readouterr().err
    # Captions asked for rows that were never captioned: said before anything runs.
    assert cli(memes_args(root, cache, "--context", "r2=roberta-tiny", "--context-from", "captions/cap"),
               monkeypatch) == 2
    err = capsys.readouterr().err
    assert "has no caption for 3 of the samples" in err and "--split / --limit" in err


def test_a_dataset_without_context_or_captions_says_to_caption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = write_memes(tmp_path / "hm", corrupt=None)
    assert cli(memes_args(root, tmp_path / "cache", "--context", "roberta-tiny"), monkeypatch) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "no context text of its own" in err[0] and "--caption blip" in err[0]
    assert cli(memes_args(root, tmp_path / "cache", "--text", "roberta-tiny", "--context-from", "captions/blip"),
               monkeypatch) == 2
    assert "add --context" in capsys.readouterr().err


def test_context_the_dataset_ships_is_kept_unless_captions_are_asked_for(blip_dir: Path, tmp_path: Path) -> None:
    """A table with its own context column (as Twitter captions or MMHS150K OCR): read as before, same spec; the
    generated captions replace it only with --context-from."""
    from mmcache.data.table import write_table
    from mmcache.extract.runner import Request, extract

    root = tmp_path / "t"
    root.mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (20, 20), COLOURS[i]).save(root / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"{i}.png", "text": f"tweet {i}", "ctx_text": f"ocr words {i}",
                     "label": ["a", "b"][i % 2], "split": "train"})
    write_table(root / "data.csv", rows)
    ds = load_dataset("table", root / "data.csv")
    cache = tmp_path / "cache"
    same, source = context_source(ds, cache)
    assert same is ds and source is None
    extract(ds, [Request("context", "rob", "roberta-tiny")], cache_dir=cache, device="cpu", progress=False)
    spec = StoreReader(store_path(cache, "data", "context", "rob")).spec
    assert "context_from" not in spec and spec == build_extractor("roberta-tiny", "context").spec
    cap = build_captioner(f"blip:{blip_dir}", max_new_tokens=6)
    extract(ds, [Request(CAPTIONS, "blip", f"blip:{blip_dir}")], cache_dir=cache, device="cpu", progress=False,
            extractors=[cap])
    replaced, source = context_source(ds, cache, "captions/blip")
    assert source is not None and source["store"] == "captions/blip"
    captions = read_captions(captions_path(cache, "data", "blip"))
    assert [s.context for s in replaced.samples] == [captions[s.id] for s in ds.samples]
    assert [s.text for s in replaced.samples] == [s.text for s in ds.samples]
    with pytest.raises(MMCacheError, match="captions store .*nope.h5 not found"):
        context_source(ds, cache, "captions/nope")
    with pytest.raises(MMCacheError, match="write captions/NAME"):
        context_source(ds, cache, "captions/a/b")


def test_captions_are_utf8_rows_cut_between_characters() -> None:
    texts = ["a cat on a mat", "", "caf\u00e9 \U0001F600 na\u00efve", "x" * 40, "\u00e9" * 13]
    rows = encode_captions(texts, 23)
    assert rows.shape == (5, 23) and rows.dtype == np.uint8
    back = decode_captions(rows)
    assert back[:3] == texts[:3]
    assert back[3] == "x" * 23
    assert back[4] == "\u00e9" * 11  # 26 bytes: cut before the 12th two-byte character, never inside it


@pytest.mark.parametrize(("preset", "overrides", "message"), [
    ("blip-tiny", {"beams": 0}, "beams must be a whole number >= 1, got 0"),
    ("blip-tiny", {"beam": 3}, "unknown option 'beam'; blip presets take beams, max_new_tokens"),
    ("blip-tiny", {"max_new_tokens": "30"}, "max_new_tokens must be a whole number >= 1"),
    ("blip-tiny", {"min_new_tokens": 20}, "min_new_tokens=20 is above max_new_tokens=12"),
    ("blip-huge", {}, "unknown captioner 'blip-huge'; known: blip, blip-large, blip-tiny"),
])
def test_bad_captioner_options_are_refused_before_loading(preset: str, overrides: dict[str, Any],
                                                          message: str) -> None:
    with pytest.raises(MMCacheError, match=message):
        build_captioner(preset, **overrides)


def test_public_name_without_network_fails_fast_with_a_local_copy_hint(offline: None) -> None:
    with pytest.raises(MMCacheError) as e:
        build_captioner("blip")
    msg = str(e.value)
    assert "'Salesforce/blip-image-captioning-base' is not in the Hugging Face cache" in msg
    assert "--caption blip[model=/models/blip-image-captioning-base]" in msg and "\n" not in msg


def test_tiny_preset_is_deterministic_and_offline() -> None:
    a, b = build_captioner("blip-tiny"), build_captioner("blip-tiny")
    pixels = torch.stack([a.preprocess({"image": Image.new("RGB", (9, 30), c)}) for c in COLOURS[:4]])
    with torch.inference_mode():
        ca, cb = a(pixels)["caption"], b(pixels)["caption"]
    assert ca.dtype == torch.uint8 and ca.shape == (4, 32 * 12) and torch.equal(ca, cb)
    assert a.spec == {"preset": "blip-tiny", "family": "blip", "modality": CAPTIONS, "model": "tiny", "tiny": TINY,
                      "seed": 0, "beams": 1, "max_new_tokens": 12, "min_new_tokens": 0}


def test_finetune_reads_the_captions_as_context(blip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmcache.finetune.run import FinetuneConfig, finetune

    root, cache = write_memes(tmp_path / "hm", corrupt=None), tmp_path / "cache"
    assert cli(memes_args(root, cache, "--caption", f"cap=blip:{blip_dir}[max_new_tokens=6]"), monkeypatch) == 0
    cfg = FinetuneConfig(dataset="hateful-memes", data_dir=str(root), cache_dir=str(cache),
                         encoders={"text": "roberta-tiny", "context": "roberta-tiny"}, runs_dir=str(tmp_path / "runs"),
                         head_hparams={"D": 8}, epochs=1, batch_size=5, num_workers=0, quiet=True, run_name="ft",
                         freeze_encoders=True)
    res = finetune(cfg)
    assert res is not None and res.run_dir is not None
    config = json.loads((res.run_dir / "config.json").read_text())
    resolved = config["resolved"]
    assert resolved["context_from"]["store"] == "captions/cap"
    assert resolved["specs"]["context"]["context_from"] == resolved["context_from"]
    assert res.metrics["val"]["hateful"]["n"] == 2  # both dev rows had a caption, so both were evaluated
    # No captions store: one line saying to make one.
    with pytest.raises(MMCacheError, match="no context text of its own"):
        finetune(FinetuneConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "empty"), "run_name": "x"}))
