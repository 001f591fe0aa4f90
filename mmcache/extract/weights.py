"""Where encoder weights come from: content hashes of local weight files and folders, and the Hub's reachability.

Every family that loads a local file or folder puts `weights_sha256` in its spec, so a file replaced at
the same path gives a new spec hash (and never resumes into the old store). Hashes are cached by
(size, mtime) in the user cache dir (`$XDG_CACHE_HOME/mmcache`, default `~/.cache/mmcache`), so a 1 GB
checkpoint is read once, not on every run; nothing is ever written beside the weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mmcache.errors import MMCacheError
from mmcache.utils import file_sha256

HASH_CACHE_FILE = "sha256.json"
HUB_URL = "https://huggingface.co"
HUB_CHECK_TIMEOUT_S = 2.0
# Set once this process found no network and turned the Hub's offline mode on (so errors say why).
_switched_offline = False


def user_cache_dir() -> Path:
    """mmcache's own cache folder: `$XDG_CACHE_HOME/mmcache`, default `~/.cache/mmcache`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmcache"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    # Atomic replace: a concurrent reader sees the old or the new file, never half of one. A cache
    # that cannot be written (read-only home) only costs a re-hash next time.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sha256-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _files_of(folder: Path) -> list[Path]:
    """Regular files under `folder`, sorted; hidden entries (.git, .cache download metadata) are left out."""
    out: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(out)


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a weights file, or of a folder's files (names and contents); cached by size and mtime.

    A folder (a Hugging Face `save_pretrained` folder, an open_clip `local-dir:`) hashes every file in
    it, config and tokenizer included, since they all shape the features.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise MMCacheError(f"weights {p} not found; pass an existing file or folder")
    cache_path = user_cache_dir() / HASH_CACHE_FILE
    cache = _read_cache(cache_path)
    changed = False

    def one(f: Path) -> str:
        nonlocal changed
        st = f.stat()
        key = str(f.resolve())
        hit = cache.get(key)
        if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return str(hit["sha256"])
        digest = file_sha256(f)
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        changed = True
        return digest

    if p.is_dir():
        files = _files_of(p)
        if not files:
            raise MMCacheError(f"weights folder {p} is empty; pass the folder written by save_pretrained")
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(p).as_posix()}\0{one(f)}\n".encode())
        digest = h.hexdigest()
    else:
        digest = one(p)
    if changed:
        # Re-read just before writing, so hashes another process added meanwhile are kept; drop deleted files.
        merged = {**_read_cache(cache_path), **cache}
        _write_cache(cache_path, {k: v for k, v in merged.items() if os.path.exists(k)})
    return digest


def _hub_address() -> tuple[str, int]:
    """Host and port a download would connect to: the https proxy when one is set, else the Hub endpoint."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(var):
            u = urlsplit(os.environ[var] if "://" in os.environ[var] else f"http://{os.environ[var]}")
            return u.hostname or "", u.port or 80
    u = urlsplit(os.environ.get("HF_ENDPOINT") or HUB_URL)
    return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether a TCP connection to the Hugging Face Hub (or the https proxy) opens within ~2 s; asked once per process."""
    host, port = _hub_address()
    ok = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_CHECK_TIMEOUT_S).close()
            ok.set()
        except OSError:
            pass

    # A thread bounds the wait: a resolver that never answers would block getaddrinfo past the socket timeout.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(HUB_CHECK_TIMEOUT_S + 0.5)
    return ok.is_set()


def hub_offline() -> str | None:
    """Why the Hub must not be asked (HF_HUB_OFFLINE is set, or it cannot be reached), or None when it can.

    With no network, the process is switched to the Hub's offline mode, so models already in the
    Hugging Face cache load at once and missing ones fail in seconds instead of after long retries.
    """
    import huggingface_hub.constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        # Set by the user, or by an earlier call of this process that found no network.
        return _no_network() if _switched_offline else "HF_HUB_OFFLINE is set"
    if hub_reachable():
        return None
    _switch_offline()
    return _no_network()


def _switch_offline() -> None:
    global _switched_offline
    import huggingface_hub.constants as hub_constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # decoding workers started later inherit it
    hub_constants.HF_HUB_OFFLINE = True
    _switched_offline = True


def _no_network() -> str:
    return f"{_hub_address()[0]} cannot be reached (no network)"


def offline_hint(what: str, reason: str, local: str) -> str:
    """The one line said when `what` is not in the Hugging Face cache and the Hub cannot be used (`reason`)."""
    tail = "" if reason.startswith("HF_HUB_OFFLINE") else "; set HF_HUB_OFFLINE=1 to skip the network check"
    return (f"{what} is not in the Hugging Face cache and {reason}: download it on a machine with network "
            f"and pass the local copy, e.g. {local}{tail}")


def is_model_folder(name: str) -> bool:
    """A model given as a folder path (`/models/x`, `./x`, `~/x`), not a Hugging Face id (`org/name`)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name)


def model_folder(name: str, holds: str = "") -> bool:
    """Whether model `name` is given as a folder (`is_model_folder`); a folder that does not exist is an error.
    `holds` says in the message what the folder holds (e.g. "model and tokenizer")."""
    local = is_model_folder(name)
    if local and not os.path.isdir(os.path.expanduser(name)):
        raise MMCacheError(f"model folder {name} not found; pass the folder written by save_pretrained"
                           + (f" ({holds})" if holds else ""))
    return local


def hub_revision(cfg: dict[str, Any], name: str, local: bool) -> str | None:
    """The preset's `revision` option pinning Hub model `name` (a commit sha, tag or branch, e.g.
    `roberta[revision=8b9a8a1]`), None when not set (the Hub's `main`). The option is part of the store's spec,
    so features of another revision never mix into the store. A local folder is pinned by its
    `weights_sha256` instead: `revision` on one is refused."""
    rev = cfg.get("revision")
    if rev is None:
        return None
    if not isinstance(rev, str) or not rev.strip():
        raise MMCacheError(f"revision={rev!r}: give a Hub commit sha, tag or branch, e.g. revision=main")
    if local or name == "tiny":
        raise MMCacheError(f"revision={rev} pins a Hugging Face Hub model; {name!r} is "
                           + ("a random init" if name == "tiny" else "a local folder, pinned by its weights' sha256")
                           + ": drop revision")
    return rev.strip()


@contextmanager
def hf_loading(name: str, local: bool, example: str, label: str, saves: str) -> Iterator[bool]:
    """Around Hugging Face `from_pretrained` calls of model `name`: yields their `local_files_only` (True when
    the Hub cannot be used, so a missing model fails at once instead of after retries), and turns a load error
    into one line: the offline hint, or "could not load <label> (...); save <saves> (save_pretrained) ..."."""
    offline = None if local else hub_offline()
    try:
        yield bool(offline)
    except (OSError, ValueError) as e:
        if offline:
            raise MMCacheError(offline_hint(f"{name!r}", offline, f"{example} (a save_pretrained folder)")) from None
        raise MMCacheError(f"could not load {label} ({str(e).strip().splitlines()[0]}); save {saves} "
                           f"(save_pretrained) and pass the folder, e.g. {example}") from None


__all__ = ["hf_loading", "hub_offline", "hub_revision", "hub_reachable", "offline_hint", "user_cache_dir", "weights_sha256"]
