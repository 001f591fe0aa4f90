"""`mmcache data fetch`: download a dataset's image URLs once into its folder, so its adapter reads local files.

Fakeddit (`image_url` of the TSVs) -> `public_image_set/<id>.jpg`, MMHS150K (`img_url` of MMHS150K_GT.json) ->
`img_resized/<id>.jpg`, a table's `http(s)://` image values -> `fetched/<hash>.<ext>` beside the table. The
folder that receives the images also keeps `fetch.jsonl` (one line per attempt: url, path, status, reason) and
`fetch.json` (the last run's counts).

Resumable: an image already on disk is never fetched again, and every file appears under its name only once
complete (written to `<name>.part`, then renamed), so a killed run loses at most the downloads in flight. A URL
that failed is not tried again unless `retry_failed` (a 404 stays a 404). Parallel: `workers` threads. What fails
(an HTTP error, a timeout, a refused connection, an answer that is not an image, a file over `max_bytes`) is
recorded with its reason and the rest go on.

Standard library HTTP (urllib), no extra package: img2dataset, the usual tool, pins webdataset < 0.3 and pandas
< 3, which the `stream` extra (webdataset >= 1.0) excludes.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcache.errors import MMCacheError

LOG_NAME = "fetch.jsonl"
SUMMARY_NAME = "fetch.json"
USER_AGENT = "mmcache-fetch/0.1 (+image download for a research dataset)"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
URL_RE = re.compile(r"^https?://", re.IGNORECASE)
FETCHED_DIR = "fetched"  # a table's fetched images, beside the table


def is_url(value: Any) -> bool:
    """Whether a table cell names an http(s) URL rather than a local path."""
    return isinstance(value, str) and bool(URL_RE.match(value.strip()))


def table_copy(folder: Path, url: str) -> Path:
    """Where the image at `url` of a table is kept: `<folder>/<2 hex>/<sha1><suffix of the URL, else .jpg>`."""
    url = url.strip()
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()
    suffix = Path(urllib.parse.urlsplit(url).path).suffix.lower()
    return folder / digest[:2] / f"{digest}{suffix if suffix in IMAGE_SUFFIXES else '.jpg'}"


@dataclass(frozen=True)
class Job:
    """One image to fetch: its URL, where it goes, and the row it came from (for messages)."""

    url: str
    dest: Path
    where: str = ""


@dataclass
class FetchPlan:
    """What a dataset asks to fetch: its jobs, the folder that receives them (and the log), and notes."""

    jobs: list[Job]
    folder: Path
    notes: list[str] = field(default_factory=list)


@dataclass
class FetchResult:
    """Counts of one fetch run; `failed` maps each URL that failed in this run to its reason."""

    folder: Path
    total: int = 0
    fetched: int = 0
    present: int = 0  # already on disk
    failed_before: int = 0  # failed in an earlier run, not retried
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.folder / LOG_NAME

    def reasons(self) -> Counter[str]:
        return Counter(self.failed.values())


class FetchError(Exception):
    """A download that failed, with the reason recorded; `transient` ones are retried."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


# ------------------------------------------------------------------------------------------------ the log


def read_log(folder: Path) -> dict[str, dict[str, Any]]:
    """The last record per image path (relative to `folder`) of `folder/fetch.jsonl`; lines that do not parse (a
    run killed while writing one) are skipped."""
    path = folder / LOG_NAME
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("path"), str):
                out[rec["path"]] = rec
    return out


def failed_paths(folder: Path) -> dict[str, str]:
    """Relative image path -> reason, for every image whose last fetch failed."""
    return {p: str(r.get("reason", "")) for p, r in read_log(folder).items() if r.get("status") == "failed"}


def read_summary(folder: Path) -> dict[str, Any] | None:
    """The counts the last fetch into `folder` wrote (`fetch.json`), or None."""
    path = folder / SUMMARY_NAME
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def summary_note(folder: Path, column: str, command: str) -> str | None:
    """One note for `data show` on the last fetch into `folder` (`command`: the fetch command line), or None when
    it never ran."""
    s = read_summary(folder)
    if s is None:
        return None
    failed = int(s.get("failed", 0))
    note = f"images fetched from the {column} URLs into {folder}: {int(s.get('present', 0))} of {int(s.get('total', 0))}"
    if failed:
        note += f" ({failed} failed, reasons in {folder / LOG_NAME}; `{command} --retry-failed` tries them again)"
    return note


