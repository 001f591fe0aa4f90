"""Hybrid fine-tuning: live encoders for some modalities, features read from stores for the others."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mmcache.cache.store import StoreReader, store_path
from mmcache.data import load_dataset
from mmcache.data.demo import generate_demo
from mmcache.errors import MMCacheError
from mmcache.extract import DECODERS
from mmcache.extract.runner import extract, parse_requests
from mmcache.finetune.run import FinetuneConfig, finetune

N = 60
N_REGIONS = 40  # the frcnn store holds the first rows only: the others are dropped


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hybrid")
    data = generate_demo(root / "demo", n=N, seed=2)
    ds = load_dataset("demo", data)
    cache = root / "cache"
    extract(ds, parse_requests("image", "clip=clip-tiny"), cache_dir=cache, batch_size=32, progress=False)
    extract(ds, parse_requests("image", "frcnn=frcnn-tiny"), cache_dir=cache, batch_size=8, progress=False,
            limit=N_REGIONS)
    return data, cache


def _cfg(demo: tuple[Path, Path], tmp_path: Path, **kw: Any) -> FinetuneConfig:
    data, cache = demo
    base: dict[str, Any] = dict(dataset="demo", data_dir=str(data), cache_dir=str(cache),
                                encoders={"text": "clip-tiny"}, stores={"image": "clip"},
                                runs_dir=str(tmp_path / "runs"), epochs=4, batch_size=8, num_workers=0, quiet=True,
                                head_hparams={"D": 32}, encoder_lr=1e-3, lr=3e-3, warmup=0.0, run_name="r")
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture
def image_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every call of the image decoder, recorded."""
    calls: list[Any] = []
    orig = DECODERS["image"]

    def counting(value: Any, options: dict[str, int]) -> Any:
        calls.append(value)
        return orig(value, options)

    monkeypatch.setitem(DECODERS, "image", counting)
    return calls


def test_live_text_over_cached_images_trains_and_never_decodes_images(
        demo: tuple[Path, Path], tmp_path: Path, image_decodes: list[Any]) -> None:
    res = finetune(_cfg(demo, tmp_path))
    assert image_decodes == []
    losses = [row["train_loss"] for row in res.curves]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.9, losses
    # The head reads the store's arrays (pooled 64-d of clip-tiny) next to the live text features.
    reader = StoreReader(store_path(demo[1], "demo", "image", "clip"))
    assert tuple(res.head.inputs["image"]["pooled"]) == reader.shapes["pooled"]
    assert "text" in res.head.inputs
    config = json.loads((Path(res.run_dir) / "config.json").read_text())
    assert config["stores"] == {"image": "clip"}
    assert config["resolved"]["stores"] == {"image/clip": reader.attrs["spec_hash"]}
    # Only the live encoder's weights are saved; the run folder names the store.
    assert {k.split(".", 1)[0] for k in load_file(str(Path(res.run_dir) / "encoders.safetensors"))} == {"text"}
    from mmcache.finetune.run import _stem

    assert _stem(_cfg(demo, tmp_path, head="linear"))[-1] == "text-clip-tiny+image-store-clip"


def test_the_same_with_a_live_image_encoder_decodes_images(demo: tuple[Path, Path], tmp_path: Path,
                                                            image_decodes: list[Any]) -> None:
    """The counting decoder sees the images when the image encoder runs live (the check above is not vacuous)."""
    finetune(_cfg(demo, tmp_path, encoders={"text": "clip-tiny", "image": "clip-tiny"}, stores={}, epochs=1))
    assert len(image_decodes) > 0


