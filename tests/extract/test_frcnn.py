"""`frcnn` family: region selection, masks for few boxes, box normalisation, re-pooled features, weights by path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcache.extract import PRESETS, build_extractor
from mmcache.extract.frcnn import FasterRCNNExtractor


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A random RGB image with a bright rectangle (something to propose)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8)
    a[size[1] // 4: size[1] // 2, size[0] // 3: 2 * size[0] // 3] = 230
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def tiny() -> FasterRCNNExtractor:
    ext = build_extractor("frcnn-tiny", "image")
    assert isinstance(ext, FasterRCNNExtractor)
    return ext


@pytest.fixture(scope="module")
def batch(tiny: FasterRCNNExtractor) -> list[torch.Tensor]:
    return tiny.collate([tiny.preprocess({"image": image(0, (160, 120))}),
                         tiny.preprocess({"image": image(1, (90, 120))})])


@pytest.fixture(scope="module")
def everything(tiny: FasterRCNNExtractor, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs with every candidate over score 0 kept (up to K)."""
    return run(tiny, batch, score_thresh=0.0)


def run(ext: FasterRCNNExtractor, batch: list[torch.Tensor], **config: object) -> dict[str, torch.Tensor]:
    """Forward with some selection settings changed (they are read per call)."""
    saved = dict(ext.config)
    ext.config.update(config)
    try:
        with torch.inference_mode():
            return ext(batch)
    finally:
        ext.config.clear()
        ext.config.update(saved)


def test_preprocess_shrinks_to_the_detector_size(tiny: FasterRCNNExtractor) -> None:
    big = image(0, (400, 300))
    x = tiny.preprocess({"image": big})
    # min(96/300, 128/400) = 0.32: the detector's own resize runs in the worker, on the [0,1] float image.
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 96, 128)
    ref = torch.nn.functional.interpolate(torch.from_numpy(np.array(big)).permute(2, 0, 1)[None].float() / 255,
                                          scale_factor=0.32, mode="bilinear", recompute_scale_factor=True)[0]
    torch.testing.assert_close(x, ref)
    small = tiny.preprocess({"image": image(0, (60, 40))})
    assert small.dtype == torch.uint8 and tuple(small.shape) == (3, 40, 60)  # enlarged on the device
    mid = tiny.preprocess({"image": image(0, (200, 150))})  # scale 0.64: the uint8 original is fewer bytes
    assert mid.dtype == torch.uint8 and tuple(mid.shape) == (3, 150, 200)
    assert isinstance(tiny.collate([x, small]), list)


def test_shapes_dtypes_and_masks(tiny: FasterRCNNExtractor, batch: list[torch.Tensor]) -> None:
    out = run(tiny, batch)  # preset: nothing passes 0.5 on a random detector -> min_boxes (3) regions
    assert set(out) == {"pooled", "tokens", "boxes", "mask"}
    assert tuple(out["tokens"].shape) == (2, 8, 1024) and out["tokens"].dtype == torch.float32
    assert tuple(out["boxes"].shape) == (2, 8, 5) and tuple(out["mask"].shape) == (2, 8)
    assert tuple(out["pooled"].shape) == (2, 1024) and out["mask"].dtype == torch.bool
    assert out["mask"].sum(1).tolist() == [3, 3]
    for i in range(2):
        n = int(out["mask"][i].sum())
        assert out["mask"][i, :n].all() and (out["tokens"][i, n:] == 0).all() and (out["boxes"][i, n:] == 0).all()
        torch.testing.assert_close(out["pooled"][i], out["tokens"][i, :n].mean(0))
    assert tiny.dim == 1024


def test_threshold_controls_the_number_of_regions(tiny: FasterRCNNExtractor, batch: list[torch.Tensor],
                                                  everything: dict[str, torch.Tensor]) -> None:
    assert everything["mask"].all()  # K = 8 regions when enough candidates pass
    one = run(tiny, batch, score_thresh=1.01, min_boxes=1)
    assert one["mask"].sum(1).tolist() == [1, 1]
    # The top region does not depend on how many are kept.
    torch.testing.assert_close(one["boxes"][:, 0], everything["boxes"][:, 0])
    torch.testing.assert_close(one["tokens"][:, 0], everything["tokens"][:, 0], atol=1e-4, rtol=1e-4)


def test_boxes_are_normalised(everything: dict[str, torch.Tensor]) -> None:
    b = everything["boxes"][everything["mask"]]
    assert (b >= 0).all() and (b <= 1).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    torch.testing.assert_close(b[:, 4], (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))


def test_whole_image_fallback_when_nothing_is_detected(tiny: FasterRCNNExtractor, batch: list[torch.Tensor]) -> None:
    out = run(tiny, batch, score_thresh=1.01, min_boxes=0)
    assert out["mask"].sum(1).tolist() == [1, 1]
    torch.testing.assert_close(out["boxes"][:, 0], torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]] * 2))
    # Its feature is the box head's representation of the whole (resized) image.
    m = tiny.model
    with torch.inference_mode():
        il, _ = m.transform([batch[0].float() / 255])
        feats = m.backbone(il.tensors)
        h, w = il.image_sizes[0]
        ref = m.roi_heads.box_head(m.roi_heads.box_roi_pool(feats, [torch.tensor([[0.0, 0.0, w, h]])], il.image_sizes))
    torch.testing.assert_close(out["tokens"][0, 0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pooled"][0], ref[0], atol=1e-4, rtol=1e-4)


def test_select_nms_threshold_and_min_boxes(tiny: FasterRCNNExtractor) -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.3, 0.1])

    def sel(**cfg: object) -> list[int]:
        saved = dict(tiny.config)
        tiny.config.update(cfg)
        try:
            return tiny.select(boxes, scores).tolist()
        finally:
            tiny.config.clear()
            tiny.config.update(saved)

    # Box 1 overlaps box 0 (IoU 0.81) across classes: suppressed.
    assert sel(score_thresh=0.5, min_boxes=0, regions=8, nms_thresh=0.5) == [0]
    assert sel(score_thresh=0.2, min_boxes=0, regions=8, nms_thresh=0.5) == [0, 2]
    assert sel(score_thresh=0.5, min_boxes=3, regions=8, nms_thresh=0.5) == [0, 2, 3]
    assert sel(score_thresh=0.0, min_boxes=0, regions=2, nms_thresh=0.5) == [0, 2]
    assert sel(score_thresh=0.0, min_boxes=0, regions=8, nms_thresh=0.9) == [0, 1, 2, 3]
    assert sel(score_thresh=0.5, min_boxes=10, regions=8, nms_thresh=0.5) == [0, 2, 3]


def test_weights_from_a_local_file(tiny: FasterRCNNExtractor, batch: list[torch.Tensor], tmp_path: Path,
                                   everything: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "frcnn.pth"
    torch.save(tiny.model.state_dict(), path)
    loaded = build_extractor("frcnn-tiny", "image", weights=str(path), seed=5)
    assert "weights_sha256" in loaded.spec
    b = run(loaded, batch, score_thresh=0.0)
    for key in everything:
        torch.testing.assert_close(everything[key], b[key])


def test_real_presets() -> None:
    assert PRESETS["frcnn"]["arch"] == "fasterrcnn_resnet50_fpn_v2" and PRESETS["frcnn"]["regions"] == 36
    assert PRESETS["frcnn-v1"]["arch"] == "fasterrcnn_resnet50_fpn"
    assert all(PRESETS[p]["weights"] == "COCO_V1" for p in ("frcnn", "frcnn-v1"))
