"""`mel` family: values against a direct numpy computation, tone placement, padding mask, decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmcache.errors import MMCacheError
from mmcache.extract import DECODERS, build_extractor
from mmcache.extract.media import AudioClip
from mmcache.extract.mel import MelExtractor
from tests.extract.test_media import write_video, write_wav

SR = 16000


def tone(freq: float, seconds: float, amp: float = 0.5, rate: int = SR) -> np.ndarray:
    """A sine wave."""
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    """Inverse of the HTK mel scale."""
    return 700.0 * (10 ** (m / 2595.0) - 1.0)


def direct_log_mel(x: np.ndarray, n_fft: int, hop: int, n_mels: int, top_db: float | None) -> np.ndarray:
    """Log-mel by hand: zero-padded centred frames, periodic Hann, |rfft|^2, HTK triangles, dB."""
    pad = np.pad(x.astype(np.float64), n_fft // 2)
    n_frames = 1 + (len(pad) - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([pad[i * hop: i * hop + n_fft] * window for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [T, n_fft//2+1]
    freqs = np.arange(n_fft // 2 + 1) * SR / n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SR / 2), n_mels + 2))
    fb = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        fb[:, m] = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    db = 10 * np.log10(np.maximum(power @ fb, 1e-10))
    return np.maximum(db, db.max() - top_db) if top_db else db


def htk(**overrides: object) -> MelExtractor:
    """The tiny preset with the HTK scale and unnormalised filters (the direct computation's)."""
    ext = build_extractor("mel-tiny", "audio", mel_scale="htk", norm="none", **overrides)
    assert isinstance(ext, MelExtractor)
    return ext


def encode(ext: MelExtractor, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
    return ext(ext.collate([ext.preprocess({"audio": AudioClip(w, SR)}) for w in waves]))


def test_values_match_a_direct_computation() -> None:
    ext = htk(n_mels=24, n_fft=256, hop=128, max_frames=200, top_db=80.0)
    rng = np.random.default_rng(0)
    x = (0.3 * tone(700.0, 1.0) + 0.05 * rng.standard_normal(SR)).astype(np.float32)
    out = ext.preprocess({"audio": AudioClip(x, SR)})
    n = 1 + SR // 128
    assert int(out["mask"].sum()) == n and out["mask"][:n].all()
    ref = direct_log_mel(x, 256, 128, 24, 80.0)
    assert ref.shape == (n, 24)
    np.testing.assert_allclose(out["tokens"][:n].numpy(), ref, atol=2e-3, rtol=0)
    assert (out["tokens"][n:] == 0).all()


def test_pure_tone_peaks_in_its_mel_bin() -> None:
    n_mels = 32
    ext = htk(n_mels=n_mels, n_fft=512, hop=256, max_frames=100)
    centres = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SR / 2), n_mels + 2))[1:-1]
    for freq in (300.0, 1000.0, 3500.0):
        tokens = encode(ext, [tone(freq, 1.0)])["tokens"][0, 5:50]  # frames well inside the tone
        expected = int(np.argmin(np.abs(centres - freq)))
        assert (tokens.argmax(dim=1) == expected).all(), freq


def test_padding_mask_and_masked_mean() -> None:
    ext = build_extractor("mel-tiny", "audio")  # 16 mels, hop 128, 32 frames
    short, long = tone(440.0, 0.1), tone(440.0, 2.0)
    out = encode(ext, [short, long, np.zeros(100, np.float32)])
    assert tuple(out["tokens"].shape) == (3, 32, 16) and out["tokens"].dtype == torch.float32
    assert tuple(out["pooled"].shape) == (3, 16) and out["mask"].dtype == torch.bool
    assert out["mask"].sum(1).tolist() == [1 + 1600 // 128, 32, 1]
    for i in range(3):
        n = int(out["mask"][i].sum())
        torch.testing.assert_close(out["pooled"][i], out["tokens"][i, :n].mean(0))
        assert (out["tokens"][i, n:] == 0).all()


def test_truncation_keeps_the_first_frames() -> None:
    x = tone(1200.0, 3.0) * np.linspace(0.1, 1.0, 3 * SR, dtype=np.float32)
    full = htk(max_frames=1000, top_db=0).preprocess({"audio": AudioClip(x, SR)})
    cut = htk(max_frames=50, top_db=0).preprocess({"audio": AudioClip(x, SR)})
    assert cut["mask"].all() and int(full["mask"].sum()) == 1 + 3 * SR // 128
    torch.testing.assert_close(cut["tokens"], full["tokens"][:50], atol=1e-4, rtol=1e-4)


def test_clip_normalisation() -> None:
    out = build_extractor("mel-tiny", "audio", normalize="clip").preprocess({"audio": AudioClip(tone(500.0, 0.5), SR)})
    real = out["tokens"][out["mask"]]
    assert abs(float(real.mean())) < 1e-4 and abs(float(real.std(unbiased=False)) - 1) < 1e-3
    with pytest.raises(MMCacheError, match="normalize"):
        build_extractor("mel-tiny", "audio", normalize="global")


def test_decode_options_cover_max_frames() -> None:
    ext = build_extractor("mel", "audio")
    assert ext.config["n_mels"] == 64 and ext.dim == 64
    opts = ext.decode_options
    assert opts["audio_rate"] == SR
    # 300 frames of hop 512 at 16 kHz reach 9.6 s (+ half a window).
    assert opts["audio_seconds"] * SR >= 299 * 512 + 512 and opts["audio_seconds"] <= 12


def test_from_files_through_the_decoder(tmp_path: Path) -> None:
    ext = htk(n_mels=32, n_fft=512, hop=256, max_frames=40)
    centres = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SR / 2), 34))[1:-1]
    rate = 44100
    t = np.arange(rate) / rate
    wav = write_wav(tmp_path / "a.wav", [0.5 * np.sin(2 * np.pi * 2000.0 * t)] * 2, rate)
    mp4 = write_video(tmp_path / "v.mp4", n_frames=20, fps=10, tone=2000.0)
    for path in (wav, mp4):
        clip = DECODERS["audio"](str(path), ext.decode_options)
        out = ext(ext.collate([ext.preprocess({"audio": clip})]))
        assert out["mask"].all()
        peaks = out["tokens"][0, 5:35].argmax(dim=1)
        assert (peaks == int(np.argmin(np.abs(centres - 2000.0)))).all(), path.name


def test_wrong_sample_rate_is_a_user_error() -> None:
    with pytest.raises(MMCacheError, match="16000 Hz"):
        build_extractor("mel-tiny", "audio").preprocess({"audio": AudioClip(tone(440.0, 0.5, rate=8000), 8000)})
