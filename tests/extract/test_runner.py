"""The extraction runner: stores written, decode once, resume, failures recorded, CLI."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmcache.cache.store import FeatureStore, StoreReader, failures_path, manifest_path, store_path, verify_store
from mmcache.errors import MMCacheError
from mmcache.extract import DECODERS, build_extractor
from mmcache.extract.runner import Request, extract, failure_kind, format_summary, merge_parts, parse_requests

from .conftest import N_DEMO


def test_parse_requests() -> None:
    assert parse_requests("image", "clip") == [Request("image", "clip", "clip")]
    assert parse_requests("image", ["clip=clip-tiny,res=resnet", "x=clip-tiny[tokens=false,seed=2]"]) == [
        Request("image", "clip", "clip-tiny"),
        Request("image", "res", "resnet"),
        Request("image", "x", "clip-tiny", {"tokens": False, "seed": 2}),
    ]
    # A path or tag after a colon may hold '=' and is never read as NAME=.
    assert parse_requests("text", "c=ViT-B-32:/w/a=b.bin") == [Request("text", "c", "ViT-B-32:/w/a=b.bin")]
    assert parse_requests("text", "ViT-B-32:laion2b_s34b_b79k")[0].name == "ViT-B-32:laion2b_s34b_b79k"
    assert parse_requests("image", None) == []
    with pytest.raises(MMCacheError, match=r"^--image clip\[\.\.\.\]: 'tokens' is not KEY=VALUE"):
        parse_requests("image", "clip[tokens]")
    with pytest.raises(MMCacheError, match=r"^--image clip\[\.\.\.\]: 'seed' is given twice"):
        parse_requests("image", "clip[seed=1, seed=2]")
    assert parse_requests("image", "clip[ seed = 1 , tag=a=b ]")[0].overrides == {"seed": 1, "tag": "a=b"}
    with pytest.raises(MMCacheError, match="modality"):
        parse_requests("pixels", "clip")


def _tiny(ds: Any, cache: Path, **kw: Any) -> list:
    reqs = [Request("image", "clip", "clip-tiny"), Request("text", "clip", "clip-tiny")]
    return extract(ds, reqs, cache_dir=cache, progress=False, batch_size=16, **kw)


def test_extract_writes_stores_matching_direct_forward(demo_ds: Any, tmp_path: Path) -> None:
    sums = _tiny(demo_ds, tmp_path, dtype="float32")
    assert [(s.written, s.skipped, len(s.failed)) for s in sums] == [(N_DEMO, 0, 0), (N_DEMO, 0, 0)]
    img = StoreReader(store_path(tmp_path, "demo", "image", "clip"))
    txt = StoreReader(store_path(tmp_path, "demo", "text", "clip"))
    assert sorted(img.ids) == sorted(demo_ds.ids()) and sorted(txt.ids) == sorted(demo_ds.ids())
    assert img.shapes == {"pooled": (128,), "tokens": (16, 128), "mask": (16,)}
    assert txt.shapes["tokens"] == (32, 128) and txt.dtypes["mask"] == np.bool_
    assert img.spec["preset"] == "clip-tiny" and img.spec["modality"] == "image"

    # Rows equal open_clip's own encode_* on the same inputs, whatever the batch a row landed in.
    ids = [s.id for s in demo_ds.samples[5:9]]
    by_id = demo_ds.by_id()
    ref_img = build_extractor("clip-tiny", "image")
    ref_txt = build_extractor("clip-tiny", "text")
    from PIL import Image

    x = torch.stack([ref_img.transform(Image.open(by_id[i].image).convert("RGB")) for i in ids])
    t = torch.stack([ref_txt.tokenizer([by_id[i].text])[0] for i in ids])
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = open_clip.model.CLIP(**ref_img.config["model_cfg"]).eval()
    with torch.no_grad():
        want_img = full.encode_image(x).numpy()
        want_txt = full.encode_text(t).numpy()
    got = img.load(ids)
    np.testing.assert_allclose(got["pooled"], want_img, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(txt.load(ids)["pooled"], want_txt, rtol=1e-4, atol=1e-5)
    assert got["mask"].all()
    # Text mask = real BPE tokens (start, words, end); padding is False.
    n_tok = (t != 0).sum(1).numpy()
    np.testing.assert_array_equal(txt.load(ids)["mask"].sum(1), n_tok)
    assert (n_tok < 32).all()

    man = json.loads(manifest_path(tmp_path, "demo").read_text())
    assert len(man["samples"]) == N_DEMO and man["labels"]["tasks"]["label"] == ["negative", "neutral", "positive"]


def test_resume_and_only_missing_extractors_run(demo_ds: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[str] = Counter()
    for field in ("image", "text"):
        orig = DECODERS[field]

        def counting(value: Any, options: dict, _orig: Any = orig, _f: str = field) -> Any:
            calls[_f] += 1
            return _orig(value, options)

        monkeypatch.setitem(DECODERS, field, counting)
    first = extract(demo_ds, [Request("image", "clip", "clip-tiny")], cache_dir=tmp_path, limit=10, progress=False)
    assert first[0].written == 10 and calls == {"image": 10}
    calls.clear()
    sums = _tiny(demo_ds, tmp_path)
    # Images already stored are neither decoded nor encoded again; the new text store gets every row.
    assert (sums[0].written, sums[0].skipped) == (N_DEMO - 10, 10)
    assert (sums[1].written, sums[1].skipped) == (N_DEMO, 0)
    assert calls == {"image": N_DEMO - 10, "text": N_DEMO}
    calls.clear()
    again = _tiny(demo_ds, tmp_path)
    assert [(s.written, s.skipped) for s in again] == [(0, N_DEMO), (0, N_DEMO)] and not calls
    assert len(StoreReader(store_path(tmp_path, "demo", "image", "clip")).ids) == N_DEMO


def test_decode_once_for_all_extractors(demo_ds: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[str] = Counter()
    orig = DECODERS["image"]

    def counting(value: Any, options: dict) -> Any:
        calls[str(value)] += 1
        return orig(value, options)

    monkeypatch.setitem(DECODERS, "image", counting)
    reqs = parse_requests("image", "a=clip-tiny,b=clip-tiny[tokens=false],c=clip-tiny[seed=1],r=resnet-tiny")
    sums = extract(demo_ds, reqs, cache_dir=tmp_path, progress=False, batch_size=8)
    assert [s.written for s in sums] == [N_DEMO] * 4
    assert len(calls) == N_DEMO and set(calls.values()) == {1}  # one decode per image for four encoders
    a = StoreReader(store_path(tmp_path, "demo", "image", "a")).load(demo_ds.ids())
    b = StoreReader(store_path(tmp_path, "demo", "image", "b")).load(demo_ds.ids())
    c = StoreReader(store_path(tmp_path, "demo", "image", "c")).load(demo_ds.ids())
    assert set(b) == {"pooled"}
    np.testing.assert_array_equal(a["pooled"], b["pooled"])
    assert not np.allclose(a["pooled"], c["pooled"])  # another seed is another model


def test_broken_images_are_recorded_not_written(broken_root: Path, tmp_path: Path) -> None:
    from mmcache.data import load_dataset

    ds = load_dataset("demo", broken_root)
    sums = _tiny(ds, tmp_path / "cache", num_workers=1)
    img, txt = sums
    assert img.written == N_DEMO - 3 and txt.written == N_DEMO and not txt.failed
    assert set(img.failed) == {"demo00001", "demo00002", "demo00003"}
    assert "corrupt" in img.failed["demo00001"]
    assert "empty" in img.failed["demo00002"]
    assert "not found" in img.failed["demo00003"]
    reader = StoreReader(store_path(tmp_path / "cache", "demo", "image", "clip"))
    assert set(reader.failed) == set(img.failed) and not set(reader.failed) & set(reader.ids)
    assert not (np.abs(reader.load()["pooled"].astype(np.float32)).sum(1) == 0).any()  # no zero rows
    text = format_summary(sums)
    assert "image/clip" in text and "corrupt" in text and "demo00001" in text
    # Failed rows count as done: a rerun neither retries nor duplicates them.
    again = _tiny(ds, tmp_path / "cache")
    assert again[0].written == 0 and again[0].skipped == N_DEMO
    # Once the file is fixed, --retry-failed extracts it; the others fail again with their reasons.
    shutil.copy(broken_root / "images" / "demo00004.jpg", broken_root / "images" / "demo00001.jpg")
    fixed = _tiny(ds, tmp_path / "cache", retry_failed=True)
    assert fixed[0].written == 1 and set(fixed[0].failed) == {"demo00002", "demo00003"}
    reader = StoreReader(store_path(tmp_path / "cache", "demo", "image", "clip"))
    assert len(reader.ids) == N_DEMO - 2 and set(reader.failed) == {"demo00002", "demo00003"}


def test_strict_stops_at_first_bad_input(broken_root: Path, tmp_path: Path) -> None:
    from mmcache.data import load_dataset

    ds = load_dataset("demo", broken_root)
    with pytest.raises(MMCacheError, match="demo00001.*--strict"):
        extract(ds, [Request("image", "clip", "clip-tiny")], cache_dir=tmp_path, strict=True, progress=False)


def test_split_limit_and_duplicate_store_errors(demo_ds: Any, tmp_path: Path) -> None:
    sums = extract(demo_ds, [Request("text", "clip", "clip-tiny")], cache_dir=tmp_path, split="test", progress=False)
    assert sums[0].written == len(demo_ds.split("test")) > 0
    man = json.loads(manifest_path(tmp_path, "demo").read_text())
    assert {r["split"] for r in man["samples"]} == {"test"}
    with pytest.raises(MMCacheError, match="no split"):
        extract(demo_ds, [Request("text", "clip", "clip-tiny")], cache_dir=tmp_path, split="nope", progress=False)
    with pytest.raises(MMCacheError, match="twice"):
        extract(demo_ds, parse_requests("text", "clip-tiny,clip-tiny"), cache_dir=tmp_path, progress=False)


def test_cli_demo_path(demo_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmcache.cli import app

    args = ["extract", "demo", "--data-dir", str(demo_root), "--cache-dir", str(tmp_path), "--image", "clip=clip-tiny",
            "--text", "clip=clip-tiny", "--num-workers", "0", "--batch-size", "16", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "image/clip" in res.output and f"{N_DEMO:>9}" in res.output
    for m in ("image", "text"):
        assert {"pooled", "tokens", "mask"} <= set(StoreReader(store_path(tmp_path, "demo", m, "clip")).keys)
    bad = CliRunner().invoke(app, ["extract", "demo", "--data-dir", str(demo_root), "--cache-dir", str(tmp_path),
                                   "--image", "nosuchpreset"])
    assert isinstance(bad.exception, MMCacheError) and "unknown extractor preset" in str(bad.exception)


def test_field_the_dataset_lacks_is_refused_before_loading(demo_ds: Any, tmp_path: Path) -> None:
    # The demo has no context texts: a context store would be nothing but failed rows.
    with pytest.raises(MMCacheError, match="no selected sample of 'demo' has a context field"):
        extract(demo_ds, parse_requests("context", "clip-tiny"), cache_dir=tmp_path, progress=False)
    assert not store_path(tmp_path, "demo", "context", "clip-tiny").exists()
    with pytest.raises(MMCacheError, match="no selected sample of 'demo' has an audio field"):
        extract(demo_ds, parse_requests("audio", "mel-tiny"), cache_dir=tmp_path, progress=False)


def _read_failures(path: Path) -> dict[str, tuple[str, str]]:
    import csv

    with open(failures_path(path), newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "kind", "reason"]
    return {r[0]: (r[1], r[2]) for r in rows[1:]}


def test_retry_failed_strict_keeps_every_record(broken_root: Path, tmp_path: Path) -> None:
    from mmcache.data import load_dataset

    ds = load_dataset("demo", broken_root)
    req = [Request("image", "clip", "clip-tiny")]
    extract(ds, req, cache_dir=tmp_path, progress=False, batch_size=16)
    path = store_path(tmp_path, "demo", "image", "clip")
    before = StoreReader(path).failed
    assert set(before) == {"demo00001", "demo00002", "demo00003"} and verify_store(path).ok
    # Nothing fixed: a strict retry stops at the first one, and every record stays.
    with pytest.raises(MMCacheError, match="demo00001.*--strict"):
        extract(ds, req, cache_dir=tmp_path, strict=True, retry_failed=True, progress=False, batch_size=16)
    r = StoreReader(path)
    assert r.failed == before and len(r.ids) == N_DEMO - 3
    assert {k: v[1] for k, v in _read_failures(path).items()} == before
    rep = verify_store(path)
    assert rep.ok, rep.problems
    # One file fixed, one broken another way: the retry writes the first and updates the second's reason.
    shutil.copy(broken_root / "images" / "demo00004.jpg", broken_root / "images" / "demo00001.jpg")
    (broken_root / "images" / "demo00002.jpg").write_bytes(b"GIF89a broken")
    with pytest.raises(MMCacheError, match="demo00002.*--strict"):
        extract(ds, req, cache_dir=tmp_path, strict=True, retry_failed=True, progress=False, batch_size=1)
    r = StoreReader(path)
    assert "demo00001" in r.ids and set(r.failed) == {"demo00002", "demo00003"} and verify_store(path).ok
    assert r.failed["demo00002"] == before["demo00002"]  # --strict records nothing new
    assert set(_read_failures(path)) == {"demo00002", "demo00003"}  # the list follows the store, even on a stop
    sums = extract(ds, req, cache_dir=tmp_path, retry_failed=True, progress=False, batch_size=16)
    assert sums[0].written == 0 and set(sums[0].failed) == {"demo00002", "demo00003"}
    r = StoreReader(path)
    assert "corrupt" in r.failed["demo00002"] and r.failed["demo00003"] == before["demo00003"]
    assert len(r.ids) == len(set(r.ids)) == N_DEMO - 2 and verify_store(path).ok


@pytest.fixture
def many_broken(broken_root: Path) -> Path:
    """broken_root plus four more corrupt images: five of one kind, each with its own path in the reason."""
    corrupt = (broken_root / "images" / "demo00001.jpg").read_bytes()
    for i in (11, 12, 13, 14):
        (broken_root / "images" / f"demo{i:05d}.jpg").write_bytes(corrupt)
    return broken_root


def test_summary_groups_failures_by_kind_and_lists_every_id(many_broken: Path, tmp_path: Path) -> None:
    from mmcache.data import load_dataset

    ds = load_dataset("demo", many_broken)
    sums = extract(ds, [Request("image", "clip", "clip-tiny")], cache_dir=tmp_path, progress=False, batch_size=16)
    s = sums[0]
    corrupt = ["demo00001", "demo00011", "demo00012", "demo00013", "demo00014"]
    assert len({s.failed[i] for i in corrupt}) == 5  # every reason names its own file ...
    assert len({s.kinds[i] for i in corrupt}) == 1  # ... but they are one kind
    text = format_summary(sums)
    kind_line = next(ln for ln in text.splitlines() if ln.strip().startswith("5 x "))
    assert "image file <image> is corrupt" in kind_line and str(many_broken) not in kind_line
    assert all(repr(i) in kind_line for i in corrupt)
    assert "1 x image file <image> is empty (N bytes)" in text and "1 x image file <image> not found" in text
    path = store_path(tmp_path, "demo", "image", "clip")
    assert s.failed_file == failures_path(path) == path.with_name("clip.failed.csv") and str(s.failed_file) in text
    listed = _read_failures(path)
    assert {k: v[1] for k, v in listed.items()} == StoreReader(path).failed == s.failed
    assert listed["demo00012"][0] == s.kinds["demo00012"] and str(many_broken) in listed["demo00012"][1]
    # A rerun skips them but still names them and the file.
    again = extract(ds, [Request("image", "clip", "clip-tiny")], cache_dir=tmp_path, progress=False)
    text = format_summary(again)
    assert "image/clip:\n  7 ids are recorded as failed by earlier runs" in text and str(failures_path(path)) in text
    assert "failed in this run" not in text
    # Once every file is fixed, a retry leaves no failure and no stale list.
    for i in (1, 2, 3, 11, 12, 13, 14):
        shutil.copy(many_broken / "images" / "demo00004.jpg", many_broken / "images" / f"demo{i:05d}.jpg")
    fixed = extract(ds, [Request("image", "clip", "clip-tiny")], cache_dir=tmp_path, progress=False,
                    retry_failed=True)
    assert fixed[0].written == 7 and fixed[0].failed_file is None and not failures_path(path).exists()
    assert "failed in this run" not in format_summary(fixed)


def test_failure_kind_takes_out_the_samples_paths() -> None:
    from mmcache.data import Sample

    s = Sample("x", "train", image="/data/my pics/a 1.jpg", video="~/v/clip.mp4")
    reason = ("image file /data/my pics/a 1.jpg is corrupt or not an image (UnidentifiedImageError: cannot identify "
              "image file '/data/my pics/a 1.jpg')")
    assert failure_kind(reason, s) == ("image file <image> is corrupt or not an image (UnidentifiedImageError: "
                                       "cannot identify image file '<image>')")
    home = str(Path("~/v/clip.mp4").expanduser())
    assert failure_kind(f"{home}: cannot decode video ([Errno 1094995529] bad)", s) == (
        "<video>: cannot decode video ([Errno N] bad)")
    assert failure_kind("image file is truncated (3 bytes not processed); float16 x2") == (
        "image file is truncated (N bytes not processed); float16 x2")


SPEC = {"preset": "toy", "family": "toy", "modality": "image"}


def _rows(n: int) -> dict[str, np.ndarray]:
    return {"pooled": np.arange(n * 4, dtype=np.float32).reshape(n, 4) + 1}


def test_merge_keeps_failure_records_under_retry_rules(tmp_path: Path) -> None:
    """A rank's part file merges into the store as a single-process run would have written it."""
    path = store_path(tmp_path, "toy", "image", "toy")
    with FeatureStore(path, SPEC, "toy") as st:
        st.write(["a", "b"], _rows(2))
        for sid in ("c", "d", "e"):
            st.fail(sid, f"cannot decode {sid}.jpg")
    # A retry on two ranks: c was fixed (rank 0), d fails another way (rank 1), e still fails the same
    # way, f is new and fails; e's part also tries to re-record a committed id's failure (ignored).
    with FeatureStore(path.with_name("toy.h5.part0"), SPEC, "toy") as p0:
        p0.write(["c"], _rows(1))
        p0.fail("e", "cannot decode e.jpg")
    with FeatureStore(path.with_name("toy.h5.part1"), SPEC, "toy") as p1:
        p1.fail("d", "image file d.jpg is empty (0 bytes)")
        p1.fail("f", "image file f.jpg not found")
        p1.fail("a", "stale failure of a committed id")
    assert merge_parts(path, SPEC, "toy", "float16") == 1
    r = StoreReader(path)
    assert r.ids == ["a", "b", "c"]
    assert r.failed == {"d": "image file d.jpg is empty (0 bytes)", "e": "cannot decode e.jpg",
                        "f": "image file f.jpg not found"}
    np.testing.assert_array_equal(r.load(["c"])["pooled"], _rows(1)["pooled"].astype(np.float16))
    assert not list(path.parent.glob("*.part*"))
    m = tmp_path / "toy" / "manifest.json"
    m.write_text(json.dumps({"name": "toy", "samples": [{"id": i, "split": "train", "labels": {}} for i in "abcdef"]}))
    rep = verify_store(path)
    assert rep.ok, rep.problems


