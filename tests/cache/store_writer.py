"""A small deterministic extraction that writes through FeatureStore; run as a script it is the process tests kill.

Usage: python store_writer.py STORE [--kill-at K]
`--kill-at K` sends SIGKILL to this process at its K-th store I/O event (a row or counter
write, which is then cut in half, or a file rename), so a test can hit any step exactly.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmcache.cache import FeatureStore

N, BATCH, CAPACITY = 240, 16, 64  # small capacity: the run grows the file twice, so kills can land in a rebuild
SPEC = {"preset": "toy", "family": "mlp", "modality": "image", "dim": 48, "tokens": 6}
IDS = [f"img{i:04d}" for i in range(N)]


def is_broken(i: int) -> bool:
    """Samples whose 'media' cannot be decoded: they are recorded as failed, never written."""
    return i % 37 == 5


class Toy(nn.Module):
    """A deterministic small encoder: pooled [B,48], tokens [B,6,24], mask [B,6]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48))
        self.tok = nn.Linear(32, 6 * 24)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode a batch of inputs."""
        return {"pooled": self.net(x), "tokens": self.tok(x).view(-1, 6, 24),
                "mask": (x[:, :6] > -0.5)}


def inputs(idx: list[int]) -> torch.Tensor:
    """The 'decoded media' of samples `idx`, a pure function of the index."""
    return torch.stack([torch.randn(32, generator=torch.Generator().manual_seed(i)) for i in idx])


def run(path: Path) -> None:
    """Extract all ids not yet done, in fixed batches of the full id list (so reruns batch identically)."""
    torch.set_num_threads(1)
    model = Toy().eval()
    with FeatureStore(path, SPEC, "toy", capacity=CAPACITY, versions={"torch": torch.__version__}) as store:
        done = store.done
        for b0 in range(0, N, BATCH):
            chunk = [i for i in range(b0, min(N, b0 + BATCH)) if IDS[i] not in done]
            ok = [i for i in chunk if not is_broken(i)]
            if ok:
                with torch.no_grad():
                    out = model(inputs(ok))
                store.write([IDS[i] for i in ok], {k: v.numpy() for k, v in out.items()})
            for i in chunk:
                if is_broken(i):
                    store.fail(IDS[i], f"cannot decode {IDS[i]}.jpg: truncated file")


def arm_kill(k: int) -> None:
    """SIGKILL this process at its k-th store I/O event (a write is cut in half first)."""
    import mmcache.cache.store as st

    count = [0]
    pwrite, replace = st._pwrite, os.replace

    def tick() -> bool:
        count[0] += 1
        return count[0] == k

    def cut_pwrite(fd: int, buf: np.ndarray, offset: int) -> None:
        if tick():
            raw = np.ascontiguousarray(buf).view(np.uint8).reshape(-1)
            pwrite(fd, raw[: len(raw) // 2], offset)
            os.kill(os.getpid(), signal.SIGKILL)
        pwrite(fd, buf, offset)

    def cut_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if tick():
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)

    st._pwrite = cut_pwrite
    st.os.replace = cut_replace  # type: ignore[attr-defined]


def count_events(path: Path) -> int:
    """Run once in this process and count the store I/O events (the range of --kill-at)."""
    import mmcache.cache.store as st

    count = [0]
    pwrite, replace = st._pwrite, os.replace

    def c_pwrite(fd: int, buf: np.ndarray, offset: int) -> None:
        count[0] += 1
        pwrite(fd, buf, offset)

    def c_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        count[0] += 1
        replace(src, dst)

    st._pwrite, st.os.replace = c_pwrite, c_replace  # type: ignore[attr-defined]
    try:
        run(path)
    finally:
        st._pwrite, st.os.replace = pwrite, replace  # type: ignore[attr-defined]
    return count[0]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("store", type=Path)
    ap.add_argument("--kill-at", type=int, default=0)
    a = ap.parse_args()
    if a.kill_at:
        arm_kill(a.kill_at)
    print("ready", flush=True)
    run(a.store)
    sys.exit(0)
