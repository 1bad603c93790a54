"""Routes: what each path and method does, and what it takes and answers, in one declaration.

The server (`api.server`) matches requests against them and validates with their models; the
OpenAPI description (`api.openapi`) is generated from the same declarations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union
from urllib.parse import unquote

from pydantic import BaseModel

#: Statuses a route may answer with besides its own, and why: the OpenAPI description lists them.
ERROR_REASONS = {
    400: "the body is not well-formed JSON",
    401: "a missing or wrong bearer token (when ENGINE_API_TOKEN is set)",
    404: "no such job, schedule or route",
    405: "the path does not take this method (see `Allow`)",
    408: "the body did not arrive within ENGINE_API_READ_TIMEOUT_S",
    409: "a conflict: the job's state does not allow it, or a schedule of that name exists",
    411: "a body sent without Content-Length",
    413: "the body is larger than ENGINE_API_MAX_BODY_BYTES",
    415: "the body is not application/json",
    422: "invalid fields, each named in `error.fields`",
    503: "the store or the broker cannot be reached (see `Retry-After`)",
}


#: Seconds a client is told to wait (`Retry-After`) when the store or broker is down.
RETRY_AFTER_S = 5


def first_line(error: BaseException) -> str:
    """An exception's first line, short enough for an error message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


class ApiError(Exception):
    """An error answer: raised by handlers and by the server's checks.

    Parameters:
      status(int): the HTTP status.
      code(str): a stable, machine-readable name of the error.
      message(str): what went wrong, for a person.
      fields(list[tuple[str, str]]): (field, message) for each invalid field.
      headers(dict): extra response headers (`Allow`, `Retry-After`, ...).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        fields: Optional[list[tuple[str, str]]] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.fields = fields
        self.headers = headers or {}


@dataclass(frozen=True)
class Request:
    """What a handler gets: the validated query and body, the path's parameters, the request id."""

    method: str
    path: str
    params: dict[str, str]
    query: Any  # an instance of the route's query model, or None
    body: Any  # an instance of the route's body model, or None
    request_id: str


@dataclass(frozen=True)
class Reply:
    """A handler's answer when it is not the route's usual status and model."""

    model: Union[BaseModel, str, bytes]
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Union[BaseModel, Reply]]


@dataclass(frozen=True)
class Route:
    """One operation.

    Parameters:
      method, path: e.g. ``GET``, ``/api/jobs/{job_id}``.
      handler: called with the `Request`; returns the response model or a `Reply`.
      summary: one line, shown in the OpenAPI description.
      response: the model of the usual answer (None for a page or a text body).
      status: the usual answer's status.
      query, body: models that validate the query string and the JSON body.
      errors: statuses of `ERROR_REASONS` this route answers with besides the server's own.
      media_type: the usual answer's content type.
      tag: the OpenAPI tag it is listed under.
    """

    method: str
    path: str
    handler: Handler
    summary: str
    response: Optional[type[BaseModel]] = None
    status: int = 200
    query: Optional[type[BaseModel]] = None
    body: Optional[type[BaseModel]] = None
    errors: tuple[int, ...] = ()
    media_type: str = "application/json"
    tag: str = "jobs"
    also: tuple[tuple[int, str, Optional[type[BaseModel]]], ...] = ()  # other success answers

    @property
    def guarded(self) -> bool:
        """Whether it needs the token: every /api route, never health, metrics or the page."""
        return self.path.startswith("/api/")

    @property
    def parameters(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.path)

    def statuses(self) -> list[int]:
        """Every error status it may answer with (the server's checks included)."""
        found = set(self.errors) | {503}
        if self.guarded:
            found.add(401)
        if self.parameters:
            found.add(404)
        if self.query is not None or self.parameters:
            found.add(422)
        if self.body is not None:
            found |= {400, 408, 411, 413, 415, 422}
        return sorted(found)


class Router:
    """Finds the route of a method and path."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        # Literal paths before templates, so /api/jobs/bulk-retry is not taken for a job's id.
        ordered = sorted(routes, key=lambda route: ("{" in route.path, route.path))
        self._patterns = [(_pattern(route.path), route) for route in ordered]

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route and its path parameters.

        Raises:
          ApiError: 404 when no route has this path, 405 (with `Allow`) when none takes the method.
        """
        allowed: list[str] = []
        for pattern, route in self._patterns:
            found = pattern.fullmatch(path)
            if found is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, {name: unquote(value) for name, value in found.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            allow = ", ".join(sorted(set(allowed) | ({"HEAD"} if "GET" in allowed else set())))
            raise ApiError(405, "method_not_allowed", f"{method} is not allowed on {path}; use {allow}", headers={"Allow": allow})
        raise ApiError(404, "not_found", f"no route {path}; GET /openapi.json lists them")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", re.escape(template).replace(r"\{", "{").replace(r"\}", "}")))
