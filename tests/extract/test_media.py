"""Video and audio decoders on real files written here with PyAV / wave."""

from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from mmcache.extract import DECODERS, DecodeError
from mmcache.extract.media import AudioClip, decode_audio, decode_video, uniform_indices

GRAY_STEP = 8  # frame i of a written clip is a flat gray of level GRAY_STEP * i


def write_video(path: Path, n_frames: int = 30, fps: int = 10, width: int = 64, height: int = 48,
                tone: float | None = 440.0, rate: int = 44100, codec: str = "libx264") -> Path:
    """Write a clip whose frame i is flat gray GRAY_STEP*i, with a stereo sine of `tone` Hz (None = no audio)."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            vs.options = {"crf": "0"}  # lossless, so gray levels identify frames
        else:
            vs.options = {"qscale": "1"}
        aus = None
        if tone is not None:
            aus = c.add_stream("aac", rate=rate)
            aus.layout = "stereo"
        for i in range(n_frames):
            img = np.full((height, width, 3), GRAY_STEP * i % 256, np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if aus is not None:
            t = np.arange(int(n_frames / fps * rate)) / rate
            x = np.tile((0.5 * np.sin(2 * np.pi * tone * t)).astype(np.float32), (2, 1))
            for s in range(0, x.shape[1], 1024):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, s:s + 1024]), format="fltp", layout="stereo")
                fr.sample_rate, fr.pts = rate, s
                for p in aus.encode(fr):
                    c.mux(p)
            for p in aus.encode():
                c.mux(p)
    return path


def write_wav(path: Path, channels: list[np.ndarray], rate: int) -> Path:
    """Write float channels in [-1, 1] as a 16-bit PCM wav."""
    data = (np.stack(channels, axis=1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(len(channels))
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


def frame_ids(video: torch.Tensor) -> list[int]:
    """Which written frame each decoded frame is, from its mean gray level."""
    return [round(float(f.float().mean()) / GRAY_STEP) for f in video]


def test_uniform_indices_cover_the_whole_clip() -> None:
    assert uniform_indices(30, 5) == [3, 9, 15, 21, 27]
    for total in (1, 7, 16, 30, 301, 1000):
        for n in (1, 4, 16, 30):
            idx = uniform_indices(total, n)
            seg = total / n
            assert len(idx) == n and all(0 <= i < total for i in idx)
            assert idx == sorted(idx)
            # One sample in the first and one in the last n-th of the clip: never only its start.
            assert idx[0] < max(1.0, seg) and idx[-1] >= total - max(1.0, seg)
            if total >= n:
                assert len(set(idx)) == n
    assert uniform_indices(0, 4) == [] and uniform_indices(5, 0) == []


def test_decoders_are_registered() -> None:
    assert DECODERS["video"] is decode_video
    assert DECODERS["audio"] is decode_audio


def test_video_frames_sampled_uniformly_and_shrunk(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", n_frames=30)
    v = decode_video(str(path), {"video_frames": 5, "video_size": 24})
    assert v.dtype == torch.uint8 and tuple(v.shape) == (5, 24, 32, 3)
    assert frame_ids(v) == [3, 9, 15, 21, 27]
    native = decode_video(path, {"video_frames": 3, "video_size": 0})
    assert tuple(native.shape) == (3, 48, 64, 3)
    assert frame_ids(native) == uniform_indices(30, 3)
    # Never enlarged; more frames asked than the clip has: frames repeat in order.
    more = decode_video(path, {"video_frames": 40, "video_size": 100})
    assert tuple(more.shape) == (40, 48, 64, 3)
    assert frame_ids(more) == uniform_indices(30, 40)


def test_video_without_frame_count_in_header(tmp_path: Path) -> None:
    # Matroska stores no frame count: the decoder counts packets instead.
    path = write_video(tmp_path / "clip.mkv", n_frames=20, codec="mpeg4", tone=None)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    v = decode_video(path, {"video_frames": 4})
    assert frame_ids(v) == uniform_indices(20, 4) == [2, 7, 12, 17]


def test_audio_track_of_an_mp4(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", n_frames=30, fps=10, tone=440.0)
    clip = decode_audio(path, {"audio_rate": 16000})
    assert isinstance(clip, AudioClip) and clip.rate == 16000 and clip.samples.dtype == np.float32
    assert clip.samples.ndim == 1 and abs(clip.seconds - 3.0) < 0.1
    spectrum = np.abs(np.fft.rfft(clip.samples))
    assert abs(np.argmax(spectrum) * clip.rate / len(clip.samples) - 440.0) < 2.0
    assert abs(np.abs(clip.samples[4000:-4000]).max() - 0.5) < 0.05  # mean of two equal channels
    first = decode_audio(path, {"audio_rate": 8000, "audio_seconds": 1})
    assert first.rate == 8000 and len(first.samples) == 8000


def test_wav_resampled_to_mono_mean(tmp_path: Path) -> None:
    rate = 44100
    t = np.arange(rate * 2) / rate
    tone = np.sin(2 * np.pi * 1000.0 * t)
    path = write_wav(tmp_path / "a.wav", [0.4 * tone, 0.2 * tone], rate)
    clip = decode_audio(str(path), {"audio_rate": 16000})
    assert clip.rate == 16000 and abs(len(clip.samples) - 32000) <= 32
    # Channels are averaged (0.4 and 0.2 -> 0.3), not summed at -3 dB as FFmpeg's mono downmix would.
    assert abs(np.abs(clip.samples[1000:-1000]).max() - 0.3) < 0.01
    spectrum = np.abs(np.fft.rfft(clip.samples))
    assert abs(np.argmax(spectrum) * 16000 / len(clip.samples) - 1000.0) < 2.0


@pytest.mark.parametrize("decoder", [decode_video, decode_audio])
def test_bad_files_raise_decode_error_with_reason(tmp_path: Path, decoder) -> None:
    field = "video" if decoder is decode_video else "audio"
    with pytest.raises(DecodeError, match="not found"):
        decoder(str(tmp_path / "missing.mp4"), {})
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(DecodeError, match="empty"):
        decoder(tmp_path / "empty.mp4", {})
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DecodeError, match=r"junk\.mp4.*cannot decode"):
        decoder(tmp_path / "junk.mp4", {})
    good = write_video(tmp_path / "good.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 2])  # truncated: the index is at the end
    with pytest.raises(DecodeError, match=r"cut\.mp4"):
        decoder(tmp_path / "cut.mp4", {})
    with pytest.raises(DecodeError, match=f"no {field} path"):
        decoder(None, {})


def test_missing_stream_is_a_decode_error(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "a.wav", [np.zeros(1600)], 16000)
    with pytest.raises(DecodeError, match="no video stream"):
        decode_video(wav, {})
    silent = write_video(tmp_path / "silent.mp4", tone=None)
    with pytest.raises(DecodeError, match="no audio track"):
        decode_audio(silent, {})


def test_header_overcounting_frames_still_spans_the_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Some containers claim more frames than decode; sampling falls back to the frames really there.
    import mmcache.extract.media as media

    path = write_video(tmp_path / "clip.mp4", n_frames=30, tone=None)
    monkeypatch.setattr(media, "_count_video_frames", lambda p: 50)
    v = decode_video(path, {"video_frames": 5})
    assert frame_ids(v) == uniform_indices(30, 5)