def test_visualbert_over_cached_regions(demo: tuple[Path, Path], tmp_path: Path, image_decodes: list[Any],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    res = finetune(_cfg(demo, tmp_path, encoders={"text": "visualbert-tiny"}, stores={"image": "frcnn"}, epochs=2,
                        quiet=False))
    assert image_decodes == []
    err = capsys.readouterr().err
    # Rows the region store lacks are dropped with a count per split.
    ds = load_dataset("demo", demo[0])
    regions = StoreReader(store_path(demo[1], "demo", "image", "frcnn"))
    stored = set(regions.ids)
    assert len(stored) == N_REGIONS
    train = [s for s in ds.split("train") if s.labels]
    kept = [s for s in train if s.id in stored]
    assert f"{len(train) - len(kept)} of {len(train)} train rows are missing from" in err
    config = json.loads((Path(res.run_dir) / "config.json").read_text())
    assert config["resolved"]["rows"]["train"] == len(kept)
    # The regions feed VisualBERT, not the head: the head reads VisualBERT's pooled output only.
    assert set(res.head.inputs) == {"text"} and tuple(res.head.inputs["text"]["pooled"]) == (64,)
    dim = regions.shapes["tokens"][-1]  # frcnn-tiny's box-head width
    assert config["resolved"]["specs"]["text"]["visual_dim"] == dim == 1024
    trained = load_file(str(Path(res.run_dir) / "encoders.safetensors"))
    # Forward and backward reached the box position features (zero at init) and the transformer.
    assert trained["text.box_proj.weight"].abs().sum() > 0
    from mmcache.extract.base import build_extractor

    init = build_extractor("visualbert-tiny", "text", visual_dim=dim).state_dict()
    key = "model.embeddings.visual_projection.weight"
    assert not torch.allclose(trained[f"text.{key}"], init[key])


def test_rows_no_store_holds_are_an_error(demo: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(MMCacheError, match="needs labelled train and val .* that every store"):
        finetune(_only_unstored(demo, tmp_path))


def _only_unstored(demo: tuple[Path, Path], tmp_path: Path) -> FinetuneConfig:
    """A store that holds none of the rows: an empty frcnn store written for another id set."""
    from mmcache.cache.store import FeatureStore

    cache = tmp_path / "cache"
    spec = {"preset": "x", "family": "frcnn", "modality": "image"}
    with FeatureStore(store_path(cache, "demo", "image", "empty"), spec, "demo") as fs:
        fs.write(["not-a-demo-id"], {"pooled": torch.zeros(1, 4)})
    return _cfg(demo, tmp_path, cache_dir=str(cache), stores={"image": "empty"})


@pytest.mark.parametrize(("kw", "match"), [
    ({"encoders": {"text": "clip-tiny", "image": "clip-tiny"}, "stores": {"image": "clip"}},
     r"--image and --image-store both name the image features"),
    ({"encoders": {}, "stores": {"image": "clip"}}, r"no encoder to fine-tune.*heads train"),
    ({"encoders": {"text": "visualbert-tiny"}, "stores": {}}, r"reads image tokens, boxes, mask from a feature "
                                                              r"store; pass --image-store NAME"),
    ({"encoders": {"text": "visualbert-tiny"}, "stores": {"image": "clip"}},
     r"reads tokens, boxes, mask from .*clip\.h5, which holds .*pass a region store"),
    ({"stores": {"image": "nothing"}}, r"feature store .*nothing\.h5 not found; run `mmcache extract` first"),
])
def test_hybrid_errors_are_one_line(demo: tuple[Path, Path], tmp_path: Path, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(MMCacheError, match=match) as err:
        finetune(_cfg(demo, tmp_path, **kw))
    assert "\n" not in str(err.value)


def test_cli_store_flags_reach_the_run(demo: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmcache.finetune.cli import app

    data, cache = demo
    res = CliRunner().invoke(app, ["run", "--dataset", "demo", "--data-dir", str(data), "--cache-dir", str(cache),
                                   "--text", "clip-tiny", "--image", "clip-tiny", "--image-store", "clip"])
    assert isinstance(res.exception, MMCacheError) and "--image and --image-store" in str(res.exception)
    res = CliRunner().invoke(app, ["run", "--dataset", "demo", "--data-dir", str(data), "--cache-dir", str(cache),
                                   "--context-store", "clip"])
    assert isinstance(res.exception, MMCacheError) and "heads train" in str(res.exception)
