"""Teachers: per-class logits in the dataset's class order, from raw inputs only (labels never leak)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmcache.cache.store import StoreReader, store_path
from mmcache.data.base import Dataset, LabelSpace
from mmcache.errors import MMCacheError
from mmcache.extract import build_extractor
from mmcache.extract.runner import Request, extract

SPACE = {"label": ["negative", "neutral", "positive"]}


def _entity_ds(root: Path, demo_ds: Any, relabel: int = 0) -> Dataset:
    """Demo rows with an entity each; `relabel` rotates every gold label."""
    ents = ["Obama", "the station", "Apple", "Paris"]
    samples = [dataclasses.replace(s, entity=ents[i % 4], labels={"label": (s.labels["label"] + relabel) % 3})
               for i, s in enumerate(demo_ds.samples[:16])]
    return Dataset("ents", samples, LabelSpace(dict(SPACE)), root)


def test_nli_hypotheses_follow_class_order_and_entity() -> None:
    t = build_extractor("nli-teacher-tiny", "teacher", label_space={"label": ["positive", "neutral", "negative"]})
    assert t.hypotheses("Obama") == ["The mention of Obama conveys a positive opinion.",
                                     "The mention of Obama is purely objective.",
                                     "The mention of Obama conveys a negative opinion."]
    assert t.hypotheses(None)[1] == "This text is purely objective."
    with pytest.raises(MMCacheError, match="class names"):
        build_extractor("nli-teacher-tiny", "teacher")


def _logits(t: Any, decoded: list[dict[str, Any]]) -> torch.Tensor:
    with torch.inference_mode():
        return t(t.collate([t.preprocess(d) for d in decoded]))["logits"]


def test_nli_logits_are_entailment_scores_per_class() -> None:
    t = build_extractor("nli-teacher-tiny", "teacher", label_space=SPACE)
    out = _logits(t, [{"text": "i love it", "entity": "Obama"}, {"text": "i love it", "entity": "Paris"}])
    assert out.shape == (2, 3) and out.dtype == torch.float32
    assert not torch.allclose(out[0], out[1])  # the entity is part of the input
    # Column c is the entailment logit of (text, hypothesis c) run through the classifier directly.
    enc = t.tokenizer("i love it", t.hypotheses("Obama")[2], return_tensors="pt")
    with torch.inference_mode():
        direct = t.model(**enc).logits[0, t.entail_index]
    torch.testing.assert_close(out[0, 2], direct, rtol=1e-4, atol=1e-5)


def test_teacher_outputs_ignore_gold_labels(demo_ds: Any, tmp_path: Path) -> None:
    reqs = [Request("teacher", "nli", "nli-teacher-tiny"), Request("teacher", "clipt", "clip-teacher-tiny")]
    a = _entity_ds(demo_ds.root, demo_ds)
    b = _entity_ds(demo_ds.root, demo_ds, relabel=1)
    assert [s.labels for s in a.samples] != [s.labels for s in b.samples]
    for ds, cache in ((a, tmp_path / "a"), (b, tmp_path / "b")):
        sums = extract(ds, reqs, cache_dir=cache, progress=False, batch_size=5, dtype="float32")
        assert [s.written for s in sums] == [16, 16]
    for name in ("nli", "clipt"):
        ra = StoreReader(store_path(tmp_path / "a", "ents", "teacher", name))
        rb = StoreReader(store_path(tmp_path / "b", "ents", "teacher", name))
        la, lb = ra.load(a.ids())["logits"], rb.load(a.ids())["logits"]
        assert la.shape == (16, 3) and np.isfinite(la).all()
        np.testing.assert_array_equal(la, lb)
        assert ra.spec["label_space"] == SPACE  # class names, never labels, reach the teacher
        assert np.ptp(la, axis=0).max() > 0  # not a constant: it depends on the sample


def test_clip_teacher_scores_image_and_text() -> None:
    t = build_extractor("clip-teacher-tiny", "teacher", label_space=SPACE)
    assert t.inputs == ("image", "text")
    red, blue = Image.new("RGB", (40, 40), (230, 10, 10)), Image.new("RGB", (40, 40), (10, 10, 230))
    out = _logits(t, [{"image": red, "text": "i love it"}, {"image": blue, "text": "i love it"},
                      {"image": red, "text": "i hate it"}])
    assert out.shape == (3, 3)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])
    # logits = scale * cos(normalise(img + txt), prompt_c)
    m = t.model
    with torch.inference_mode():
        img = torch.nn.functional.normalize(m.encode_image(t.transform(red)[None]), dim=-1)
        txt = torch.nn.functional.normalize(m.encode_text(t.tokenizer(["i love it"])), dim=-1)
        want = m.logit_scale.exp() * torch.nn.functional.normalize(img + txt, dim=-1) @ t.prompts.t()
    torch.testing.assert_close(out[:1], want, rtol=1e-4, atol=1e-4)
    image_only = build_extractor("clip-teacher-tiny", "teacher", label_space=SPACE, use_text=False)
    assert image_only.inputs == ("image",)


def test_saved_nli_model_loads_by_path(tmp_path: Path) -> None:
    t = build_extractor("nli-teacher-tiny", "teacher", label_space=SPACE, seed=4)
    t.model.save_pretrained(tmp_path / "mnli")
    t.tokenizer.save_pretrained(tmp_path / "mnli")
    loaded = build_extractor("nli-teacher", "teacher", label_space=SPACE, model=str(tmp_path / "mnli"), max_length=48)
    d = [{"text": "the food was great", "entity": "the food"}]
    torch.testing.assert_close(_logits(loaded, d), _logits(t, d), rtol=1e-5, atol=1e-5)
