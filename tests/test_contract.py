"""One battery per registry, run over every registration: dataset adapters, extractor presets, heads.

The parameters come from the registries themselves, so a new adapter, preset or head is tested the
moment it is registered. What the battery cannot build on its own is looked up in the tables below
(a tiny dataset in the adapter's real layout, tiny head hyperparameters, a no-download check of a
full-size preset); a registration missing from them fails with a message saying what to add.

- adapters: the Sample / LabelSpace contract on a tiny copy in the real layout, aliases, a one-line
  error for an empty folder and for empty / garbage annotation files, ids that round-trip through the
  manifest and a store, and `mmcache data show` without torch;
- extractors: every `*-tiny` preset, for each modality it serves, extracts a dataset of odd inputs
  (grey / RGBA / CMYK / 1-pixel images, empty and very long texts, silent and 10-sample audio, a
  1-frame video; and empty, corrupt, truncated or missing files): the good ones are written, the bad
  ones recorded as failed with a reason, the store verifies, its rows equal a direct forward, a rerun
  writes nothing; forward/backward as `finetune` runs it; full-size presets resolve and validate
  against their library's catalogue without building;
- heads: forward/backward with all modalities, with one missing, with empty masks and NaN `pooled`
  rows; padding and batch-mates change nothing; float16 inputs; the config + weights round trip; a
  real `heads train` from stores and `heads predict` from its run folder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmcache.cache.store import FeatureStore, StoreReader, manifest_ids, manifest_path, store_path, verify_store
from mmcache.data.base import ALIASES, DATASETS, Dataset, LabelSpace, Sample, dataset_names, load_dataset
from mmcache.data.demo import generate_demo
from mmcache.data.table import write_table
from mmcache.errors import MMCacheError
from mmcache.extract import DECODERS, FAMILIES, PRESETS, build_extractor, resolve_preset
from mmcache.extract.base import FIELDS, spec_hash
from mmcache.extract.runner import Request, extract, merge_decode_options
from mmcache.heads import HEADS, build_head
from mmcache.heads.metrics import SELECT_METRICS
from tests.data import layouts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is faster than two on a shared 2-core machine

ROOT = Path(__file__).resolve().parents[1]
dataset_names()  # registers every adapter
SPACE = {"sentiment": ["negative", "neutral", "positive"]}
MEDIA_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".mp4", ".wav", ".mp3", ".flac"}


def known_gap(reason: str) -> pytest.MarkDecorator:
    """A contract a registration does not meet yet; strict, so the fix turns it into a failure to remove."""
    return pytest.mark.xfail(strict=True, reason=reason)


# ---------------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------------

MVSA_CELLS = ["positive,positive", "negative,neutral", "neutral,neutral", "positive,neutral"]
TWITTER = {"train": [("0", "2", "1.jpg", "$T$ is great", "Chuck Bass"), ("1", "0", "2.jpg", "sad news from $T$", "Paris"),
                     ("2", "1", "1.jpg", "$T$ speaks today", "Obama")],
           "dev": [("0", "1", "3.jpg", "$T$ again", "Obama")], "test": [("0", "0", "4.jpg", "bad $T$", "Arsenal")]}


def _meme(i: int, label: int) -> dict[str, Any]:
    return {"id": i, "img": f"img/{i:05d}.png", "text": f"meme number {i}", "label": label}


def _table(root: Path) -> Path:
    rows = [{"id": f"r{i}", "image": f"img/{i}.jpg", "text": f"row {i} caf\u00e9", "label": ["pos", "neg", "neu"][i % 3],
             "split": ["train", "train", "dev", "test"][i % 4], "label_topic": ["a", "b"][i % 2]} for i in range(8)]
    for r in rows:
        layouts.image(root / r["image"])
    write_table(root / "data.csv", rows)
    return root


def _webdataset(root: Path) -> Path:
    def member(i: int, label: str) -> dict[str, Any]:
        return {"jpg": layouts.jpeg_bytes((i * 40 % 255, 90, 0)), "txt": f"caption {i}", "json": {"label": label}}

    layouts.write_shard(root / "train" / "00000.tar", {f"{i:05d}": member(i, ["Hate", "True"][i % 2]) for i in range(4)})
    layouts.write_shard(root / "val" / "00000.tar", {"10000": member(10, "True")})
    layouts.write_shard(root / "test-00000.tar", {"20000": member(20, "Hate")})
    return root


# Canonical adapter name -> writer of a tiny copy of the dataset in its real layout (returns --data-dir).
ADAPTER_FIXTURES: dict[str, Callable[[Path], Path]] = {
    "demo": lambda root: generate_demo(root, n=30, seed=0, size=8),
    "mvsa-single": lambda root: layouts.write_mvsa(root, [(str(i), [MVSA_CELLS[i % 4]]) for i in range(1, 31)]),
    "mvsa-multiple": lambda root: layouts.write_mvsa(root, [(str(i), [MVSA_CELLS[i % 4]] * 3) for i in range(1, 31)],
                                                     multiple=True),
    "hateful-memes": lambda root: layouts.write_hateful_memes(root, {
        "train": [_meme(i, i % 2) for i in range(1, 5)], "dev_seen": [_meme(10, 1)], "test_seen": [_meme(20, 0)]}),
    "meld": lambda root: layouts.write_meld(root, {
        "train": [("Hi there", "joy", "positive", 0, 0), ("No", "anger", "negative", 0, 1)],
        "dev": [("Eh", "neutral", "neutral", 0, 0)], "test": [("Oh", "fear", "negative", 0, 0)]}),
    "twitter15": lambda root: layouts.write_twitter(root, TWITTER, image_dir="twitter2015_images"),
    "twitter17": lambda root: layouts.write_twitter(root, TWITTER, image_dir="twitter2017_images"),
    "mmhs150k": lambda root: layouts.write_mmhs(root, {"1": [0, 0, 0], "2": [1, 1, 0], "3": [2, 2, 2], "4": [0, 1, 0]},
                                                {"train": ["1", "2"], "val": ["3"], "test": ["4"]}, ocr={"2": "OCR"}),
    "fakeddit": lambda root: layouts.write_fakeddit(root, {
        "train": [("a1", "a title", 1, 0, 0), ("a2", "another", 0, 2, 5)], "validate": [("b1", "y", 1, 0, 0)],
        "test_public": [("c1", "z", 0, 2, 4)]}),
    "table": _table,
    "webdataset": _webdataset,
}
ADAPTERS = sorted(DATASETS)


def write_fixture(name: str, root: Path) -> Path:
    """The adapter's tiny dataset under `root`, or a failure saying what to add."""
    writer = ADAPTER_FIXTURES.get(name)
    if writer is None:
        pytest.fail(f"dataset adapter {name!r} has no fixture: add a writer of a tiny copy in its real layout to "
                    "ADAPTER_FIXTURES in tests/test_contract.py (tests/data/layouts.py has writers to build on)")
    return writer(root)


