"""Public Hugging Face names (BLIP captions, VisualBERT) load from the Hugging Face cache without network."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmcache.errors import MMCacheError
from mmcache.extract.base import build_extractor
from mmcache.extract.caption import build_captioner
from mmcache.extract.visualbert import PUBLIC, tiny_bert_tokenizer

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Callable[[Path], None]], Path]:
    """HF_HUB_OFFLINE=1 and an empty HF_HUB_CACHE under tmp_path (no connection may open); returns `put(repo, save)`,
    which lays a repo out there as huggingface_hub does: blobs by sha256, snapshots/<rev>/ links, refs/main."""
    import huggingface_hub.constants as hub_constants

    from mmcache.extract import weights

    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(weights, "_switched_offline", False)

    def no_connect(self: socket.socket, *args: object) -> None:
        raise AssertionError("a test opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_connect)

    def put(repo: str, save: Callable[[Path], None]) -> Path:
        staged = tmp_path / "staged" / repo
        save(staged)
        root = cache / f"models--{repo.replace('/', '--')}"
        snap = root / "snapshots" / REV
        for f in sorted(p for p in staged.rglob("*") if p.is_file()):
            data = f.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snap / f.relative_to(staged)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(REV)
        return root

    return put


def _save_tokenizer_repo(tok: object) -> Callable[[Path], None]:
    """A tokenizer-only repo as `bert-base-uncased` is (its config.json names the model type AutoTokenizer reads)."""
    from transformers import BertConfig

    def save(d: Path) -> None:
        tok.save_pretrained(d)  # type: ignore[attr-defined]
        BertConfig(vocab_size=len(tok)).save_pretrained(d)  # type: ignore[arg-type]
    return save


def _text_batch(ext: torch.nn.Module) -> dict:
    g = torch.Generator().manual_seed(0)
    out = ext.collate([ext.preprocess({"text": t}) for t in ["the quick brown fox", "i love this picture"]])
    out["consumed"] = {"image": {"tokens": torch.randn(2, 3, 12, generator=g), "boxes": torch.rand(2, 3, 5, generator=g),
                                 "mask": torch.ones(2, 3, dtype=torch.bool)}}
    return out


def test_visualbert_public_name_loads_from_the_cache_with_its_tokenizer(hub_cache: Callable) -> None:
    src = build_extractor("visualbert-tiny", "text", visual_dim=12)
    hub_cache(PUBLIC, lambda d: src.model.save_pretrained(d))  # the public repos ship no tokenizer
    tok = tiny_bert_tokenizer(1000)
    hub_cache("bert-base-uncased", _save_tokenizer_repo(tok))
    for name in ("visualbert", f"vb=visualbert:{PUBLIC}"):
        from mmcache.finetune.run import build_encoder

        ext = build_encoder("text", name, visual_dim=12)
        assert ext.spec["model"] == PUBLIC and ext.spec["tokenizer"] == "bert-base-uncased"
        assert "weights_sha256" not in ext.spec
        got = ext.model.state_dict()
        for k, v in src.model.state_dict().items():
            assert torch.equal(got[k], v), k
        assert ext.tokenizer.get_vocab() == tok.get_vocab()
        b = _text_batch(ext)
        with torch.no_grad():
            assert torch.allclose(ext(b)["pooled"], src(_text_batch(src))["pooled"], atol=1e-5)


def test_visualbert_hub_repo_with_its_own_tokenizer_uses_it(hub_cache: Callable) -> None:
    src = build_extractor("visualbert-tiny", "text", visual_dim=12)
    own = tiny_bert_tokenizer(400)

    def save(d: Path) -> None:
        src.model.save_pretrained(d)
        own.save_pretrained(d)

    hub_cache("someorg/visualbert-memes", save)
    hub_cache("bert-base-uncased", _save_tokenizer_repo(tiny_bert_tokenizer(1000)))
    ext = build_extractor("visualbert:someorg/visualbert-memes", "text", visual_dim=12)
    assert ext.tokenizer.get_vocab() == own.get_vocab() != tiny_bert_tokenizer(1000).get_vocab()
    assert ext.spec["tokenizer"] == "someorg/visualbert-memes"


def test_visualbert_missing_tokenizer_offline_names_the_tokenizer(hub_cache: Callable) -> None:
    src = build_extractor("visualbert-tiny", "text", visual_dim=12)
    hub_cache(PUBLIC, lambda d: src.model.save_pretrained(d))
    with pytest.raises(MMCacheError) as err:
        build_extractor("visualbert", "text", visual_dim=12)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("'bert-base-uncased' is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    assert "tokenizer=/models/bert-base-uncased" in msg


def test_visualbert_missing_model_offline_is_the_one_line_hint(hub_cache: Callable) -> None:
    with pytest.raises(MMCacheError) as err:
        build_extractor("visualbert", "text", visual_dim=12)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{PUBLIC!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    assert "--text visualbert[model=/models/visualbert-vqa-coco-pre]" in msg


def test_blip_public_name_loads_from_the_cache_with_its_processor(hub_cache: Callable, demo_root: Path) -> None:
    src = build_captioner("blip-tiny", max_new_tokens=8)

    def save(d: Path) -> None:
        src.model.save_pretrained(d)
        src.processor.save_pretrained(d)

    hub_cache("Salesforce/blip-image-captioning-base", save)
    cap = build_captioner("blip", max_new_tokens=8)
    assert cap.spec["model"] == "Salesforce/blip-image-captioning-base" and "weights_sha256" not in cap.spec
    got = cap.model.state_dict()
    for k, v in src.model.state_dict().items():
        assert torch.equal(got[k], v), k
    # The processor is the repo's: its image size (32, not BLIP's default 384) and its tokenizer.
    assert cap.processor.image_processor.size == {"height": 32, "width": 32}
    assert cap.processor.tokenizer.get_vocab() == src.processor.tokenizer.get_vocab()
    image = Image.open(sorted((demo_root / "images").glob("*.jpg"))[0]).convert("RGB")
    x = cap.preprocess({"image": image}).unsqueeze(0)
    assert torch.allclose(x, src.preprocess({"image": image}).unsqueeze(0))
    with torch.no_grad():
        assert cap.generate(x) == src.generate(x)


def test_blip_missing_offline_is_the_one_line_hint(hub_cache: Callable) -> None:
    with pytest.raises(MMCacheError) as err:
        build_captioner("blip-large")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("'Salesforce/blip-image-captioning-large' is not in the Hugging Face cache and "
                          "HF_HUB_OFFLINE is set")
    assert "--caption blip-large[model=/models/blip-image-captioning-large]" in msg


def test_a_hub_model_pinned_to_a_revision_loads_that_snapshot_and_keys_the_store(hub_cache: Callable) -> None:
    """`revision=` pins a Hub model: it loads that snapshot, it is part of the spec (so features of another
    revision never mix into a store), and a revision the cache lacks is the one-line offline hint."""
    src = build_extractor("roberta-tiny", "text")

    def save(d: Path) -> None:
        src.model.save_pretrained(d)
        src.tokenizer.save_pretrained(d)

    hub_cache("org/tiny-roberta", save)
    plain = build_extractor("hf:org/tiny-roberta", "text")
    pinned = build_extractor("hf:org/tiny-roberta", "text", revision=REV)
    assert "revision" not in plain.spec and pinned.spec["revision"] == REV
    assert pinned.spec_hash() != plain.spec_hash()
    got = pinned.model.state_dict()
    for k, v in src.model.state_dict().items():
        assert torch.equal(got[k], v), k
    with pytest.raises(MMCacheError) as err:
        build_extractor("hf:org/tiny-roberta", "text", revision="f" * 40)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("'org/tiny-roberta' is not in the Hugging Face cache and HF_HUB_OFFLINE")
    # A captioner and VisualBERT take the same option.
    blip = build_captioner("blip-tiny", max_new_tokens=8)
    hub_cache("org/blip", lambda d: (blip.model.save_pretrained(d), blip.processor.save_pretrained(d)))
    assert build_captioner("blip", model="org/blip", revision=REV, max_new_tokens=8).spec["revision"] == REV


@pytest.mark.parametrize(("preset", "message"), [
    ("roberta-tiny", r"^revision=abc pins a Hugging Face Hub model; 'tiny' is a random init: drop revision$"),
    ("visualbert-tiny", r"^revision=abc pins a Hugging Face Hub model; 'tiny' is a random init"),
])
def test_a_revision_on_what_is_not_a_hub_model_is_refused(preset: str, message: str, tmp_path: Path) -> None:
    kw = {"visual_dim": 12} if preset.startswith("visualbert") else {}
    with pytest.raises(MMCacheError, match=message):
        build_extractor(preset, "text", revision="abc", **kw)
    folder = tmp_path / "rob"
    src = build_extractor("roberta-tiny", "text")
    src.model.save_pretrained(folder)
    src.tokenizer.save_pretrained(folder)
    with pytest.raises(MMCacheError, match=r"is a local folder, pinned by its weights' sha256: drop revision"):
        build_extractor(str(folder), "text", revision="abc")
