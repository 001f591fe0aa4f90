"""How much memory this process may really use, and whether cached features fit in it.

`available_bytes()` is the smallest of the machine's `MemAvailable` (/proc/meminfo) and, for every memory cgroup
the process sits in (cgroup v2, and v1's `memory` controller, each level of the hierarchy up to the root), the
cgroup's limit minus what it uses, page cache that can be dropped (`inactive_file`) not counted as used. So a
container's limit counts, not only the machine's total.

`choose_load(mode, need, what)` turns `--load auto|memory|stream` into `memory` or `stream` for features of
`need` bytes: `auto` keeps them in memory when they take at most `FIT_SHARE` of what is available, `memory` on
data that cannot fit is one line naming the bytes needed, the bytes available and `--load stream`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmcache.errors import MMCacheError

LOADS = ("auto", "memory", "stream")
FIT_SHARE = 0.5  # `auto` keeps rows in memory when they take at most this share of the available memory
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _levels(path: str) -> list[str]:
    """A cgroup path and each of its parents, `/a/b` -> `/a/b`, `/a`, `/`."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_available(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the memory cgroups of this process still allow (the smallest over every level), None when none
    limits it."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and (root / "cgroup.controllers").exists():  # cgroup v2, the unified hierarchy
            base, limit_f, usage_f, inactive = root, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):  # cgroup v1's memory controller
            base, limit_f, usage_f, inactive = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", \
                "total_inactive_file"
        else:
            continue
        for level in _levels(path):
            d = base / level.lstrip("/")
            limit = _read_int(d / limit_f)
            if limit is None:
                continue
            usage = _read_int(d / usage_f) or 0
            free = max(0, limit - max(0, usage - _stat(d / "memory.stat", inactive)))
            best = free if best is None else min(best, free)
    return best


def meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's estimate of memory available without swapping (`MemAvailable`), None where unknown."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes() -> int:
    """What this process may still allocate: the machine's available memory and every cgroup limit it is under."""
    known = [v for v in (meminfo_available(), cgroup_available()) if v is not None]
    if not known:  # not Linux: the physical memory, as far as the OS tells
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return _UNLIMITED
    return min(known)


def gb(n: float) -> str:
    """Bytes as GB with one decimal (two below 1 GB)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e9:.2f} GB"


def choose_load(mode: str, need: int, what: str, available: int | None = None) -> str:
    """`memory` or `stream` for `--load mode` on features of `need` bytes (`what` names them in the refusal)."""
    if mode not in LOADS:
        raise MMCacheError(f"--load {mode!r} is not a loading mode; use one of {', '.join(LOADS)}")
    if mode == "stream":
        return "stream"
    have = available_bytes() if available is None else available
    if mode == "memory":
        if need > have:
            raise MMCacheError(f"--load memory: {what} need {gb(need)} in memory, but only {gb(have)} is available to "
                               "this process (container limits included); use --load stream (or auto) to read "
                               "batches from the stores instead")
        return "memory"
    return "memory" if need <= FIT_SHARE * have else "stream"