def check_dataset(ds: Dataset, name: str) -> None:
    """The Sample / LabelSpace contract every adapter meets."""
    assert ds.name == name and len(ds.samples) >= 3
    tasks = ds.labels.tasks
    assert tasks and all(isinstance(t, str) and t for t in tasks)
    for t, names in tasks.items():
        assert names and len(set(names)) == len(names) and all(isinstance(n, str) and n for n in names), (t, names)
    assert ds.labels.metric in SELECT_METRICS
    ids = [s.id for s in ds.samples]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) and i for i in ids)
    assert "train" in ds.splits and all(isinstance(s.split, str) and s.split for s in ds.samples)
    for s in ds.samples:
        assert isinstance(s, Sample)
        json.dumps(s.to_json())
        for t, k in s.labels.items():
            assert t in tasks and isinstance(k, int) and 0 <= k < len(tasks[t]), (s.id, t, k)
        for f in ("text", "entity", "context"):
            assert getattr(s, f) is None or isinstance(getattr(s, f), str), (s.id, f)
        for f in ("image", "video", "audio"):
            path = getattr(s, f)
            assert path is None or (isinstance(path, str) and os.path.exists(path)), (s.id, f, path)
        assert any(getattr(s, f) for f in FIELDS if f != "entity"), f"{s.id}: no text or media at all"
    assert any(ds.labels.primary in s.labels for s in ds.split("train"))
    counts = ds.counts()
    assert sum(sum(c[ds.labels.primary].values()) for c in counts.values()) == \
        sum(ds.labels.primary in s.labels for s in ds.samples)


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_meets_the_sample_contract(name: str, tmp_path: Path) -> None:
    root = write_fixture(name, tmp_path / name)
    ds = load_dataset(name, root)
    check_dataset(ds, name)
    assert load_dataset(name, root).samples == ds.samples  # deterministic
    for alias in sorted(a for a, c in ALIASES.items() if c == name):
        again = load_dataset(alias, root)
        assert again.samples == ds.samples and again.name == alias


def annotation_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() not in MEDIA_SUFFIXES
            and "_unpacked" not in p.parts and p.name != "labels.json"]