# ------------------------------------------------------------------------------------------------ downloading


def download(url: str, timeout: float, max_bytes: int) -> bytes:
    """The body at `url` if it is an image; FetchError with the reason otherwise."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (http and https only: is_url)
            ctype = resp.headers.get_content_type()
            chunks, n = [], 0
            while True:
                chunk = resp.read(1 << 16)
                if not chunk:
                    break
                n += len(chunk)
                if n > max_bytes:
                    raise FetchError(f"larger than {max_bytes / 1e6:g} MB (--max-mb)")
                if time.monotonic() > deadline:
                    raise FetchError(f"timed out after {timeout:g} s", transient=True)
                chunks.append(chunk)
    except urllib.error.HTTPError as e:
        raise FetchError(f"HTTP {e.code} {e.reason}".strip(), transient=e.code >= 500 or e.code == 429) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise FetchError(f"timed out after {timeout:g} s", transient=True) from None
        raise FetchError(f"cannot connect ({_why(e.reason)})", transient=True) from None
    except TimeoutError:
        raise FetchError(f"timed out after {timeout:g} s", transient=True) from None
    except (http.client.HTTPException, OSError, ValueError) as e:
        raise FetchError(f"connection failed ({_why(e)})", transient=True) from None
    data = b"".join(chunks)
    if not _is_image(data):
        raise FetchError(f"not an image ({ctype}, {len(data)} bytes)")
    return data


def _why(reason: Any) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _is_image(data: bytes) -> bool:
    from PIL import Image

    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception:  # PIL raises many types on bytes that are not an image
        return False
    return True


def _fetch_one(job: Job, timeout: float, retries: int, max_bytes: int) -> tuple[Job, int, str | None]:
    """(job, bytes written, None) or (job, 0, reason); the file appears under its name only once complete."""
    for attempt in range(retries + 1):
        try:
            data = download(job.url, timeout, max_bytes)
        except FetchError as e:
            if e.transient and attempt < retries:
                time.sleep(min(8.0, 0.5 * 2**attempt))
                continue
            return job, 0, e.reason
        try:
            job.dest.parent.mkdir(parents=True, exist_ok=True)
            part = job.dest.with_name(job.dest.name + ".part")
            part.write_bytes(data)
            os.replace(part, job.dest)
        except OSError as e:
            return job, 0, f"cannot write {job.dest} ({_why(e)})"
        return job, len(data), None
    raise AssertionError("unreachable")


def fetch(plan: FetchPlan, workers: int = 16, timeout: float = 20.0, retries: int = 1, retry_failed: bool = False,
          max_bytes: int = 50_000_000, progress: bool = True) -> FetchResult:
    """Download every job of `plan` whose image is not on disk yet (see the module docstring)."""
    from mmcache.progress import bar

    if workers < 1:
        raise MMCacheError(f"--workers must be at least 1, got {workers}")
    if timeout <= 0:
        raise MMCacheError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    folder = plan.folder
    jobs = list({j.dest: j for j in plan.jobs}.values())  # one download per file (a URL repeated in a table)
    res = FetchResult(folder=folder, total=len(jobs))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MMCacheError(f"{folder}: cannot create the image folder ({_why(e)}); make the dataset folder "
                           "writable or copy it somewhere that is") from None
    earlier = failed_paths(folder)
    todo: list[Job] = []
    for j in jobs:
        if j.dest.is_file():
            res.present += 1
        elif not retry_failed and _rel(j.dest, folder) in earlier:
            res.failed_before += 1
        else:
            todo.append(j)
    try:
        log = (folder / LOG_NAME).open("a", encoding="utf-8")
    except OSError as e:
        raise MMCacheError(f"{folder / LOG_NAME}: cannot write the fetch log ({_why(e)})") from None
    with log, bar(total=len(todo), desc="fetch", unit="img", leave=True, disable=not progress) as pbar:
        for job, size, reason in _run(todo, workers, lambda j: _fetch_one(j, timeout, retries, max_bytes)):
            rec: dict[str, Any] = {"url": job.url, "path": _rel(job.dest, folder), "time": round(time.time(), 3)}
            if reason is None:
                res.fetched += 1
                res.present += 1
                rec.update(status="ok", bytes=size)
            else:
                res.failed[job.url] = reason
                rec.update(status="failed", reason=reason)
            log.write(json.dumps(rec, ensure_ascii=False) + "\n")
            log.flush()
            pbar.update(1)
            pbar.set_postfix(ok=res.fetched, failed=len(res.failed), refresh=False)
    _write_summary(res)
    return res


def _run(jobs: list[Job], workers: int, fn: Callable[[Job], tuple[Job, int, str | None]]
         ) -> Iterator[tuple[Job, int, str | None]]:
    """`fn` over `jobs` in `workers` threads, a bounded number in flight, results as they finish. On Ctrl-C the
    jobs not started are dropped; the threads finish (or time out) their download in flight."""
    it = iter(jobs)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmcache-fetch")
    pending: set[Future[tuple[Job, int, str | None]]] = set()
    try:
        for job in _take(it, workers * 4):
            pending.add(pool.submit(fn, job))
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
            for job in _take(it, len(done)):
                pending.add(pool.submit(fn, job))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _take(it: Iterator[Job], n: int) -> Iterable[Job]:
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


def _rel(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _write_summary(res: FetchResult) -> None:
    from mmcache.utils import write_json

    failed_now = len(res.failed) + res.failed_before
    try:
        write_json(res.folder / SUMMARY_NAME, {"total": res.total, "present": res.present, "failed": failed_now,
                                               "fetched_last_run": res.fetched, "time": round(time.time(), 3)})
    except OSError:
        pass  # the log has every record; the summary only feeds `data show`'s note


def describe(res: FetchResult, name: str) -> str:
    """What a fetch did, in a few lines (the command's output)."""
    lines = [f"{name}: {res.total} image URLs; {res.fetched} fetched now, {res.present - res.fetched} already there, "
             f"{len(res.failed)} failed now" + (f", {res.failed_before} failed before (not retried; "
                                                 "--retry-failed tries them again)" if res.failed_before else "")]
    reasons = res.reasons().most_common()
    for reason, n in reasons[:8]:
        lines.append(f"  {n:>6}  {reason}")
    if len(reasons) > 8:
        lines.append(f"  ... {len(reasons) - 8} other reasons")
    lines.append(f"images in {res.folder}; every attempt and its reason: {res.log}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ per dataset

PLANNERS: dict[str, Callable[..., FetchPlan]] = {}


def register_fetch(name: str) -> Callable[[Callable[..., FetchPlan]], Callable[..., FetchPlan]]:
    """Decorator: `fn(root, **adapter_options) -> FetchPlan` lists the image URLs of dataset `name`."""

    def deco(fn: Callable[..., FetchPlan]) -> Callable[..., FetchPlan]:
        PLANNERS[name] = fn
        return fn

    return deco


def plan_for(name: str, root: Path | str | None, options: dict[str, Any]) -> FetchPlan:
    """The fetch plan of dataset `name` at `root` (default data/<name>), with the adapter's own options."""
    import mmcache.data  # noqa: F401  (adapters and their planners register on import)
    from mmcache.data.base import DATASET_OPTIONS, DATASETS, check_options, default_root

    if "," in name:
        raise MMCacheError(f"data fetch takes one dataset; fetch {', '.join(n for n in name.split(',') if n)} "
                           "one at a time")
    canonical = DATASETS.canonical(name)
    planner = PLANNERS.get(canonical)
    if planner is None:
        raise MMCacheError(f"dataset {name!r} has no image URLs to fetch; `data fetch` reads the URLs of "
                           f"{', '.join(sorted(PLANNERS))}")
    options = {k: v for k, v in options.items() if v is not None}
    check_options(name, options, DATASET_OPTIONS[canonical])
    root = Path(root) if root is not None else default_root(name)
    if not root.exists():
        raise MMCacheError(f"dataset folder {root} does not exist; put {name!r} there in its official layout "
                           "or pass --data-dir")
    return planner(root, **options)


def fetch_command(name: str, root: Path | str) -> str:
    """The command line that fetches dataset `name` at `root` (named in the adapters' errors)."""
    return f"mmcache data fetch {name} --data-dir {root}"
