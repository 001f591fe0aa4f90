"""`mmcache data fetch` against a local HTTP server: images, 404s, timeouts, non-images, retries, resuming."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mmcache.data import load_dataset
from mmcache.data.cli import app
from mmcache.data.fetch import LOG_NAME, read_log, table_copy
from mmcache.data.table import write_table
from mmcache.errors import MMCacheError
from tests.data.layouts import image, jpeg_bytes, write_fakeddit, write_mmhs

runner = CliRunner()
SLOW_S = 2.0  # the /slow answer's delay; the tests' --timeout is well below it


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 5), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """A local HTTP server: /img/<x>.jpg and /png/<x>.png answer images, /missing 404, /slow answers after
    SLOW_S seconds, /html a web page, /flaky a 503 the first time and an image after; `hits` counts requests."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path
                server.hits[path] += 1
                if path.startswith("/img/"):
                    self._send(200, "image/jpeg", jpeg_bytes())
                elif path.startswith("/png/"):
                    self._send(200, "image/png", png_bytes())
                elif path.startswith("/slow"):
                    time.sleep(SLOW_S)
                    self._send(200, "image/jpeg", jpeg_bytes())
                elif path.startswith("/html"):
                    self._send(200, "text/html", b"<html><body>not found, but 200</body></html>")
                elif path.startswith("/flaky"):
                    if server.hits[path] == 1:
                        self._send(503, "text/plain", b"busy")
                    else:
                        self._send(200, "image/jpeg", jpeg_bytes())
                else:
                    self._send(404, "text/plain", b"no such file")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def fetch(*args: str) -> str:
    res = runner.invoke(app, ["fetch", *args, "--no-progress"])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return res.output


def test_a_table_of_image_urls_is_fetched_once_failures_recorded(server: Server, tmp_path: Path) -> None:
    u = server.url
    rows = [{"id": "ok", "image": f"{u}/img/a.jpg", "text": "t", "label": "x", "split": "train"},
            {"id": "png", "image": f"{u}/png/b.png", "text": "t", "label": "y", "split": "train"},
            {"id": "dup", "image": f"{u}/img/a.jpg", "text": "t", "label": "x", "split": "val"},
            {"id": "gone", "image": f"{u}/missing/c.jpg", "text": "t", "label": "y", "split": "val"},
            {"id": "slow", "image": f"{u}/slow/d.jpg", "text": "t", "label": "x", "split": "test"},
            {"id": "page", "image": f"{u}/html/e.jpg", "text": "t", "label": "y", "split": "test"},
            {"id": "flaky", "image": f"{u}/flaky/f.jpg", "text": "t", "label": "x", "split": "test"},
            {"id": "local", "image": "pics/g.jpg", "text": "t", "label": "y", "split": "test"}]
    table = write_table(tmp_path / "ds" / "t.csv", rows)
    image(tmp_path / "ds" / "pics" / "g.jpg")
    # Before the fetch: one line naming the command (the `//` of a URL no longer collapses into a bad path).
    with pytest.raises(MMCacheError) as e:
        load_dataset("table", table)
    assert f"line 2: image '{u}/img/a.jpg' is a URL with no local copy (and 6 more rows)" in str(e.value)
    assert f"`mmcache data fetch table --data-dir {table}`" in str(e.value)

    out = fetch("table", "--data-dir", str(table), "--timeout", "0.5", "--retries", "1", "--workers", "4")
    folder = tmp_path / "ds" / "fetched"
    assert "t: " not in out and "table: 6 image URLs; 3 fetched now, 0 already there, 3 failed now" in out
    assert "HTTP 404" in out and "timed out after 0.5 s" in out and "not an image (text/html" in out
    assert server.hits["/img/a.jpg"] == 1  # a URL repeated in the table is fetched once
    assert server.hits["/flaky/f.jpg"] == 2 and server.hits["/slow/d.jpg"] == 2  # transient: retried once
    assert server.hits["/missing/c.jpg"] == 1 and server.hits["/html/e.jpg"] == 1  # final answers: not retried
    log = read_log(folder)
    by_url = {r["url"]: r for r in log.values()}
    assert by_url[f"{u}/missing/c.jpg"]["reason"].startswith("HTTP 404")
    assert by_url[f"{u}/slow/d.jpg"]["reason"] == "timed out after 0.5 s"
    assert by_url[f"{u}/html/e.jpg"]["reason"].startswith("not an image (text/html")
    assert by_url[f"{u}/png/b.png"]["status"] == "ok" and by_url[f"{u}/flaky/f.jpg"]["status"] == "ok"
    assert not list(folder.rglob("*.part"))

    ds = load_dataset("table", table)
    s = ds.by_id()
    assert Path(s["ok"].image) == table_copy(folder, f"{u}/img/a.jpg") == Path(s["dup"].image)
    assert Path(s["png"].image).suffix == ".png" and Image.open(s["png"].image).size == (3, 5)
    assert Image.open(s["flaky"].image).size == (4, 4)
    assert not Path(s["gone"].image).exists() and not Path(s["slow"].image).exists()  # missing: failures at extract
    assert Path(s["local"].image) == tmp_path / "ds" / "pics" / "g.jpg"
    assert any("7 image URLs read from their local copies" in n and "3 failed to download" in n for n in ds.notes)

    # Again: nothing on disk is fetched twice, and failures stay failed until --retry-failed.
    time.sleep(0.1)
    before = Counter(server.hits)
    out = fetch("table", "--data-dir", str(table), "--timeout", "0.5", "--retries", "0")
    assert server.hits == before
    assert "0 fetched now, 3 already there, 0 failed now, 3 failed before (not retried" in out
    out = fetch("table", "--data-dir", str(table), "--timeout", "0.5", "--retries", "0", "--retry-failed")
    assert server.hits["/missing/c.jpg"] == 2 and server.hits["/img/a.jpg"] == 1
    assert "3 failed now" in out