BAD_ANNOTATIONS = {"empty": lambda data: b"", "garbage": lambda data: b"\x00\xff\xfe not \x80 what you think\n\x00"}


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_refuses_bad_annotations_in_one_line(name: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMCacheError) as err:
        load_dataset(name, tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value) and "\n" not in str(err.value)
    for kind, corrupt in BAD_ANNOTATIONS.items():
        root = write_fixture(name, tmp_path / kind)
        files = annotation_files(tmp_path / kind)
        assert files, f"{name}: the fixture has no annotation file"
        for p in files:
            p.write_bytes(corrupt(p.read_bytes()))
        with pytest.raises(MMCacheError) as err:
            ds = load_dataset(name, root)
            pytest.fail(f"{name} with {kind} annotation files loaded {len(ds.samples)} samples instead of an error")
        assert "\n" not in str(err.value) and str(tmp_path / kind) in str(err.value), (kind, str(err.value))


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_ids_round_trip_through_manifest_and_store(name: str, tmp_path: Path) -> None:
    ds = load_dataset(name, write_fixture(name, tmp_path / "data"))
    cache = tmp_path / "cache"
    ds.write_manifest(manifest_path(cache, ds.name))
    assert manifest_ids(manifest_path(cache, ds.name)) == ds.ids()
    path = store_path(cache, ds.name, "image", "probe")
    rows = np.arange(len(ds.samples), dtype=np.float32)[:, None] + np.ones((1, 4), np.float32)
    with FeatureStore(path, {"preset": "probe"}, ds.name, capacity=len(ds.samples)) as st:
        st.write(ds.ids(), {"pooled": rows})
    reader = StoreReader(path)
    back = list(reversed(ds.ids()))
    np.testing.assert_array_equal(reader.load(back)["pooled"][:, 0], [ds.ids().index(i) + 1 for i in back])
    for split in ds.splits:
        got = reader.load(split=split)["pooled"][:, 0]
        np.testing.assert_array_equal(got, [ds.ids().index(i) + 1 for i in ds.ids(split)])
    assert verify_store(path).ok


def test_data_show_of_every_adapter_runs_without_torch(tmp_path: Path) -> None:
    lines = []
    for name in ADAPTERS:
        root = write_fixture(name, tmp_path / name)
        lines += [["data", "show", n, "--data-dir", str(root), "--samples", "1"]
                  for n in [name, *sorted(a for a, c in ALIASES.items() if c == name)]]
    code = ("import json, sys\nfrom mmcache.cli import main\nout = []\n"
            f"for argv in {lines!r}:\n"
            "    sys.argv = ['mmcache', *argv]\n"
            "    try:\n        main(); rc = 0\n    except SystemExit as e:\n        rc = e.code or 0\n"
            "    out.append([argv[2], rc, sorted(m for m in ('torch', 'torchvision', 'open_clip', 'transformers', "
            "'matplotlib') if m in sys.modules)])\n"
            "print('REPORT' + json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    for name, rc, heavy in json.loads(res.stdout.rsplit("REPORT", 1)[1]):
        assert rc == 0, f"`mmcache data show {name}` exited {rc}: {res.stderr[-1000:]}"
        assert heavy == [], f"`mmcache data show {name}` imported {heavy}; adapters must not need them"


# ---------------------------------------------------------------------------------------------------
# Extractors
# ---------------------------------------------------------------------------------------------------

TINY = sorted(p for p in PRESETS if p.endswith("-tiny"))
FULL = sorted(p for p in PRESETS if not p.endswith("-tiny"))
TINY_PAIRS = [(p, m) for p in TINY for m in FAMILIES[PRESETS[p]["family"]].modalities]
# Families that read other modalities' stored arrays at forward time (`consumes`) run in `finetune run` only.
CONSUMING = {f for f, cls in FAMILIES.items() if cls.consumes}
STORED_PAIRS = [(p, m) for p, m in TINY_PAIRS if PRESETS[p]["family"] not in CONSUMING]
REGION_DIM = 16  # the region width the contract feeds to consuming families


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_has_a_tiny_preset(family: str) -> None:
    if not any(PRESETS[p]["family"] == family for p in TINY):
        pytest.fail(f"extractor family {family!r} has no tiny preset: register one named '{family}-tiny' (random "
                    "init with a fixed seed, small shapes, no download) so the contract battery runs it")


def _clip_catalogue(cfg: dict[str, Any]) -> None:
    import open_clip

    assert cfg["arch"] in open_clip.list_models(), cfg
    assert cfg["pretrained"] in open_clip.list_pretrained_tags_by_model(cfg["arch"]), cfg


def _torchvision_catalogue(cfg: dict[str, Any]) -> None:
    import torchvision

    enum = torchvision.models.get_model_weights(cfg["arch"])
    assert cfg["weights"] in enum.__members__, (cfg, list(enum.__members__))


def _hf_name(cfg: dict[str, Any]) -> None:
    from mmcache.extract.roberta import POOLINGS

    assert isinstance(cfg["model"], str) and cfg["model"] and not any(c.isspace() for c in cfg["model"]), cfg
    assert cfg.get("pooling", "mean") in POOLINGS, cfg


def _buildable_offline(preset: str) -> Callable[[dict[str, Any]], None]:
    def check(cfg: dict[str, Any]) -> None:
        cls = FAMILIES[cfg["family"]]
        for m in cls.modalities:
            ext = build_extractor(preset, m)
            assert ext.spec["preset"] == preset and ext.spec_hash() == spec_hash(ext.spec)
    return check


# Family -> a check of a full-size preset's config against its library's catalogue, without downloading.
FULL_SIZE_CHECKS: dict[str, Callable[[str], Callable[[dict[str, Any]], None]]] = {
    "clip": lambda p: _clip_catalogue,
    "clip-teacher": lambda p: _clip_catalogue,
    "resnet": lambda p: _torchvision_catalogue,
    "r3d": lambda p: _torchvision_catalogue,
    "frcnn": lambda p: _torchvision_catalogue,
    "roberta": lambda p: _hf_name,
    "visualbert": lambda p: _hf_name,
    "nli-teacher": lambda p: _hf_name,
    "mel": _buildable_offline,  # no weights: built for real
}


@pytest.mark.parametrize("preset", FULL)
def test_full_size_preset_resolves_and_validates_without_building(preset: str) -> None:
    name, cfg = resolve_preset(preset)
    assert name == preset and cfg["family"] in FAMILIES
    assert json.loads(json.dumps(cfg)) == cfg  # presets are data
    assert FAMILIES[cfg["family"]].modalities
    check = FULL_SIZE_CHECKS.get(cfg["family"])
    if check is None:
        pytest.fail(f"extractor family {cfg['family']!r} has no full-size check: add one to FULL_SIZE_CHECKS in "
                    "tests/test_contract.py (validate the preset's model / weights names without downloading)")
    check(preset)(cfg)


def _save(path: Path, im: Image.Image) -> str:
    im.save(path)
    return str(path)


def _wav(path: Path, x: np.ndarray, rate: int) -> str:
    x = np.atleast_2d(x)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x.T * 32767).round().astype("<i2").tobytes())
    return str(path)


