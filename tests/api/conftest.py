"""Fixtures of the HTTP API's tests: the API on a real socket, in front of a real engine.

`api` serves from this test process (port 0: a free one) on the store and broker of
`engine_env`, embedded or distributed (tests/integration/conftest.py); `worker` runs jobs in a
Dramatiq worker in this process, on the same broker.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import dramatiq
import pytest

import api
import engine
from engine.settings import Settings, get_settings
from tests.integration.conftest import amqp_vhost, engine_env, mode, pg_url, start_engine  # noqa: F401  (fixtures)


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Client:
    """Requests over a new connection each: what a user's HTTP client sends."""

    url: str
    host: str
    port: int
    token: Optional[str] = None

    def request(self, method: str, path: str, json_body: Any = None, *, body: Optional[bytes] = None,
                headers: Optional[dict[str, str]] = None) -> Answer:  # fmt: skip
        sent = dict(headers or {})
        if self.token is not None:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        if json_body is not None:
            body = json.dumps(json_body).encode()
            sent.setdefault("Content-Type", "application/json")
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            return Answer(response.status, response.headers, response.read())
        finally:
            connection.close()

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json_body: Any = None, **kwargs: Any) -> Answer:
        return self.request("POST", path, json_body, **kwargs)


@pytest.fixture
def serve(engine_env) -> Iterator[Callable[..., Client]]:
    """Start the API with settings changed as given (``api_token="..."``, ...); stopped after."""
    servers: list[api.ApiServer] = []

    def serve(**changes: Any) -> Client:
        engine.get_broker()  # the test actors, declared on the test's broker
        settings = Settings(**{**get_settings().model_dump(), "api_port": 0, **changes})
        server = api.start(settings)
        servers.append(server)
        host, port = server.server_address[:2]
        return Client(server.url, host, port)

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def client(serve) -> Client:
    return serve()


@pytest.fixture
def worker(engine_env) -> Iterator[dramatiq.Worker]:
    """A Dramatiq worker in this process, running the test actors."""
    running = dramatiq.Worker(engine.get_broker(), worker_timeout=100, worker_threads=4)
    running.start()
    yield running
    running.stop()
