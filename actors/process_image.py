"""`process_image`: download an image from a URL and write a PNG thumbnail of it.

URLs come from users, so nothing about the response is trusted: the size is capped while
reading, not only by Content-Length; the type is read from the first bytes, not from
Content-Type; and Pillow only gets to decode the format those bytes announced. Errors that
another attempt cannot fix (a 404, a text file, a corrupt image) fail the job at once; network
trouble and server errors are retried.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from dramatiq.middleware import CurrentMessage
from PIL import Image, ImageOps

import engine
from engine import PermanentError
from engine.settings import get_settings

#: Seconds to wait for the connection and for each read.
TIMEOUT_S = 30
CHUNK_BYTES = 64 * 1024

#: Client errors worth another try: the server timed out waiting for us, or asked us to slow down.
RETRIED_CLIENT_ERRORS = frozenset({408, 429})

#: Formats by signature, for `_sniff`.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)


@engine.actor(max_retries=3, time_limit=2 * 60_000)
def process_image(
    url: str, max_bytes: int = 10_000_000, size: int = 256, output_dir: Optional[str] = None
) -> dict[str, Any]:
    """Fetch the PNG, JPEG, GIF or WebP image at `url` and save a thumbnail of it as PNG.

    The thumbnail fits within `size` x `size` pixels, keeps the aspect ratio and is never
    larger than the original. It is named after the job's id (a hash of the URL when called
    outside a worker), so a retry overwrites the file of a previous attempt.

    Parameters:
      url(str): an http:// or https:// URL.
      max_bytes(int): the largest download accepted.
      size(int): the largest width and height of the thumbnail, in pixels.
      output_dir(str): the folder to write to; by default ``thumbnails`` under ENGINE_OUTPUT_DIR.

    Returns:
      dict: ``{"path": the thumbnail, "width", "height": the thumbnail's, "format": the
      original's ("png", "jpeg", "gif" or "webp"), "bytes": the original's size}``.

    Raises:
      PermanentError: the URL is not http(s), the server answered 4xx (but 408 and 429), the
        body is over `max_bytes`, or it is not an image of a supported format or is corrupt.
      urllib.error.URLError, OSError: network trouble or a 5xx, 408 or 429 answer (retried).
    """
    _check_arguments(url, max_bytes, size)
    data = _download(url, max_bytes)
    kind = _sniff(data)
    engine.progress(90, f"making a {size}x{size} thumbnail")
    thumbnail = _thumbnail(data, kind, size)
    folder = Path(output_dir) if output_dir else get_settings().output_dir / "thumbnails"
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / f"{_file_stem(url)}.png").resolve()
    thumbnail.save(path, format="PNG")
    engine.progress(100, f"thumbnail written to {path}")
    width, height = thumbnail.size
    return {"path": str(path), "width": width, "height": height, "format": kind, "bytes": len(data)}


def _check_arguments(url: str, max_bytes: int, size: int) -> None:
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise PermanentError(f"malformed URL {url!r}: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PermanentError(f"only http:// and https:// URLs can be fetched, got {url!r}")
    if max_bytes < 1 or size < 1:
        raise PermanentError(f"max_bytes and size must be at least 1, got {max_bytes} and {size}")


def _download(url: str, max_bytes: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return _read_capped(response, max_bytes)
    except urllib.error.HTTPError as error:
        if 400 <= error.code < 500 and error.code not in RETRIED_CLIENT_ERRORS:
            raise PermanentError(f"{url} answered HTTP {error.code} {error.reason}") from None
        raise
    except http.client.InvalidURL as error:
        raise PermanentError(f"malformed URL {url!r}: {error}") from None


def _read_capped(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    length = response.headers.get("Content-Length", "")
    expected = int(length) if length.isdigit() else None
    if expected is not None and expected > max_bytes:
        raise PermanentError(f"the image is {expected:,} bytes, over the limit of {max_bytes:,} bytes")
    data = bytearray()
    # Content-Length may be missing or lie: the cap holds on what is actually read.
    while chunk := response.read(CHUNK_BYTES):
        data += chunk
        if len(data) > max_bytes:
            raise PermanentError(f"the image is over the limit of {max_bytes:,} bytes")
        percent = 90 * min(1.0, len(data) / expected) if expected else 0
        engine.progress(percent, f"{len(data):,} bytes downloaded")
    return bytes(data)


def _sniff(data: bytes) -> str:
    """The image format the magic bytes announce."""
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise PermanentError(f"not a PNG, JPEG, GIF or WebP image (starts with {data[:12]!r})")


def _thumbnail(data: bytes, kind: str, size: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=[kind.upper()]) as image:
            image.thumbnail((size, size))
            # Phones store the rotation in EXIF instead of rotating the pixels; turning after
            # shrinking is cheaper, and the square box fits either way.
            thumbnail = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # Pillow reports broken data as any of these, depending on the format and the damage.
        raise PermanentError(f"the {kind} image is corrupt: {error}") from None
    return thumbnail if thumbnail.mode != "CMYK" else thumbnail.convert("RGB")  # PNG has no CMYK


def _file_stem(url: str) -> str:
    message = CurrentMessage.get_current_message()
    if message is not None:
        return message.message_id
    return hashlib.sha256(url.encode()).hexdigest()[:32]
