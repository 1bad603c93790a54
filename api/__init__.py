"""The HTTP shim: the JSON API, its OpenAPI description and the status page, on the standard
library's `http.server`.

`listen` binds the API's address; `build_server` makes the server from settings; `start` runs it
on a thread of the calling process (``python -m api``, tests). ``engine api`` and ``engine run``
run it in a process of its own (`api.__main__`).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import socket
import threading
from functools import cache
from typing import Optional
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files

from loguru import logger

from engine.errors import ConfigError
from engine.settings import Settings

from .openapi import describe
from .routes import Endpoints
from .routing import Router
from .server import ApiServer

__all__ = ["ApiServer", "build_server", "listen", "start"]


def listen(settings: Settings) -> socket.socket:
    """A socket bound to ``ENGINE_API_HOST:ENGINE_API_PORT`` (port 0: any free one) and listening.

    ``engine run`` binds it once and hands it to each API process it starts: a restarted API
    answers on the same port, and connections made while it restarts wait in the backlog.

    Raises:
      ConfigError: the address cannot be bound (the port is taken, the host is not this one's).
    """
    try:
        listener = socket.create_server((settings.api_host, settings.api_port), backlog=ApiServer.request_queue_size)
    except OSError as error:
        raise ConfigError(f"cannot listen on {settings.api_host}:{settings.api_port}: {error.strerror or error}") from None
    return listener


def build_server(settings: Settings, listener: Optional[socket.socket] = None) -> ApiServer:
    """The API's server on `listener`, or on a socket from `listen`, not answering yet
    (`serve_forever`). It warns when bound beyond loopback without a token.

    Raises:
      ConfigError: the address cannot be bound (the port is taken, say).
    """
    holder: list[Router] = []
    endpoints = Endpoints(settings, page=_page, openapi=lambda: _description(holder[0], settings.api_token is not None))
    router = Router(endpoints.routes())
    holder.append(router)
    server = ApiServer(settings, router, page_policy=_page_policy(), listener=listener or listen(settings))
    if not _loopback(settings.api_host) and settings.api_token is None:
        logger.warning(
            "The API listens on {} without ENGINE_API_TOKEN: anyone who can reach it can submit and cancel jobs",
            settings.api_host,
        )
    logger.info("API listening on {}", server.url)
    return server


def start(settings: Settings, listener: Optional[socket.socket] = None) -> ApiServer:
    """`build_server`, answering on a daemon thread; stop it with ``shutdown()`` and ``server_close()``."""
    server = build_server(settings, listener)
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    return server


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@cache
def _description(router: Router, guarded: bool) -> dict:
    try:
        engine_version = version("engine")
    except PackageNotFoundError:
        engine_version = "0"
    return describe(router.routes, version=engine_version, guarded=guarded)


@cache
def _page() -> str:
    return files(__package__).joinpath("page.html").read_text(encoding="utf-8")


@cache
def _page_policy() -> str:
    """The page's content security policy: its one inline script and style by their hashes,
    requests to this origin only, no framing."""

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", _page(), flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()}'" for code in found)

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