def test_fetch_resumes_after_a_kill(server: Server, tmp_path: Path) -> None:
    """A half-written file (`.part`) and a torn last log line, as a killed run leaves them, are redone / skipped."""
    u = server.url
    table = write_table(tmp_path / "t.jsonl", [{"image": f"{u}/img/{i}.jpg", "label": "a"} for i in range(12)])
    folder = tmp_path / "fetched"
    first = table_copy(folder, f"{u}/img/0.jpg")
    first.parent.mkdir(parents=True)
    first.write_bytes(jpeg_bytes())  # finished before the kill
    part = table_copy(folder, f"{u}/img/1.jpg")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.with_name(part.name + ".part").write_bytes(b"\xff\xd8 half")
    (folder / LOG_NAME).write_text(json.dumps({"url": "x", "path": "y", "status": "ok"}) + "\n" + '{"url": "tor')
    out = fetch("table", "--data-dir", str(table))
    assert "12 image URLs; 11 fetched now, 1 already there, 0 failed now" in out
    assert server.hits["/img/0.jpg"] == 0 and Image.open(part).size == (4, 4)
    assert len(load_dataset("table", table).samples) == 12


def test_fakeddit_without_images_names_the_command_then_reads_the_fetched_copies(server: Server,
                                                                                 tmp_path: Path) -> None:
    rows = {"train": [("a1", "one", 1, 0, 0), ("a2", "two", 0, 1, 1)], "validate": [("b1", "three", 1, 0, 0)],
            "test_public": [("c1", "four", 0, 2, 3)]}
    root = write_fakeddit(tmp_path / "fk", rows, image_url=server.url + "/img/{id}.jpg", images=False)
    (root / "multimodal_test_public.tsv").write_text(
        (root / "multimodal_test_public.tsv").read_text().replace("/img/c1.jpg", "/missing/c1.jpg"))
    with pytest.raises(MMCacheError, match=rf"download them from the image_url column once with `mmcache data fetch "
                                           rf"fakeddit --data-dir {root}`"):
        load_dataset("fakeddit", root)
    out = fetch("fakeddit", "--data-dir", str(root))
    assert "fakeddit: 4 image URLs; 3 fetched now, 0 already there, 1 failed now" in out
    ds = load_dataset("fakeddit", root)
    s = ds.by_id()
    assert Path(s["a1"].image) == root / "public_image_set" / "a1.jpg" and Image.open(s["b1"].image).size == (4, 4)
    assert not Path(s["c1"].image).exists()
    assert any("images fetched from the image_url URLs" in n and "3 of 4 (1 failed" in n for n in ds.notes)
    res = runner.invoke(app, ["show", "fakeddit", "--data-dir", str(root), "--check", "--no-progress"])
    assert res.exit_code == 0 and "3 of 4 (1 failed" in res.output and "test: image 1" in res.output


def test_mmhs150k_img_urls_are_fetched_into_img_resized(server: Server, tmp_path: Path) -> None:
    gt = {"101": [0, 0, 1], "102": [1, 1, 0], "103": [2, 2, 2]}
    root = write_mmhs(tmp_path / "mmhs", gt, {"train": ["101"], "val": ["102"], "test": ["103"]},
                      image_url=server.url + "/img/{id}.jpg", images=False)
    with pytest.raises(MMCacheError, match=r"img_resized not found; .*`mmcache data fetch mmhs150k --data-dir "):
        load_dataset("mmhs150k", root)
    assert "3 image URLs; 3 fetched now" in fetch("mmhs", "--data-dir", str(root))
    ds = load_dataset("mmhs150k", root)
    assert all(Path(s.image).parent == root / "img_resized" and Path(s.image).is_file() for s in ds.samples)


def test_fetch_refuses_datasets_without_urls_and_bad_options(tmp_path: Path) -> None:
    res = runner.invoke(app, ["fetch", "mvsa", "--data-dir", str(tmp_path)])
    assert isinstance(res.exception, MMCacheError)
    assert str(res.exception) == ("dataset 'mvsa' has no image URLs to fetch; `data fetch` reads the URLs of "
                                  "fakeddit, mmhs150k, table")
    write_table(tmp_path / "t.csv", [{"image": "a.jpg", "label": "a"}])
    res = runner.invoke(app, ["fetch", "table", "--data-dir", str(tmp_path / "t.csv"), "-o", "bogus=1"])
    assert isinstance(res.exception, MMCacheError) and "does not take option(s) ['bogus']" in str(res.exception)
    res = runner.invoke(app, ["fetch", "table", "--data-dir", str(tmp_path / "t.csv"), "-o", "image_column=url"])
    assert isinstance(res.exception, MMCacheError) and "-o image_column='url': the table has no such column" in str(
        res.exception)
    res = runner.invoke(app, ["fetch", "table", "--data-dir", str(tmp_path / "t.csv")])
    assert res.exit_code == 0 and "nothing to fetch" in res.output
