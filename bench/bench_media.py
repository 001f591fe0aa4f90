"""Video / audio decoding cost: the shared decoders vs. a plain full decode of the same files (ratios in one run).

    .venv/bin/python bench/bench_media.py [--quick]

Clips are written with PyAV to a temporary folder and deleted afterwards.
video, ours:  `decode_video` (16 frames spread over the clip, resized to a short side of 128
              by swscale while converting to RGB, decoding stops after the last wanted frame).
              FFmpeg uses 2 decoding threads.
video, plain: decode every frame to full-size RGB (one thread), pick the same 16, resize them with torch.
"held MB" is the frame memory a worker holds at its peak (all decoded RGB frames for plain).
audio, ours:  `decode_audio` (first N seconds, FFmpeg resampling to 16 kHz mono) + the `mel` preset.
audio, plain: decode the whole track at its native rate, then the same resampling and mel.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import timed  # noqa: E402
from mmcache.extract import build_extractor  # noqa: E402
from mmcache.extract.media import AudioClip, decode_audio, decode_video, uniform_indices  # noqa: E402


def write_clip(path: Path, seconds: float, fps: int = 25, width: int = 640, height: int = 360,
               rate: int = 44100) -> None:
    """An h264 clip of moving noise with a stereo AAC tone."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height, width * 2, 3), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        aus = c.add_stream("aac", rate=rate)
        aus.layout = "stereo"
        for i in range(int(seconds * fps)):
            frame = np.ascontiguousarray(base[:, i % width: i % width + width])
            for p in vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        t = np.arange(int(seconds * rate)) / rate
        x = np.tile((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), (2, 1))
        for s in range(0, x.shape[1], 1024):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, s:s + 1024]), format="fltp", layout="stereo")
            fr.sample_rate, fr.pts = rate, s
            for p in aus.encode(fr):
                c.mux(p)
        for p in aus.encode():
            c.mux(p)


def plain_video(path: Path, n: int, short: int) -> torch.Tensor:
    """Every frame decoded at full size, then the uniform subset resized with torch."""
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    picked = torch.from_numpy(np.stack([frames[i] for i in uniform_indices(len(frames), n)])).permute(0, 3, 1, 2)
    h, w = picked.shape[-2:]
    size = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    return torch.nn.functional.interpolate(picked.float(), size=size, mode="area").round().to(torch.uint8)


def plain_audio(path: Path, rate: int) -> np.ndarray:
    """The whole track decoded, resampled and averaged to mono."""
    res = av.AudioResampler(format="fltp", rate=rate)
    chunks = []
    with av.open(str(path)) as c:
        for frame in c.decode(audio=0):
            frame.pts = None
            chunks += [f.to_ndarray().mean(axis=0) for f in res.resample(frame)]
    chunks += [f.to_ndarray().mean(axis=0) for f in res.resample(None)]
    return np.concatenate(chunks)


def main() -> None:
    """Run the benchmark and print a table of ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter clips, fewer repeats")
    args = ap.parse_args()
    seconds, repeat = (8.0, 2) if args.quick else (30.0, 3)
    mel = build_extractor("mel", "audio")
    opts = {"video_frames": 16, "video_size": 128, **mel.decode_options}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        write_clip(path, seconds)
        ours_v = decode_video(path, opts)
        ref_v = plain_video(path, 16, 128)
        assert ours_v.shape[0] == ref_v.shape[0] == 16 and ours_v.shape[1:3] == ref_v.shape[2:]
        t_ours = timed(lambda: decode_video(path, opts), repeat)
        t_plain = timed(lambda: plain_video(path, 16, 128), repeat)
        held_plain = int(seconds * 25) * 360 * 640 * 3 / 2**20
        rows.append(("video 16 frames @128", t_plain, t_ours, held_plain, ours_v.numel() / 2**20))

        def ours_audio() -> None:
            mel.preprocess({"audio": decode_audio(path, opts)})

        def plain_mel() -> None:
            mel.preprocess({"audio": AudioClip(plain_audio(path, 16000), 16000)})

        t_ours = timed(ours_audio, repeat)
        t_plain = timed(plain_mel, repeat)
        secs = min(seconds, opts["audio_seconds"])
        rows.append((f"audio -> mel ({opts['audio_seconds']} s max)", t_plain, t_ours, seconds * 16000 * 4 / 2**20,
                     secs * 16000 * 4 / 2**20))
    print(f"clip: {seconds:.0f} s, 640x360 @ 25 fps h264 + AAC stereo 44.1 kHz")
    print(f"{'task':<28}{'plain s':>9}{'ours s':>9}{'speed-up':>10}{'held MB plain':>15}{'held MB ours':>14}")
    for name, plain, ours, mb_plain, mb_ours in rows:
        print(f"{name:<28}{plain:>9.3f}{ours:>9.3f}{plain / ours:>9.1f}x{mb_plain:>15.1f}{mb_ours:>14.1f}")


if __name__ == "__main__":
    main()