def test_ids_a_store_cannot_keep_are_refused_at_load(demo_ds: Any, tmp_path: Path) -> None:
    import dataclasses

    from mmcache.data import Dataset, load_dataset

    for bad, why in (("demo00003\x00", "NUL"), ("demo\udcff3", "not valid Unicode"), ("d" * 1025, "1024-byte")):
        samples = [dataclasses.replace(s, id=bad) if i == 3 else s for i, s in enumerate(demo_ds.samples)]
        with pytest.raises(MMCacheError, match=f"sample 3 has id .*{why}"):
            Dataset("demo", samples, demo_ds.labels, demo_ds.root)
    table = tmp_path / "t.jsonl"
    table.write_text('{"id": "ok", "text": "a", "label": "x"}\n{"id": "b\\u0000", "text": "b", "label": "y"}\n')
    with pytest.raises(MMCacheError, match=r"t.jsonl, line 2: id 'b\\x00' contains a NUL character"):
        load_dataset("table", table)
    # Ids with spaces or any other Unicode are kept exactly: a rerun finds every one of them done.
    odd = [dataclasses.replace(s, id=f" {s.id} é\t ") for s in demo_ds.samples[:6]]
    ds = Dataset("odd", odd, demo_ds.labels, demo_ds.root)
    first = extract(ds, [Request("text", "clip", "clip-tiny")], cache_dir=tmp_path, progress=False)
    again = extract(ds, [Request("text", "clip", "clip-tiny")], cache_dir=tmp_path, progress=False)
    assert first[0].written == 6 and (again[0].written, again[0].skipped) == (0, 6)
    assert StoreReader(store_path(tmp_path, "odd", "text", "clip")).ids == [s.id for s in odd]


