"""`preset[augment=true]`: random train-time image augmentation, never in extraction or evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmcache.errors import MMCacheError
from mmcache.extract import build_extractor
from mmcache.extract.runner import Request, extract


def _image() -> Image.Image:
    # A non-square, detailed image: any other crop or flip changes the pixels.
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8))


@pytest.mark.parametrize("preset", ["clip-tiny", "resnet-tiny"])
def test_augment_draws_random_views_in_training_and_the_reference_in_eval(preset: str) -> None:
    ref = build_extractor(preset, "image").eval()
    aug = build_extractor(preset, "image", augment=True)
    img = _image()
    want = ref.preprocess({"image": img})
    aug.train()
    torch.manual_seed(0)
    a, b = aug.preprocess({"image": img}), aug.preprocess({"image": img})
    assert a.shape == b.shape == want.shape and a.dtype == want.dtype
    assert not torch.equal(a, b), "two training-mode views of one image must differ"
    assert not torch.equal(a, want)
    aug.eval()
    torch.testing.assert_close(aug.preprocess({"image": img}), want, rtol=0, atol=0)
    # Encoded: the two training views give other embeddings; evaluation gives the reference's.
    with torch.no_grad():
        pooled = aug(aug.collate([a, b, aug.preprocess({"image": img})]))["pooled"]
        ref_pooled = ref(ref.collate([want]))["pooled"]
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-4)
    torch.testing.assert_close(pooled[2:], ref_pooled, rtol=1e-5, atol=1e-5)
    # Without augment, training mode keeps the reference preprocessing.
    torch.testing.assert_close(build_extractor(preset, "image").train().preprocess({"image": img}), want,
                               rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["clip-tiny", "resnet-tiny"])
def test_augment_is_not_part_of_the_spec(preset: str) -> None:
    plain = build_extractor(preset, "image")
    for value in (True, False):
        ext = build_extractor(preset, "image", augment=value)
        assert ext.spec == plain.spec and ext.spec_hash() == plain.spec_hash()
        assert "augment" not in ext.spec


def test_augment_is_refused_off_images_and_for_families_without_it() -> None:
    with pytest.raises(MMCacheError, match="augment=true augments images; drop it from --text"):
        build_extractor("clip-tiny", "text", augment=True)
    with pytest.raises(MMCacheError, match=r"augment=1 is not one of true, false"):
        build_extractor("clip-tiny", "image", augment=1)
    with pytest.raises(MMCacheError, match="unknown option 'augment'"):
        build_extractor("roberta-tiny", "text", augment=True)


def test_extraction_refuses_augment_true_and_ignores_false(demo_ds: Any, tmp_path: Path) -> None:
    with pytest.raises(MMCacheError, match="augment is a training option of `finetune run`.*drop augment"):
        extract(demo_ds, [Request("image", "clip", "clip-tiny", {"augment": True})], cache_dir=tmp_path,
                progress=False, limit=4)
    (off,) = extract(demo_ds, [Request("image", "clip", "clip-tiny", {"augment": False})], cache_dir=tmp_path,
                     progress=False, limit=4)
    (plain,) = extract(demo_ds, [Request("image", "clip", "clip-tiny")], cache_dir=tmp_path, progress=False, limit=4)
    # The same spec: the second request finds every row written by the first.
    assert off.written == 4 and plain.written == 0 and plain.skipped == 4