def _mp4(path: Path, frames: int, audio: bool, size: tuple[int, int] = (40, 32)) -> str:
    import av

    w, h = size
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=8)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = c.add_stream("aac", rate=16000) if audio else None
        if aus is not None:
            aus.layout = "mono"
        for i in range(frames):
            for p in vs.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), 30 * i % 256, np.uint8), format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if aus is not None:
            x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(frames * 2000) / 16000)).astype(np.float32)[None]
            for s in range(0, x.shape[1], 1024):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, s:s + 1024]), format="fltp", layout="mono")
                fr.sample_rate, fr.pts = 16000, s
                for p in aus.encode(fr):
                    c.mux(p)
            for p in aus.encode():
                c.mux(p)
    return str(path)


# Expected outcome of an odd input: it decodes and is written (True), it is recorded as failed (False), or
# either, as long as the run goes on (None).
OddInput = tuple[str, Any, bool | None]


def odd_inputs(d: Path) -> dict[str, list[OddInput]]:
    """Per raw field, odd values with their expected outcome; the first of each field is a plain good one."""
    d.mkdir(parents=True, exist_ok=True)
    rgb = Image.new("RGB", (24, 16), (200, 40, 40))
    jpg = _save(d / "ok.jpg", rgb)
    (d / "truncated.jpg").write_bytes(Path(jpg).read_bytes()[:200])
    (d / "empty.jpg").write_bytes(b"")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (d / "folder.jpg").mkdir()
    image: list[OddInput] = [
        ("rgb jpeg", jpg, True),
        ("grey png", _save(d / "grey.png", Image.new("L", (16, 16), 90)), True),
        ("rgba png", _save(d / "rgba.png", Image.new("RGBA", (16, 16), (0, 200, 0, 100))), True),
        ("palette gif", _save(d / "pal.gif", rgb.convert("P")), True),
        ("cmyk jpeg", _save(d / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 100, 200, 0))), True),
        ("16-bit png", _save(d / "i16.png", Image.new("I;16", (16, 16), 4000)), True),
        ("1x1 pixel", _save(d / "one.png", Image.new("RGB", (1, 1), (1, 2, 3))), True),
        ("40x3 strip", _save(d / "strip.png", Image.new("RGB", (40, 3), (9, 9, 9))), True),
        ("300x2 sliver", _save(d / "sliver.png", Image.new("RGB", (300, 2), (9, 9, 9))), None),
        ("truncated jpeg", str(d / "truncated.jpg"), False),
        ("empty file", str(d / "empty.jpg"), False),
        ("not an image", str(d / "corrupt.jpg"), False),
        ("a folder", str(d / "folder.jpg"), False),
        ("missing file", str(d / "missing.jpg"), False),
        ("no image", None, False),
    ]
    text: list[OddInput] = [
        ("short", "i love it", True), ("empty", "", True), ("whitespace", " \n\t ", True),
        ("unicode", "caf\u00e9 \U0001F600 \u4e2d\u6587 \u0645\u0631\u062d\u0628\u0627", True),
        ("very long", "word " * 3000, True), ("no text", None, False)]
    (d / "empty.mp4").write_bytes(b"")
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 and then garbage")
    clip = _mp4(d / "clip.mp4", frames=8, audio=True)
    mute = _mp4(d / "mute.mp4", frames=1, audio=False)
    video: list[OddInput] = [
        ("mp4", clip, True), ("one frame", mute, True),
        ("odd size", _mp4(d / "odd.mp4", frames=5, audio=False, size=(66, 18)), True),
        ("audio only", _wav(d / "tone.wav", np.zeros(1600), 16000), False),
        ("empty file", str(d / "empty.mp4"), False), ("not a video", str(d / "corrupt.mp4"), False),
        ("missing file", str(d / "missing.mp4"), False), ("no video", None, False)]
    t = np.arange(16000) / 16000
    audio: list[OddInput] = [
        ("wav", _wav(d / "a.wav", 0.3 * np.sin(2 * np.pi * 300 * t), 16000), True),
        ("stereo 44.1 kHz", _wav(d / "st.wav", np.stack([0.2 * np.sin(np.arange(4410) / 7)] * 2), 44100), True),
        ("silence", _wav(d / "silent.wav", np.zeros(8000), 16000), True),
        ("ten samples", _wav(d / "short.wav", np.full(10, 0.1), 16000), True),
        ("mp4 audio track", clip, True), ("video without audio", mute, False),
        ("empty file", str(d / "empty.mp4"), False), ("not audio", str(d / "corrupt.mp4"), False),
        ("missing file", str(d / "missing.wav"), False), ("no audio", None, False)]
    entity: list[OddInput] = [("entity", "Obama", True), ("unicode entity", "Zo\u00eb \U0001F600", True),
                              ("no entity", None, True)]
    return {"image": image, "text": text, "context": text, "entity": entity, "video": video, "audio": audio}


