"""Integration fixtures: the engine in real processes, in both modes.

- embedded: a SQLite file, the SQLite broker.
- distributed: a real RabbitMQ (a vhost for the test session, its queues purged before each test)
  and a real PostgreSQL (a new database for each test).

Without RabbitMQ or PostgreSQL the distributed tests are skipped on a laptop, but fail under CI
(CI=true or ENGINE_TEST_REQUIRE_SERVICES=1): CI must never skip them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from typing import Callable, Iterator

import pika
import psycopg
import pytest

import engine

from tests.support.processes import EngineProcess, point_engine_at, release_engine

PG_ADMIN_URL = os.environ.get("ENGINE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_HOST = os.environ.get("ENGINE_TEST_AMQP_HOST", "127.0.0.1")
REQUIRE_SERVICES = os.environ.get("CI") == "true" or os.environ.get("ENGINE_TEST_REQUIRE_SERVICES") == "1"
TEST_QUEUES = ("default",)


def _unavailable(service: str, error: Exception) -> None:
    message = f"{service} is not reachable: {error}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (CI must run the integration tests, not skip them)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this test session, deleted at its end."""
    vhost = f"engine-test-{uuid.uuid4().hex[:8]}"
    try:
        pika.BlockingConnection(pika.ConnectionParameters(AMQP_HOST, connection_attempts=1)).close()
        for command in (["add_vhost", vhost], ["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]):
            subprocess.run(["rabbitmqctl", *command], check=True, capture_output=True, timeout=60)
    except (pika.exceptions.AMQPError, OSError, subprocess.SubprocessError) as error:
        _unavailable("RabbitMQ", error)
    yield vhost
    subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)


def _purge(amqp_url: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    for queue in TEST_QUEUES:
        for name in (queue, f"{queue}.DQ", f"{queue}.HQ", f"{queue}.XQ"):
            channel.queue_delete(name)
    connection.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test."""
    name = f"engine_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as error:
        _unavailable("PostgreSQL", error)
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["embedded", "distributed"])
def mode(request) -> str:
    return request.param


@pytest.fixture
def engine_env(mode, tmp_path, request, monkeypatch) -> dict[str, str]:
    """ENGINE_* variables of one engine instance in `mode`, also applied to this test process,
    whose engine API (engine.submit, engine.get, ...) then talks to the same store and broker."""
    side_effects = tmp_path / "side-effects"
    side_effects.mkdir()
    env = {
        "ENGINE_ACTOR_MODULES": "tests.support.actors",
        "ENGINE_TEST_SIDE_EFFECTS": str(side_effects),
        "ENGINE_SHUTDOWN_TIMEOUT_S": "10",
        "ENGINE_API_PORT": "0",  # `engine run` serves the API: any free port, so tests side by side do not collide
    }
    if mode == "embedded":
        env["ENGINE_STORE_URL"] = f"sqlite:///{tmp_path}/engine.db"
    else:
        vhost = request.getfixturevalue("amqp_vhost")
        env["ENGINE_BROKER_URL"] = f"amqp://guest:guest@{AMQP_HOST}:5672/{vhost}"
        env["ENGINE_STORE_URL"] = request.getfixturevalue("pg_url")
        _purge(env["ENGINE_BROKER_URL"])
    point_engine_at(env, monkeypatch)
    yield env
    release_engine()


@pytest.fixture
def start_engine(engine_env, tmp_path) -> Iterator[Callable[..., EngineProcess]]:
    """Start ``engine <command>`` against the test's store and broker; all are stopped after."""
    started: list[EngineProcess] = []

    def start(*args: str) -> EngineProcess:
        process = EngineProcess(list(args), engine_env, tmp_path / f"engine-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        # A group kill leaves no worker behind even if the supervisor died first.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in started:
        sys.stderr.write(f"--- {' '.join(process.args)} output ---\n{process.output()[-6000:]}\n")


def _rabbit_setting(name: str, value: str | None = None) -> str:
    """Read (or set) a setting of the running RabbitMQ node through `rabbitmqctl eval`."""
    expression = f"application:set_env(rabbit, {name}, {value})." if value else f"application:get_env(rabbit, {name})."
    done = subprocess.run(["rabbitmqctl", "eval", expression], check=True, capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


@pytest.fixture
def consumer_timeout_ms() -> Iterator[int]:
    """RabbitMQ's consumer_timeout lowered to 3 s (checked every second) for channels opened
    during the test; the node's values are restored after it."""
    saved = {name: _rabbit_setting(name) for name in ("consumer_timeout", "channel_tick_interval")}
    _rabbit_setting("consumer_timeout", "3000")
    _rabbit_setting("channel_tick_interval", "1000")
    yield 3000
    for name, previous in saved.items():
        # `{ok,1800000}` when set, `undefined` when it was the default.
        value = previous.removeprefix("{ok,").removesuffix("}") if previous.startswith("{ok,") else None
        if value:
            _rabbit_setting(name, value)
        else:
            subprocess.run(["rabbitmqctl", "eval", f"application:unset_env(rabbit, {name})."], check=True, timeout=60)


#: The hold time of `short_hold`: delays longer than this wait in the hold queue.
HOLD_MS = 1_000


@pytest.fixture
def short_hold(engine_env) -> Iterator[int]:
    """Delays longer than 1 s wait in the hold queue, in the workers and in this process.

    RabbitMQ keeps a queue's TTL from its first declaration, so the hold queue of other
    tests' hold time is deleted before and after."""

    def delete_hold_queue() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(engine_env["ENGINE_BROKER_URL"]))
        connection.channel().queue_delete("default.HQ")
        connection.close()

    delete_hold_queue()
    engine_env["ENGINE_DELAY_HOLD_MS"] = str(HOLD_MS)  # the workers'
    engine.get_broker().delay_hold_ms = HOLD_MS  # this process's, built before the test began
    yield HOLD_MS
    delete_hold_queue()
