"""The HTTP server: `http.server.ThreadingHTTPServer`, made safe to expose.

- A bounded number of connections, a thread each: past ``ENGINE_API_MAX_CONNECTIONS`` a new
  connection is answered 503 at once by the accepting thread, so a flood cannot exhaust threads.
- Deadlines, not only per-read timeouts: a request's line and headers must arrive within
  ``ENGINE_API_HEADER_TIMEOUT_S`` (an idle keep-alive connection too) and its body within
  ``ENGINE_API_READ_TIMEOUT_S``, so a client sending a byte a second is closed like a silent one.
- Bodies up to ``ENGINE_API_MAX_BODY_BYTES`` (413 beyond, before reading them), JSON only.
- A bearer token, compared in constant time, on every /api route when ``ENGINE_API_TOKEN`` is set.
- Security headers on every answer; errors as ``{"error": {...}}``, never a traceback, each
  logged with its method, path and request id.
"""

from __future__ import annotations

import hmac
import io
import json
import re
import socket
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qsl, urlsplit

from dramatiq.errors import BrokerConnectionError
from loguru import logger
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from engine.errors import (
    EngineError,
    InvalidArguments,
    InvalidJobState,
    JobNotFound,
    ResultNotReady,
    TrackingError,
    UnknownActor,
)
from engine.settings import Settings
from scheduler.definition import InvalidSchedule, ScheduleNotFound

from .models import ErrorDetail, ErrorResponse, FieldError
from .routing import RETRY_AFTER_S, ApiError, Reply, Request, Route, Router, first_line