@functools.cache
def tiny_extractor(preset: str, modality: str) -> Any:
    """One build per (preset, modality) for the whole module (teachers get the 3-way class names)."""
    extra: dict[str, Any] = {"label_space": SPACE} if modality == "teacher" else {}
    if PRESETS[preset]["family"] in CONSUMING:
        extra["visual_dim"] = REGION_DIM
    return build_extractor(preset, modality, **extra)


def consumed_rows(ext: Any, n: int) -> dict[str, dict[str, torch.Tensor]]:
    """Stored arrays of `n` rows for a family that consumes them: random regions, boxes, the first K-1 real."""
    g = torch.Generator().manual_seed(n)
    k = 4
    rows = {"tokens": torch.randn(n, k, REGION_DIM, generator=g), "boxes": torch.rand(n, k, 5, generator=g),
            "mask": torch.arange(k).expand(n, k) < k - 1}
    return {m: {key: rows[key] for key in keys} for m, keys in ext.consumes.items()}


@pytest.mark.parametrize("preset", sorted(p for p in TINY if PRESETS[p]["family"] in CONSUMING))
def test_consuming_family_refuses_extraction_in_one_line(preset: str) -> None:
    cls = FAMILIES[PRESETS[preset]["family"]]
    with pytest.raises(MMCacheError, match="finetune run") as err:
        build_extractor(preset, cls.modalities[0])
    assert "\n" not in str(err.value)


@dataclasses.dataclass
class Extracted:
    ext: Any
    samples: list[Sample]
    expect: dict[str, bool | None]
    labels: dict[str, str]
    path: Path
    cache: Path
    ds: Dataset
    request: Request


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("odd")


@pytest.fixture(scope="module")
def extracted(odd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Extracted]:
    """(preset, modality) -> the odd-input dataset extracted once into a store (memoised for the module)."""
    odd = odd_inputs(odd_dir / "media")
    done: dict[tuple[str, str], Extracted] = {}

    def get(preset: str, modality: str) -> Extracted:
        if (preset, modality) in done:
            return done[(preset, modality)]
        ext = tiny_extractor(preset, modality)
        missing = [f for f in ext.inputs if f not in odd]
        if missing:
            pytest.fail(f"{preset} reads fields {missing} that have no odd inputs: add them to odd_inputs() in "
                        "tests/test_contract.py")
        good = {f: odd[f][0][1] for f in ext.inputs}
        samples, expect, labels = [], {}, {}
        for f in ext.inputs:
            for k, (label, value, ok) in enumerate(odd[f]):
                sid = f"{f}{k:02d}"
                samples.append(Sample(id=sid, split="train", labels={"sentiment": k % 3}, **{**good, f: value}))
                expect[sid], labels[sid] = ok, f"{f} {label}"
        ds = Dataset("odd", samples, LabelSpace(dict(SPACE)), odd_dir)
        cache = tmp_path_factory.mktemp("cache")
        req = Request(modality, "probe", preset)
        extract(ds, [req], cache_dir=cache, device="cpu", num_workers=0, progress=False, extractors=[ext])
        done[(preset, modality)] = Extracted(ext, samples, expect, labels, store_path(cache, "odd", modality, "probe"),
                                             cache, ds, req)
        return done[(preset, modality)]

    return get


