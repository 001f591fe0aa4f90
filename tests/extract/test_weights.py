"""Local weights pinned by content (cached sha256), the Hub reachability check, and preset option validation."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from mmcache.errors import MMCacheError
from mmcache.extract import FAMILIES, PRESETS, build_extractor
from mmcache.extract import weights as W
from mmcache.extract.runner import parse_requests


def _no_rehash(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path) -> str:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(W, "file_sha256", fail)


def test_file_hash_is_cached_in_the_user_cache_by_size_and_mtime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _user_cache: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    f = folder / "w.bin"
    f.write_bytes(b"a" * 1000)
    digest = W.weights_sha256(f)
    assert digest == hashlib.sha256(b"a" * 1000).hexdigest()
    assert os.listdir(folder) == ["w.bin"]  # nothing written beside the weights
    assert (_user_cache / W.HASH_CACHE_FILE).is_file()
    with monkeypatch.context() as m:
        _no_rehash(m)
        assert W.weights_sha256(f) == digest
    # Replaced at the same path with the same size: the new mtime forces a re-hash.
    f.write_bytes(b"b" * 1000)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert W.weights_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    # A cache that cannot be written only costs a re-hash.
    monkeypatch.setenv("XDG_CACHE_HOME", str(f))  # a file, so no folder can be made under it
    assert W.weights_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_folder_hash_covers_names_and_contents_but_not_hidden_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "model.safetensors").write_bytes(b"x" * 10)
    first = W.weights_sha256(d)
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref")
    with monkeypatch.context() as m:
        _no_rehash(m)
        assert W.weights_sha256(d) == first
    (d / "sub" / "model.safetensors").rename(d / "sub" / "other.safetensors")
    renamed = W.weights_sha256(d)
    assert renamed != first
    (d / "sub" / "other.safetensors").write_bytes(b"y" * 10)
    assert W.weights_sha256(d) not in (first, renamed)
    with pytest.raises(MMCacheError, match="not found"):
        W.weights_sha256(tmp_path / "missing")


def test_torchvision_families_share_the_cached_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    tiny = build_extractor("resnet-tiny", "image")
    path = tmp_path / "r18.pth"
    torch.save(tiny.model.state_dict(), path)
    first = build_extractor("resnet-tiny", "image", weights=str(path))
    assert first.spec["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with monkeypatch.context() as m:
        _no_rehash(m)
        assert build_extractor("resnet-tiny", "image", weights=str(path)).spec_hash() == first.spec_hash()


def test_hub_reachability_is_checked_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], timeout: float) -> socket.socket:
        calls.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(W.socket, "create_connection", refuse)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    W.hub_reachable.cache_clear()
    try:
        assert W.hub_reachable() is False and W.hub_reachable() is False
        assert calls == [("huggingface.co", 443)]
        # Behind a proxy, the proxy is what must answer.
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")
        W.hub_reachable.cache_clear()
        W.hub_reachable()
        assert calls[-1] == ("proxy.local", 3128)
    finally:
        W.hub_reachable.cache_clear()


def test_no_network_switches_the_hub_offline(offline: None) -> None:
    import huggingface_hub.constants as hub_constants

    reason = W.hub_offline()
    assert reason is not None and "cannot be reached" in reason
    assert hub_constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    assert W.hub_offline() == reason  # still said as no network, not as the user's setting


def test_every_builtin_preset_uses_only_options_its_family_takes() -> None:
    assert all(cls.options is not None for cls in FAMILIES.values()), "every built-in family declares its options"
    for name, cfg in PRESETS.items():
        cls = FAMILIES[cfg["family"]]
        extra = set(cfg) - {"family"} - set(cls.options or ())
        assert not extra, f"preset {name} has options {extra} that {cls.family} does not take"


@pytest.mark.parametrize(("store", "modality", "error"), [
    ("roberta-tiny[poolin=sum4]", "text", r"unknown option 'poolin'; roberta presets take .*max_length, model, pooling"),
    ("roberta-tiny[pooling=max]", "text", r'pooling="max" is not one of "cls", "pooler", "mean", "sum4"'),
    ("roberta-tiny[tokens=no]", "text", r'tokens="no" is not one of true, false'),
    ("clip-tiny[token=false]", "image", r"unknown option 'token'; clip presets take .*tokens"),
    ("clip-tiny[quick_gelu=1]", "image", r"quick_gelu=1 is not one of true, false"),
    ("resnet-tiny[gird=3]", "image", r"unknown option 'gird'; resnet presets take .*grid"),
    ("r3d-tiny[frame=8]", "video", r"unknown option 'frame'; r3d presets take .*frames"),
    ("frcnn-tiny[region=4]", "image", r"unknown option 'region'; frcnn presets take .*regions"),
    ("mel-tiny[mel_scale=bark]", "audio", r'mel_scale="bark" is not one of "slaney", "htk", "kaldi"'),
    ("nli-teacher-tiny[template=x]", "teacher", r"unknown option 'template'; nli-teacher presets take .*templates"),
    ("clip-teacher-tiny[use_text=maybe]", "teacher", r'use_text="maybe" is not one of true, false'),
])
def test_bad_preset_options_are_refused_before_loading(store: str, modality: str, error: str) -> None:
    (req,) = parse_requests(modality, store)
    with pytest.raises(MMCacheError, match=error):
        build_extractor(req.preset, modality, **req.overrides)


def test_good_options_still_build() -> None:
    (req,) = parse_requests("text", "rob=roberta-tiny[pooling=cls,max_length=16,tokens=false]")
    ext = build_extractor(req.preset, "text", **req.overrides)
    assert ext.spec["pooling"] == "cls" and ext.spec["tokens"] is False and ext.max_length == 16
    teacher = build_extractor("nli-teacher-tiny", "teacher", label_space={"label": ["a", "b"]}, task="label")
    assert teacher.classes == ["a", "b"]