_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_JSON_POLICY = "default-src 'none'; frame-ancestors 'none'"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ApiServer(ThreadingHTTPServer):
    """The API's server: `serve_forever` answers until `shutdown`.

    Parameters:
      settings(Settings): host, port, token and limits (``ENGINE_API_*``).
      router(Router): the routes.
      page_policy(str): the content security policy of HTML answers (the page's inline code
        hashes, see `api.page`).
      listener(socket): a socket already bound and listening (the supervisor's, inherited by
        ``engine run``'s API process) to answer on instead of binding the settings' address.
    """

    daemon_threads = True
    # 200 clients connecting at once must not overflow the accept backlog (Python's default: 5).
    request_queue_size = 1024

    def __init__(self, settings: Settings, router: Router, *, page_policy: str, listener: Optional[socket.socket] = None) -> None:
        self.settings = settings
        self.router = router
        self.page_policy = page_policy
        self.token = settings.api_token.get_secret_value().encode() if settings.api_token else None
        self._slots = threading.BoundedSemaphore(settings.api_max_connections)
        super().__init__((settings.api_host, settings.api_port), _Handler, bind_and_activate=listener is None)
        if listener is not None:
            self.socket.close()
            self.socket = listener
            self.server_address = listener.getsockname()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            logger.warning("API: {} connections open, refusing one from {}", self.settings.api_max_connections, client_address[0])
            _refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside a request's handling (the client reset it, ...)."""
        logger.opt(exception=True).debug("API connection from {} failed", client_address[0])

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _refuse(connection: socket.socket) -> None:
    body = json.dumps({"error": {"code": "busy", "message": "too many connections; try again", "request_id": "-"}})
    head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    try:
        connection.setblocking(False)  # a fresh socket's buffer takes it whole; never block the accept loop
        connection.send(head.encode() + body.encode())
    except OSError:
        pass


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, failing with TimeoutError once `deadline` (monotonic) has passed,
    however slowly the bytes arrive."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the client was too slow")
        self.connection.settimeout(remaining)
        return self.connection.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    # An answer's head and body leave in one write (`_send` flushes), and at once: with Nagle's
    # algorithm a second small write waits for the client's delayed acknowledgement (40 ms).
    wbufsize = 65536
    disable_nagle_algorithm = True
    server_version = "engine"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 65536)
        self.request_id = "-"

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.server.settings.api_header_timeout_s
        super().handle_one_request()

    def do_GET(self) -> None:
        self._respond()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # -- the request's way through -----------------------------------------------------------

    def _respond(self) -> None:
        incoming = self.headers.get("X-Request-Id", "")
        self.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        self._reader.deadline = time.monotonic() + self.server.settings.api_read_timeout_s
        split = urlsplit(self.path)
        path = split.path
        media_type = "application/json"
        try:
            route, params = self._route(path)
            query = _validate(route.query, dict(parse_qsl(split.query, keep_blank_values=True)), "query") if route.query else None
            body = self._body(route)
            reply = route.handler(Request(self.command, path, params, query, body, self.request_id))
            if not isinstance(reply, Reply):
                reply = Reply(reply, route.status)
            media_type = route.media_type
        except ApiError as error:
            reply = self._failure(error)
        except Exception as error:  # noqa: BLE001  (every error becomes an answer, never a traceback)
            reply = self._failure(_api_error(error, self.command, path, self.request_id))
        try:
            self._send(reply.status, reply.model, reply.headers, media_type=media_type)
        except OSError:  # the client went away or stopped reading
            self.close_connection = True

    def _route(self, path: str) -> tuple[Route, dict[str, str]]:
        if path.startswith("/api/") and self.server.token is not None:
            self._authenticate()
        return self.server.router.match(self.command, path)

    def _authenticate(self) -> None:
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        expected = self.server.token
        # compare_digest on every request, even a malformed one: timing says nothing.
        matches = hmac.compare_digest(given.strip().encode(), expected)  # type: ignore[arg-type]
        if scheme.lower() != "bearer" or not matches:
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <ENGINE_API_TOKEN>",
                           headers={"WWW-Authenticate": 'Bearer realm="engine"'})  # fmt: skip

    def _body(self, route: Route) -> Optional[BaseModel]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "length_required", "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
        if length < 0:
            self.close_connection = True
            raise ApiError(400, "bad_request", "Content-Length is negative")
        limit = self.server.settings.api_max_body_bytes
        if length > limit:
            self.close_connection = True  # the body is never read: the connection cannot be reused
            raise ApiError(413, "body_too_large", f"the body has {length} bytes; at most {limit} are taken")
        try:
            raw = self.rfile.read(length) if length else b""
        except TimeoutError:
            self.close_connection = True
            raise ApiError(408, "request_timeout", f"the body did not arrive within {self.server.settings.api_read_timeout_s} s") from None
        if len(raw) < length:
            self.close_connection = True
            raise ApiError(400, "bad_request", "the body ended before Content-Length bytes")
        if route.body is None:
            return None
        media_type = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if raw and media_type != "application/json":
            raise ApiError(415, "unsupported_media_type", f"the body must be application/json, not {media_type}")
        try:
            data = json.loads(raw) if raw.strip() else {}
        except ValueError as error:
            raise ApiError(400, "malformed_json", f"the body is not valid JSON: {error}") from None
        return _validate(route.body, data, "body")

    # -- answers -----------------------------------------------------------------------------

    def _send(self, status: int, model: Any, headers: Any = (), *, media_type: str = "application/json") -> None:
        if isinstance(model, BaseModel):
            payload = model.model_dump_json(exclude_none=isinstance(model, ErrorResponse)).encode()
        elif isinstance(model, str):
            payload = model.encode()
        else:
            payload = model
        self.connection.settimeout(self.server.settings.api_read_timeout_s)  # a client that does not read
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", f"{media_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Request-Id", self.request_id)
        policy = self.server.page_policy if media_type == "text/html" else _JSON_POLICY
        self.send_header("Content-Security-Policy", policy)
        for name, value in {**_SECURITY_HEADERS, **dict(headers)}.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()

    def _failure(self, error: ApiError) -> Reply:
        log = logger.error if error.status >= 500 else logger.warning
        log("API {} {} -> {} {}: {} (request {})", self.command, urlsplit(getattr(self, "path", "")).path, error.status, error.code, error.message, self.request_id)
        fields = [FieldError(field=name, message=text) for name, text in error.fields] if error.fields else None
        detail = ErrorDetail(code=error.code, message=error.message, fields=fields, request_id=self.request_id)
        return Reply(ErrorResponse(error=detail), error.status, error.headers)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """The standard library's own errors (a malformed request line, headers too long), as JSON."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # unread (or unreadable): answer with a status line all the same
        if self.request_id == "-":
            self.request_id = uuid.uuid4().hex
        name = HTTPStatus(code).phrase.lower().replace(" ", "_").replace("-", "_")
        reply = self._failure(ApiError(code, name, message or explain or "the request could not be read"))
        try:
            self._send(reply.status, reply.model, reply.headers)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the standard library's name)
        logger.debug("API {}: " + format.replace("%s", "{}").replace("%r", "{!r}").replace("%d", "{}"), self.address_string(), *args)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        logger.debug("API {} {} -> {} (request {})", self.command, getattr(self, "path", ""), code, self.request_id)


def _validate(model: type[BaseModel], data: Any, where: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        fields = []
        for item in error.errors(include_url=False):
            name = ".".join(str(part) for part in item["loc"]) or where
            fields.append((name, item["msg"]))
        listed = "; ".join(f"{name}: {text}" for name, text in fields)
        raise ApiError(422, "invalid_fields", f"invalid {where}: {listed}", fields=fields) from None


def _api_error(error: Exception, method: str, path: str, request_id: str) -> ApiError:
    """The answer to an exception a handler raised: the engine's errors by kind; a store or
    broker that cannot be reached, 503; anything else, a 500 whose traceback goes to the log only."""
    unavailable = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(error, JobNotFound):
        return ApiError(404, "job_not_found", str(error))
    if isinstance(error, ScheduleNotFound):
        return ApiError(404, "schedule_not_found", str(error))
    if isinstance(error, InvalidSchedule):
        return ApiError(422, "invalid_schedule", str(error), fields=[(error.field, error.reason)])
    if isinstance(error, ResultNotReady):
        return ApiError(409, "result_not_ready", str(error))
    if isinstance(error, InvalidJobState):
        return ApiError(409, "invalid_state", str(error))
    if isinstance(error, UnknownActor):
        return ApiError(422, "unknown_actor", str(error), fields=[("actor", str(error))])
    if isinstance(error, InvalidArguments):
        return ApiError(422, "invalid_arguments", str(error), fields=error.problems)
    if isinstance(error, (DBAPIError, PoolTimeout)) or (isinstance(error, TrackingError) and isinstance(error.__cause__, DBAPIError)):
        return ApiError(503, "store_unavailable", f"the job store cannot be reached: {first_line(error)}", headers=unavailable)
    if isinstance(error, BrokerConnectionError):
        return ApiError(503, "broker_unavailable", f"the broker cannot be reached: {first_line(error)}", headers=unavailable)
    if isinstance(error, TrackingError):
        return ApiError(503, "store_unavailable", str(error), headers=unavailable)
    if isinstance(error, EngineError):
        return ApiError(422, "invalid_request", str(error))
    logger.opt(exception=error).error("API {} {} failed (request {})", method, path, request_id)
    return ApiError(500, "internal_error", f"the server failed; its log has the details under request {request_id}")