@pytest.mark.parametrize(("preset", "modality"), STORED_PAIRS)
def test_tiny_extractor_writes_good_inputs_and_records_bad_ones(preset: str, modality: str,
                                                                 extracted: Callable[[str, str], Extracted]) -> None:
    run = extracted(preset, modality)
    reader = StoreReader(run.path)
    written, failed = set(reader.ids), reader.failed
    for s in run.samples:
        what = f"{preset} ({modality}), {run.labels[s.id]}"
        assert (s.id in written) != (s.id in failed), f"{what}: neither written nor failed"
        if run.expect[s.id] is True:
            assert s.id in written, f"{what}: should be extracted, failed with {failed.get(s.id)!r}"
        elif run.expect[s.id] is False:
            assert s.id in failed, f"{what}: should be recorded as failed, was written"
        if s.id in failed:
            assert failed[s.id].strip() and "\n" not in failed[s.id], (what, failed[s.id])
    report = verify_store(run.path)
    assert report.ok, report.problems
    out_key = "logits" if modality == "teacher" else "pooled"
    assert out_key in reader.shapes
    if modality == "teacher":
        assert reader.shapes["logits"] == (len(SPACE["sentiment"]),)
    if "tokens" in reader.shapes:
        assert reader.shapes["mask"] == reader.shapes["tokens"][:1] and reader.dtypes["mask"] == np.bool_
        assert reader.load(keys=["mask"])["mask"].any(-1).all(), "a written row has no real token"


@pytest.mark.parametrize(("preset", "modality"), STORED_PAIRS)
def test_tiny_extractor_store_rows_equal_a_direct_forward_and_resume(preset: str, modality: str,
                                                                      extracted: Callable[[str, str], Extracted]) -> None:
    run = extracted(preset, modality)
    reader = StoreReader(run.path)
    assert reader.spec == json.loads(json.dumps(run.ext.spec, default=str))
    assert reader.attrs["spec_hash"] == run.ext.spec_hash()
    ids = [s.id for s in run.samples if s.id in set(reader.ids)]
    by_id = {s.id: s for s in run.samples}
    opts = merge_decode_options([run.ext])
    # The same rows in the same order as the runner's single batch, encoded directly.
    items = [run.ext.preprocess({f: DECODERS[f](getattr(by_id[i], f), opts) for f in run.ext.inputs}) for i in ids]
    with torch.inference_mode():
        direct = run.ext(run.ext.collate(items))
    stored = reader.load(list(reversed(ids)))
    for key, t in direct.items():
        want = t.float().numpy()[::-1] if t.is_floating_point() else t.numpy()[::-1]
        got = stored[key]
        assert got.shape == want.shape, (key, got.shape, want.shape)
        if got.dtype == np.bool_:
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(got.astype(np.float32), want.astype(reader.dtypes[key]).astype(np.float32),
                                       rtol=2e-3, atol=2e-3 * scale, err_msg=key)
    [again] = extract(run.ds, [run.request], cache_dir=run.cache, device="cpu", num_workers=0, progress=False,
                      extractors=[run.ext])
    assert again.written == 0 and again.skipped == len(run.samples) and not again.failed
    assert StoreReader(run.path).ids == reader.ids


TRAIN_GAPS: dict[str, str] = {}


@pytest.mark.parametrize(("preset", "modality"), [
    pytest.param(p, m, marks=known_gap(TRAIN_GAPS[PRESETS[p]["family"]])) if PRESETS[p]["family"] in TRAIN_GAPS
    else (p, m) for p, m in TINY_PAIRS])
def test_tiny_extractor_forward_backward_as_finetune_runs_it(preset: str, modality: str, odd_dir: Path) -> None:
    ext = tiny_extractor(preset, modality)
    odd = odd_inputs(odd_dir / f"fb-{preset}-{modality}")
    opts = merge_decode_options([ext])
    good = {f: [v for _, v, ok in odd[f] if ok] for f in ext.inputs}

    def batch(rows: range) -> Any:
        out = ext.collate([ext.preprocess({f: DECODERS[f](good[f][r % len(good[f])], opts) for f in ext.inputs})
                           for r in rows])
        return {**out, "consumed": consumed_rows(ext, len(rows))} if ext.consumes else out

    with torch.inference_mode():
        one, three = ext(batch(range(1))), ext(batch(range(1, 4)))
    # Shapes after the batch dim are fixed by the spec, whatever the inputs (stores are dense).
    assert {k: tuple(v.shape[1:]) for k, v in one.items()} == {k: tuple(v.shape[1:]) for k, v in three.items()}
    assert all(v.shape[0] == 3 for v in three.values())
    assert all(torch.isfinite(v.float()).all() for v in three.values() if v.is_floating_point())
    if "mask" in three:
        assert three["mask"].dtype == torch.bool and three["mask"].any(-1).all()
    if modality == "teacher":
        assert set(three) == {"logits"} and three["logits"].shape == (3, len(SPACE["sentiment"]))
        return
    params = list(ext.parameters())
    if not params:
        return  # nothing to train (a fixed transform such as mel)
    try:
        ext.train()
        ext.requires_grad_(True)
        out = ext(batch(range(2)))
        loss = sum(v.float().square().mean() for v in out.values() if v.is_floating_point())
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(bool(g.abs().sum() > 0) for g in grads) >= len(params) // 2, "most weights get no gradient"
    finally:
        ext.zero_grad(set_to_none=True)
        ext.requires_grad_(False)
        ext.eval()


