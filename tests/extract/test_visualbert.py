"""The visualbert family: text tokens + stored image regions through transformers' VisualBertModel."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.extract.base import build_extractor
from mmcache.finetune.run import build_encoder


def _batch(ext: torch.nn.Module, n: int = 2, dim: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = ext.collate([ext.preprocess({"text": t}) for t in ["the quick brown fox", "i love this picture"][:n]])
    mask = torch.tensor([[True, True, False], [True, True, True]])[:n]
    out["consumed"] = {"image": {"tokens": torch.randn(n, 3, dim, generator=g), "boxes": torch.rand(n, 3, 5, generator=g),
                                 "mask": mask}}
    return out


def test_outputs_cover_text_and_regions_and_boxes_are_positions() -> None:
    ext = build_extractor("visualbert-tiny", "text", visual_dim=12)
    batch = _batch(ext)
    with torch.no_grad():
        out = ext(batch)
    T = ext.max_length
    # BERT's layout: [CLS] text [SEP] (the pooler reads the [CLS] position).
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert ids[0] == ext.tokenizer.cls_token_id and ids[-1] == ext.tokenizer.sep_token_id and len(ids) == 6
    assert out["pooled"].shape == (2, 64) and out["tokens"].shape == (2, T + 3, 64)
    # The mask is the text's attention mask followed by the regions' mask.
    assert torch.equal(out["mask"][:, T:], batch["consumed"]["image"]["mask"])
    assert torch.equal(out["mask"][:, :T], batch["attention_mask"].bool())
    # The box projection starts at zero (a pretrained checkpoint starts unchanged), then boxes move the output.
    moved = {**batch, "consumed": {"image": {**batch["consumed"]["image"], "boxes": torch.rand(2, 3, 5)}}}
    with torch.no_grad():
        assert torch.allclose(ext(moved)["pooled"], out["pooled"], atol=1e-6)
        torch.nn.init.normal_(ext.box_proj.weight)
        assert not torch.allclose(ext(moved)["pooled"], ext(batch)["pooled"], atol=1e-4)
    # A padded region does not change the output.
    junk = {**batch, "consumed": {"image": {**batch["consumed"]["image"]}}}
    junk["consumed"]["image"]["tokens"] = batch["consumed"]["image"]["tokens"].clone()
    junk["consumed"]["image"]["tokens"][0, 2] += 100.0
    with torch.no_grad():
        assert torch.allclose(ext(junk)["pooled"][0], ext(batch)["pooled"][0], atol=1e-5)
    no_boxes = build_extractor("visualbert-tiny", "text", visual_dim=12, boxes=False)
    assert no_boxes.box_proj is None and no_boxes.spec_hash() != ext.spec_hash()


def test_needs_regions_at_build_and_forward() -> None:
    with pytest.raises(MMCacheError, match="--image-store NAME"):
        build_extractor("visualbert-tiny", "text")
    ext = build_encoder("text", "visualbert-tiny", visual_dim=12)
    batch = _batch(ext)
    del batch["consumed"]
    with pytest.raises(MMCacheError, match="--image-store"):
        ext(batch)
    with pytest.raises(MMCacheError, match="built for 12-d regions, the store gives 7-d"):
        ext(_batch(ext, dim=7))


def test_local_folder_with_another_region_width_gets_a_new_projection(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    src = build_extractor("visualbert-tiny", "text", visual_dim=12)
    folder = tmp_path / "vb"
    src.model.save_pretrained(folder)
    src.tokenizer.save_pretrained(folder)
    for name in (f"vb=visualbert:{folder}", f"visualbert[model={folder}]"):
        same = build_encoder("text", name, visual_dim=12)
        assert same.spec["model"] == str(folder) and "weights_sha256" in same.spec
        for k, v in src.model.state_dict().items():
            assert torch.equal(same.model.state_dict()[k], v), k
        b = _batch(same)
        with torch.no_grad():
            assert torch.allclose(same(b)["pooled"], src(b)["pooled"], atol=1e-5)
    wider = build_encoder("text", f"vb=visualbert:{folder}", visual_dim=20)
    assert "trained on 12-d region features, the store holds 20-d" in capsys.readouterr().err
    assert wider.model.embeddings.visual_projection.weight.shape == (64, 20)
    # Everything but the visual projection comes from the folder.
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(wider.model.state_dict()[key], src.model.state_dict()[key])
    with pytest.raises(MMCacheError, match="not found"):
        build_encoder("text", f"visualbert[model={tmp_path / 'none'}]", visual_dim=12)


def test_public_name_offline_fails_fast_in_one_line(offline: None) -> None:
    t0 = time.perf_counter()
    with pytest.raises(MMCacheError) as err:
        build_extractor("visualbert", "text", visual_dim=1024)
    msg = str(err.value)
    assert time.perf_counter() - t0 < 10 and "\n" not in msg
    assert "uclanlp/visualbert-vqa-coco-pre" in msg and "--text visualbert[model=/models/visualbert-vqa-coco-pre]" in msg
