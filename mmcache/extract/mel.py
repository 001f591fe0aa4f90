"""`mel` family: log-mel spectrograms of the audio track (no weights), for audio heads.

The waveform comes from the shared `audio` decoder (PyAV, resampled to mono at the
preset's rate); the spectrogram is computed with `transformers.audio_utils` in the
DataLoader worker. Stored as `tokens [T,n_mels]` (time frames, zero-padded to
`max_frames`), `mask [T]` (True = a real frame) and `pooled [n_mels]` (masked mean over time).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmcache.errors import MMCacheError
from mmcache.extract.base import Extractor, register_family, register_preset
from mmcache.extract.media import DEFAULT_AUDIO_RATE, AudioClip, seconds_for_frames

NORMALIZE = ("none", "clip")


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of tokens [B,T,d] over the real positions of mask [B,T] (at least one counted)."""
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)


@register_family("mel")
class MelExtractor(Extractor):
    """Log-mel spectrogram (dB, as librosa's power_to_db) of the first `max_frames` STFT frames.

    Config: sample_rate, n_mels, n_fft, win_length (Hann window, zero-padded to n_fft), hop,
    max_frames, f_min, f_max (None = Nyquist), mel_scale / norm ("slaney" = librosa's
    defaults, or "htk" / "none"), top_db (dynamic range floor, 0 = off), normalize
    ("none", or "clip" = z-score over each clip's real frames).
    """

    modalities = ("audio",)
    options = ("sample_rate", "n_mels", "n_fft", "win_length", "hop", "max_frames", "f_min", "f_max", "mel_scale",
               "norm", "top_db", "normalize")
    choices = {"mel_scale": ("slaney", "htk", "kaldi"), "norm": ("slaney", "none", None), "normalize": NORMALIZE}

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__(preset, config, modality)
        from transformers.audio_utils import mel_filter_bank, window_function

        cfg = self.config
        cfg.setdefault("sample_rate", DEFAULT_AUDIO_RATE)
        cfg.setdefault("n_mels", 64)
        cfg.setdefault("n_fft", 1024)
        cfg.setdefault("win_length", cfg["n_fft"])
        cfg.setdefault("hop", 512)
        cfg.setdefault("max_frames", 300)
        cfg.setdefault("f_min", 0.0)
        cfg.setdefault("f_max", None)
        cfg.setdefault("mel_scale", "slaney")
        cfg.setdefault("norm", "slaney")
        cfg.setdefault("top_db", 80.0)
        cfg.setdefault("normalize", "none")
        if cfg["normalize"] not in NORMALIZE:
            raise MMCacheError(f"preset {preset!r}: normalize must be one of {NORMALIZE}, not {cfg['normalize']!r}")
        if int(cfg["win_length"]) > int(cfg["n_fft"]):
            raise MMCacheError(f"preset {preset!r}: win_length {cfg['win_length']} exceeds n_fft {cfg['n_fft']}")
        sr, n_fft = int(cfg["sample_rate"]), int(cfg["n_fft"])
        f_max = float(cfg["f_max"]) if cfg["f_max"] is not None else sr / 2
        self.window = window_function(int(cfg["win_length"]), "hann", frame_length=n_fft)
        # [n_fft//2+1, n_mels]; numpy so the extractor pickles cheaply into DataLoader workers.
        self.filters = mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1, num_mel_filters=int(cfg["n_mels"]), min_frequency=float(cfg["f_min"]),
            max_frequency=f_max, sampling_rate=sr, norm=None if cfg["norm"] in (None, "none") else cfg["norm"],
            mel_scale=cfg["mel_scale"],
        )

    @property
    def dim(self) -> int:
        """Width of `pooled` and of each token (n_mels)."""
        return int(self.config["n_mels"])

    @property
    def decode_options(self) -> dict[str, int]:
        """The decoder's rate, and enough seconds of audio for `max_frames` frames."""
        cfg = self.config
        return {"audio_rate": int(cfg["sample_rate"]),
                "audio_seconds": seconds_for_frames(int(cfg["max_frames"]), int(cfg["hop"]), int(cfg["n_fft"]),
                                                    int(cfg["sample_rate"]))}

    def log_mel(self, samples: np.ndarray) -> np.ndarray:
        """Mono waveform at `sample_rate` -> log-mel [frames, n_mels] (float32), at most `max_frames` frames."""
        from transformers.audio_utils import power_to_db, spectrogram

        cfg = self.config
        hop, n_fft, max_frames = int(cfg["hop"]), int(cfg["n_fft"]), int(cfg["max_frames"])
        # Frames past max_frames are dropped anyway: don't transform the samples behind them.
        samples = samples[: (max_frames - 1) * hop + n_fft // 2 + 1]
        power = spectrogram(
            samples.astype(np.float32, copy=False), self.window, frame_length=n_fft, hop_length=hop, fft_length=n_fft,
            power=2.0, center=True, pad_mode="constant", mel_filters=self.filters, mel_floor=1e-10,
            dtype=np.dtype(np.float64),
        )[:, :max_frames]
        # dB after the frame cut, so the top_db floor depends on the kept frames only.
        top_db = cfg["top_db"]
        db = power_to_db(power, reference=1.0, min_value=1e-10, db_range=float(top_db) if top_db else None)
        return np.ascontiguousarray(db.T, dtype=np.float32)

    def preprocess(self, decoded: dict[str, Any]) -> dict[str, torch.Tensor]:
        """AudioClip -> {"tokens": [max_frames, n_mels] zero-padded, "mask": [max_frames] bool}."""
        clip = decoded["audio"]
        sr = int(self.config["sample_rate"])
        if isinstance(clip, AudioClip):
            if clip.rate != sr:
                raise MMCacheError(f"preset {self.preset!r} needs audio at {sr} Hz but the decoder gave "
                                   f"{clip.rate} Hz; extract audio presets of one sample rate per run")
            samples = clip.samples
        else:
            samples = np.asarray(clip, dtype=np.float32).reshape(-1)
        mel = self.log_mel(samples)
        if self.config["normalize"] == "clip":
            mel = (mel - mel.mean()) / max(float(mel.std()), 1e-5)
        max_frames, n_mels = int(self.config["max_frames"]), int(self.config["n_mels"])
        tokens = torch.zeros(max_frames, n_mels, dtype=torch.float32)
        tokens[: len(mel)] = torch.from_numpy(mel)
        mask = torch.zeros(max_frames, dtype=torch.bool)
        mask[: len(mel)] = True
        return {"tokens": tokens, "mask": mask}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """{"tokens": [B,T,n_mels], "mask": [B,T]} -> pooled [B,n_mels] (masked mean over time), tokens, mask."""
        tokens, mask = batch["tokens"].float(), batch["mask"].bool()
        return {"pooled": masked_mean(tokens, mask), "tokens": tokens, "mask": mask}


# The MELD reference's front end: 64 mels, n_fft 1024, hop 512 at 16 kHz (32 ms), 300 frames (9.6 s).
register_preset("mel", "mel", sample_rate=16000, n_mels=64, n_fft=1024, hop=512, max_frames=300)
# Speech-style front end: 25 ms window, 10 ms hop, 80 mels, 10 s.
register_preset("mel-speech", "mel", sample_rate=16000, n_mels=80, n_fft=512, win_length=400, hop=160,
                max_frames=1000)
# Tests and smoke runs: small spectrograms.
register_preset("mel-tiny", "mel", sample_rate=16000, n_mels=16, n_fft=256, hop=128, max_frames=32)