# ---------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------

# Head name -> small hyperparameters (everything else at its default).
HEAD_HPARAMS: dict[str, dict[str, Any]] = {
    "linear": {"D": 8},
    "gated": {"D": 8},
    "hateclipper": {"D": 4, "hidden": 8},
    "xattn": {"D": 8, "heads": 2},
    "scabg": {"hidden": 8, "heads": 2, "out_dim": 8, "branch_heads": 2, "queries": 2},
    "scabg-ref": {"hidden": 8, "heads": 2, "out_dim": 8, "branch_heads": 2, "queries": 2},
    "transformer": {"D": 8, "heads": 2, "layers": 2},
}
INPUTS = {"image": {"pooled": (12,), "tokens": (5, 12), "mask": (5,)},
          "text": {"pooled": (10,), "tokens": (7, 10), "mask": (7,)},
          "context": {"pooled": (6,), "tokens": (4, 6), "mask": (4,)}}
TASKS = {"sentiment": 3, "topic": 2}
HEAD_NAMES = sorted(HEADS)
NAN_GAPS: dict[str, str] = {}


def head_hparams(name: str) -> dict[str, Any]:
    hp = HEAD_HPARAMS.get(name)
    if hp is None:
        pytest.fail(f"head {name!r} has no tiny hyperparameters: add an entry to HEAD_HPARAMS in "
                    "tests/test_contract.py (small widths, e.g. {'D': 8})")
    return dict(hp)


def make_head(name: str, inputs: dict[str, dict[str, tuple[int, ...]]] | None = None, **extra: Any) -> Any:
    torch.manual_seed(0)
    return build_head(name, inputs or INPUTS, TASKS, {**head_hparams(name), **extra})


