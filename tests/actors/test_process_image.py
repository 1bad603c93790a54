"""process_image as a job, against a real HTTP server on 127.0.0.1: thumbnails written, bad
input failed at once, network and server trouble retried."""

from __future__ import annotations

import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import engine
from engine import JobState, Outcome
from engine.settings import get_settings


class Server(ThreadingHTTPServer):
    """Answers GET <path> with the (status, body, headers) registered in `routes`."""

    routes: dict[str, tuple[int, bytes, dict[str, str]]]

    def route(self, path, body, *, status=200, content_type="image/png", content_length=True):
        headers = {"Content-Type": content_type}
        if content_length:
            headers["Content-Length"] = str(len(body))
        self.routes[path] = (status, body, headers)
        host, port = self.server_address
        return f"http://{host}:{port}{path}"


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: the connection closes after each answer, so a body needs no Content-Length.
    def do_GET(self):
        status, body, headers = self.server.routes[self.path]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


@pytest.fixture
def server():
    server = Server(("127.0.0.1", 0), Handler)
    server.routes = {}
    # A short poll interval: shutdown() waits for the next poll.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def out(tmp_path):
    """The folder thumbnails are written to (tmp_path holds the store too)."""
    return tmp_path / "thumbnails"


@pytest.fixture(autouse=True)
def process_image(declare):
    return declare("actors.process_image").process_image


def image_bytes(image_format, size):
    buffer = io.BytesIO()
    Image.new("RGB", size, "teal").save(buffer, format=image_format)
    return buffer.getvalue()


def assert_failed_at_once(job_id, error):
    failed = engine.get(job_id)
    assert failed.state == JobState.FAILED and failed.last_error.startswith("PermanentError")
    assert error in failed.last_error
    assert [a.outcome for a in engine.attempts(job_id)] == [Outcome.FAILED]


@pytest.mark.parametrize(
    ("image_format", "size", "thumbnail_size"),
    [
        ("PNG", (640, 480), (256, 192)),
        ("JPEG", (300, 600), (128, 256)),
        ("GIF", (512, 512), (256, 256)),
        ("WEBP", (100, 50), (100, 50)),  # never enlarged
    ],
)
def test_an_image_becomes_a_png_thumbnail_that_keeps_its_aspect(
    server, out, wait_done, image_format, size, thumbnail_size
):
    # given an image served as application/octet-stream: the bytes, not the header, tell its type
    body = image_bytes(image_format, size)
    url = server.route("/picture", body, content_type="application/octet-stream")

    job = engine.submit("process_image", url, output_dir=str(out))
    wait_done()

    assert engine.get(job.id).state == JobState.SUCCEEDED
    result = engine.result(job.id)
    path = Path(result["path"])
    assert path == out / f"{job.id}.png"
    assert result == {
        "path": str(path),
        "width": thumbnail_size[0],
        "height": thumbnail_size[1],
        "format": image_format.lower(),
        "bytes": len(body),
    }
    with Image.open(path) as thumbnail:
        assert (thumbnail.format, thumbnail.size) == ("PNG", thumbnail_size)
    assert engine.get(job.id).progress_percent == 100.0


def test_by_default_thumbnails_go_under_the_output_dir_setting(server, tmp_path, monkeypatch, wait_done):
    monkeypatch.setenv("ENGINE_OUTPUT_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        job = engine.submit("process_image", server.route("/a.png", image_bytes("PNG", (10, 10))))
        wait_done()
    finally:
        get_settings.cache_clear()

    assert Path(engine.result(job.id)["path"]) == tmp_path / "thumbnails" / f"{job.id}.png"


def test_text_served_as_an_image_fails_at_once(server, out, wait_done):
    url = server.route("/fake.png", b"<html>not an image</html>", content_type="image/png")

    job = engine.submit("process_image", url, output_dir=str(out))
    wait_done()

    assert_failed_at_once(job.id, "not a PNG, JPEG, GIF or WebP image")
    assert not out.exists()


def test_a_corrupt_image_fails_at_once(server, out, wait_done):
    url = server.route("/broken.png", image_bytes("PNG", (64, 64))[:60])

    job = engine.submit("process_image", url, output_dir=str(out))
    wait_done()

    assert_failed_at_once(job.id, "the png image is corrupt")


@pytest.mark.parametrize("content_length", [True, False], ids=["announced", "streamed"])
def test_a_body_over_max_bytes_fails_at_once(server, out, wait_done, content_length):
    url = server.route("/huge.png", image_bytes("PNG", (8, 8)) + bytes(300_000), content_length=content_length)

    job = engine.submit("process_image", url, max_bytes=100_000, output_dir=str(out))
    wait_done()

    assert_failed_at_once(job.id, "over the limit of 100,000 bytes")


def test_only_http_urls_are_fetched(out, wait_done):
    job = engine.submit("process_image", "file:///etc/passwd", output_dir=str(out))
    wait_done()

    assert_failed_at_once(job.id, "only http:// and https:// URLs")


@pytest.mark.parametrize(
    ("status", "outcomes"),
    [
        (404, [Outcome.FAILED]),
        (500, [Outcome.WILL_RETRY, Outcome.FAILED]),
        (503, [Outcome.WILL_RETRY, Outcome.FAILED]),
        (429, [Outcome.WILL_RETRY, Outcome.FAILED]),
    ],
)
def test_client_errors_fail_at_once_and_server_errors_are_retried(
    server, out, wait_done, process_image, status, outcomes
):
    url = server.route("/image.png", b"nope", status=status, content_type="text/plain")

    message = process_image.send_with_options(args=(url,), kwargs={"output_dir": str(out)}, max_retries=1)
    wait_done()

    failed = engine.get(message.message_id)
    assert failed.state == JobState.FAILED and str(status) in failed.last_error
    assert [a.outcome for a in engine.attempts(failed.id)] == outcomes


def test_a_refused_connection_is_retried(out, wait_done, process_image):
    with socket.socket() as probe:  # a port nobody listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    message = process_image.send_with_options(
        args=(f"http://127.0.0.1:{port}/a.png",), kwargs={"output_dir": str(out)}, max_retries=1
    )
    wait_done()

    failed = engine.get(message.message_id)
    assert failed.state == JobState.FAILED and "URLError" in failed.last_error
    assert [a.outcome for a in engine.attempts(failed.id)] == [Outcome.WILL_RETRY, Outcome.FAILED]