@pytest.mark.slow
def test_torchrun_retry_keeps_records_through_the_merge(broken_root: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from mmcache.data import load_dataset

    ds = load_dataset("demo", broken_root)
    extract(ds, [Request("image", "clip", "clip-tiny")], cache_dir=tmp_path, progress=False)
    path = store_path(tmp_path, "demo", "image", "clip")
    before = StoreReader(path).failed
    shutil.copy(broken_root / "images" / "demo00004.jpg", broken_root / "images" / "demo00001.jpg")
    (broken_root / "images" / "demo00002.jpg").write_bytes(b"GIF89a broken")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmcache.cli",
           "extract", "demo", "--data-dir", str(broken_root), "--cache-dir", str(tmp_path), "--image",
           "clip=clip-tiny", "--retry-failed", "--num-workers", "0", "--batch-size", "1", "--device", "cpu",
           "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    r = StoreReader(path)
    assert len(r.ids) == len(set(r.ids)) == N_DEMO - 2 and "demo00001" in r.ids
    assert set(r.failed) == {"demo00002", "demo00003"} and r.failed["demo00003"] == before["demo00003"]
    assert r.failed["demo00002"] != before["demo00002"] and "corrupt" in r.failed["demo00002"]
    assert verify_store(path).ok and not list(path.parent.glob("*.part*"))
    assert {k: v[1] for k, v in _read_failures(path).items()} == r.failed
    assert str(failures_path(path)) in res.stdout and "2 ids failed in this run" in res.stdout