def features(batch: int, seed: int = 0, mods: tuple[str, ...] = tuple(INPUTS)) -> dict[str, dict[str, torch.Tensor]]:
    """Random features; token masks of varying length (row 0 is full, no row empty)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in mods:
        spec = INPUTS[m]
        t = spec["tokens"][0]
        lengths = torch.randint(1, t + 1, (batch,), generator=g)
        lengths[0] = t
        out[m] = {"pooled": torch.randn(batch, *spec["pooled"], generator=g),
                  "tokens": torch.randn(batch, *spec["tokens"], generator=g),
                  "mask": torch.arange(t)[None, :] < lengths[:, None]}
    return out


def check_logits(out: dict[str, torch.Tensor], batch: int, what: str) -> None:
    for t, c in TASKS.items():
        assert t in out and out[t].shape == (batch, c), (what, t, None if t not in out else out[t].shape)
        assert torch.isfinite(out[t]).all(), f"{what}: non-finite logits for {t}"


def backward(head: Any, out: dict[str, torch.Tensor]) -> None:
    loss = sum(torch.nn.functional.cross_entropy(out[t], torch.arange(out[t].shape[0]) % c) for t, c in TASKS.items())
    head.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def missing_cases() -> dict[str, Callable[[], dict[str, dict[str, torch.Tensor]]]]:
    def empty_masks() -> dict[str, dict[str, torch.Tensor]]:
        f = features(6, 1)
        f["image"]["mask"][1] = False
        f["text"]["mask"][2] = False
        f["image"]["mask"][3] = f["text"]["mask"][3] = f["context"]["mask"][3] = False  # a row with nothing
        return f

    cases = {"all modalities": lambda: features(6, 1), "empty masks": empty_masks,
             "only text": lambda: features(6, 1, ("text",))}
    for m in INPUTS:
        cases[f"no {m}"] = functools.partial(features, 6, 1, tuple(x for x in INPUTS if x != m))
    return cases


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_forward_backward_with_masks_and_missing_modalities(name: str) -> None:
    head = make_head(name).train()
    for what, make in missing_cases().items():
        out = head(make())
        check_logits(out, 6, f"{name}, {what}")
        backward(head, out)


@pytest.mark.parametrize("name", [pytest.param(n, marks=known_gap(NAN_GAPS[n])) if n in NAN_GAPS else n
                                  for n in HEAD_NAMES])
def test_head_treats_a_nan_pooled_row_as_missing(name: str) -> None:
    head = make_head(name).eval()
    f = features(4, 2)
    f["image"]["pooled"][1] = float("nan")
    f["image"]["tokens"][1] = float("nan")
    f["image"]["mask"][1] = False
    with torch.no_grad():
        out = head(f)
    check_logits(out, 4, f"{name}, NaN pooled row")
    # The NaN row equals the same row with the image left out.
    without = {m: {k: v[1:2] for k, v in d.items()} for m, d in f.items() if m != "image"}
    with torch.no_grad():
        alone = head(without)
    for t in TASKS:
        torch.testing.assert_close(out[t][1:2], alone[t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_ignores_padding_and_batch_mates(name: str) -> None:
    head = make_head(name).eval()
    f = features(5, 3)
    with torch.no_grad():
        out = head(f)
        padded = {m: {**d, "tokens": torch.where(d["mask"][..., None], d["tokens"], torch.full_like(d["tokens"], 1e3))}
                  for m, d in f.items()}
        out_padded = head(padded)
        rows = {m: {k: v[2:4] for k, v in d.items()} for m, d in f.items()}
        out_rows = head(rows)
    for t in TASKS:
        torch.testing.assert_close(out_padded[t], out[t], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out_rows[t], out[t][2:4], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_takes_float16_store_rows(name: str) -> None:
    head = make_head(name).eval()
    f16 = {m: {k: v.half() if v.is_floating_point() else v for k, v in d.items()} for m, d in features(4, 4).items()}
    f32 = {m: {k: v.float() if v.is_floating_point() else v for k, v in d.items()} for m, d in f16.items()}
    with torch.no_grad():
        a, b = head(f16), head(f32)
    check_logits(a, 4, f"{name}, float16 inputs")
    for t in TASKS:
        torch.testing.assert_close(a[t].float(), b[t].float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_config_and_weights_round_trip(name: str, tmp_path: Path) -> None:
    head = make_head(name)
    backward(head, head(features(6, 5)))  # move BatchNorm statistics off their init
    head.eval()
    cfg = json.loads(json.dumps(head.config))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "model.safetensors"))
    torch.manual_seed(123)
    again = build_head(cfg["name"], cfg["inputs"], cfg["tasks"], cfg["hparams"])
    again.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    again.eval()
    f = features(4, 6)
    with torch.no_grad():
        a, b = head(f), again(f)
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_trains_from_stores_and_predicts_from_its_run_folder(name: str, tmp_path: Path) -> None:
    import csv

    from mmcache.heads.train import TrainConfig, predict, train
    from tests.heads.conftest import build_cache

    cache = tmp_path / "cache"
    info = build_cache(cache, n=90, tokens=True)
    res = train(TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                            runs_dir=str(tmp_path / "runs"), head=name, head_hparams=head_hparams(name), epochs=2,
                            batch_size=32, device="cpu", quiet=True))
    assert res.run_dir is not None and (res.run_dir / "model.safetensors").is_file()
    out = predict(res.run_dir, split="test", out=tmp_path / "preds.csv", device="cpu")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == int((info["split"] == "test").sum())
    for r in rows:
        p = [float(r[f"p_{c}"]) for c in ("negative", "neutral", "positive")]
        assert abs(sum(p) - 1) < 1e-3 and r["predicted"] in ("negative", "neutral", "positive")


def test_a_registration_without_its_table_entry_fails_saying_what_to_add(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="no fixture: add a writer .* to ADAPTER_FIXTURES"):
        write_fixture("not-registered", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="add an entry to HEAD_HPARAMS"):
        head_hparams("not-registered")
    with pytest.raises(pytest.fail.Exception, match="register one named 'not-registered-tiny'"):
        test_every_family_has_a_tiny_preset("not-registered")


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_trains_the_same_run_from_streamed_rows(name: str, tmp_path: Path) -> None:
    """`--load stream` reads each batch from the stores (a memory map), `--load memory` holds the rows as tensors:
    the same seed gives the same batches, so the same weights and metrics, for every head."""
    from mmcache.heads.train import TrainConfig, train_many
    from tests.heads.conftest import build_cache

    cache = tmp_path / "cache"
    build_cache(cache, n=90, tokens=True, fail_ids=("r0003", "r0010"))  # dropped rows: a row map, not the identity
    results = {}
    for load in ("memory", "stream"):
        cfg = TrainConfig(dataset="toy", modalities={"image": "feat", "text": "feat"}, cache_dir=str(cache),
                          head=name, head_hparams=head_hparams(name), epochs=2, batch_size=16, device="cpu",
                          quiet=True, save=False, load=load)
        res = train_many([cfg])[0]
        assert not isinstance(res, Exception), res
        assert res.config["resolved"]["load"] == load
        results[load] = res
    a, b = results["memory"], results["stream"]
    assert a.metrics == b.metrics and a.best_epoch == b.best_epoch
    assert [r["train_loss"] for r in a.curves] == [r["train_loss"] for r in b.curves]
    for (ka, va), (kb, vb) in zip(a.head.state_dict().items(), b.head.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
