"""The transformers text family: poolings, padding masks, tiny tokenizer, loading a saved model by path."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.extract import build_extractor, resolve_preset
from mmcache.extract.roberta import RobertaExtractor, tiny_tokenizer

TEXTS = ["i love this", "we hate the logo at the station today", ""]


def _run(ext: RobertaExtractor, texts: list[str] = TEXTS) -> tuple[dict, dict]:
    batch = ext.collate([ext.preprocess({"text": t}) for t in texts])
    with torch.inference_mode():
        return ext(batch), batch


def test_tiny_tokenizer_is_deterministic_and_roberta_shaped() -> None:
    tiny_tokenizer.cache_clear()
    a = tiny_tokenizer()(TEXTS[1])["input_ids"]
    tiny_tokenizer.cache_clear()
    b = tiny_tokenizer()(TEXTS[1])["input_ids"]
    assert a == b and a[0] == 0 and a[-1] == 2  # <s> ... </s>


def test_poolings_shapes_and_masks() -> None:
    ext = build_extractor("roberta-tiny", "text")
    out, batch = _run(ext)
    assert out["pooled"].shape == (3, 64) and out["tokens"].shape == (3, 32, 64)
    assert out["mask"].dtype == torch.bool and out["mask"].sum(1).tolist() == batch["attention_mask"].sum(1).tolist()
    assert out["mask"][2].sum() == 2  # empty text: <s></s>
    m = out["mask"].unsqueeze(-1).float()
    torch.testing.assert_close(out["pooled"], (out["tokens"] * m).sum(1) / m.sum(1))
    # Padding never changes a pooled vector: the same text alone (shorter padding) gives the same result.
    solo = build_extractor("roberta-tiny", "text", max_length=16)
    torch.testing.assert_close(_run(solo, TEXTS[:1])[0]["pooled"], out["pooled"][:1], rtol=1e-4, atol=1e-5)

    model = ext.model
    with torch.inference_mode():
        hs = model(**{k: v for k, v in batch.items()}, output_hidden_states=True)
    cls, _ = _run(build_extractor("roberta-tiny", "text", pooling="cls"))
    torch.testing.assert_close(cls["pooled"], hs.last_hidden_state[:, 0])
    pooler, _ = _run(build_extractor("roberta-tiny", "text", pooling="pooler"))
    torch.testing.assert_close(pooler["pooled"], hs.pooler_output)
    sum4, _ = _run(build_extractor("roberta-tiny", "text", pooling="sum4"))
    s = torch.stack(hs.hidden_states[-4:]).sum(0)
    torch.testing.assert_close(sum4["pooled"], (s * m).sum(1) / m.sum(1))
    assert len({round(float(x["pooled"][0, 0]), 5) for x in (out, cls, pooler, sum4)}) == 4
    with pytest.raises(MMCacheError, match="pooling"):
        build_extractor("roberta-tiny", "text", pooling="max")


def test_truncation_to_max_length() -> None:
    out, batch = _run(build_extractor("roberta-tiny", "text", max_length=8), ["word " * 50])
    assert out["tokens"].shape == (1, 8, 64) and bool(out["mask"].all()) and batch["input_ids"][0, -1] == 2


def test_saved_model_loads_by_local_path(tmp_path: Path) -> None:
    ext = build_extractor("roberta-tiny", "text", seed=5)
    ext.model.save_pretrained(tmp_path / "m")
    ext.tokenizer.save_pretrained(tmp_path / "m")
    for name in (str(tmp_path / "m"), f"roberta:{tmp_path / 'm'}"):
        canonical, cfg = resolve_preset(name)
        assert cfg["family"] == "roberta" and cfg["model"] == str(tmp_path / "m")
        loaded = build_extractor(name, "text", max_length=32)
        got, _ = _run(loaded)
        want, _ = _run(ext)
        torch.testing.assert_close(got["pooled"], want["pooled"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["tokens"], want["tokens"], rtol=1e-5, atol=1e-5)
    with pytest.raises(MMCacheError, match="save_pretrained"):
        build_extractor(f"roberta:{tmp_path / 'nothing-here'}", "text")


def test_a_local_folder_is_pinned_by_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ext = build_extractor("roberta-tiny", "text", seed=5)
    folder = tmp_path / "m"
    ext.model.save_pretrained(folder)
    ext.tokenizer.save_pretrained(folder)
    first = build_extractor(f"roberta:{folder}", "text")
    assert first.spec["model"] == str(folder) and len(first.spec["weights_sha256"]) == 64
    # Other weights saved into the same folder: the same path, a new spec hash (never the old store).
    build_extractor("roberta-tiny", "text", seed=6).model.save_pretrained(folder)
    for f in folder.iterdir():
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = build_extractor(f"roberta:{folder}", "text")
    assert second.spec["weights_sha256"] != first.spec["weights_sha256"]
    assert second.spec_hash() != first.spec_hash()
    # A relative path is recorded absolute, so the spec names the same folder from any working directory.
    monkeypatch.chdir(tmp_path)
    assert build_extractor("roberta-tiny", "text", model="./m").spec["model"] == str(folder)


@pytest.mark.parametrize(("preset", "modality", "hint"), [
    ("roberta[model=mmcache-test/no-such-model]", "text", "--text roberta[model=/models/no-such-model]"),
    ("rob=roberta:mmcache-test/no-such-model", "context", "--context NAME=roberta:/models/no-such-model"),
    ("nli-teacher[model=mmcache-test/no-such-mnli]", "teacher", "--teacher nli-teacher[model=/models/no-such-mnli]"),
])
def test_offline_fails_fast_in_one_line(preset: str, modality: str, hint: str, offline: None) -> None:
    from mmcache.extract.runner import parse_requests

    (req,) = parse_requests(modality, preset)
    extra = {"label_space": {"label": ["a", "b"]}} if modality == "teacher" else {}
    t0 = time.perf_counter()
    with pytest.raises(MMCacheError) as err:
        build_extractor(req.preset, modality, **req.overrides, **extra)
    msg = str(err.value)
    assert time.perf_counter() - t0 < 10 and "\n" not in msg
    assert "not in the Hugging Face cache" in msg and "no network" in msg and hint in msg
    assert "set HF_HUB_OFFLINE=1" in msg
