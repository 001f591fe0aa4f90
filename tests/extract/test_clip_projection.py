"""clip[projection=false]: pooled features before the final projection (the CLIP paper's probe inputs)."""

from __future__ import annotations

import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.extract.base import build_extractor


def test_pre_projection_pooled_times_the_projection_is_the_projected_pooled() -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    img = build_extractor("clip-tiny", "image").eval()
    pre = build_extractor("clip-tiny", "image", projection=False).eval()
    txt = build_extractor("clip-tiny", "text").eval()
    txt_pre = build_extractor("clip-tiny", "text", projection=False).eval()
    with torch.no_grad():
        a, b = img(images)["pooled"], pre(images)["pooled"]
        torch.testing.assert_close(b @ img.model.visual.proj, a, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(a, b)
        ids = torch.stack([txt.preprocess({"text": t}) for t in ("a red square", "a blue circle")])
        ta, tb = txt(ids)["pooled"], txt_pre(ids)["pooled"]
        torch.testing.assert_close(tb @ txt.model.text_projection, ta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(txt(ids)["tokens"], txt_pre(ids)["tokens"])  # tokens were unprojected already
    # The default keeps its spec (stores extracted before stay valid); projection=false is another store.
    assert build_extractor("clip-tiny", "image", projection=True).spec_hash() == img.spec_hash()
    assert pre.spec_hash() != img.spec_hash() and pre.spec["projection"] is False


def test_pre_projection_of_a_resnet_tower_is_refused() -> None:
    with pytest.raises(MMCacheError, match="no separate final projection"):
        build_extractor("clip-tiny", "image", projection=False, model_cfg={
            "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}})
