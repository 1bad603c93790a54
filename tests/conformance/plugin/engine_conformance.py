"""A pytest plugin that runs Dramatiq's own test suite on the engine's brokers.

Loaded with ``-p engine_conformance`` into a pytest run of the tests of Dramatiq's source
distribution (see tests/conformance/suite.py). It replaces the fixtures of Dramatiq's
tests/conftest.py, which the source distribution does not ship, so that every test written for
``stub_broker`` or ``rabbitmq_broker`` gets the engine's broker instead:

- ``ENGINE_CONFORMANCE_BROKER=rabbitmq``: `engine.brokers.RabbitmqBroker` on
  ``ENGINE_CONFORMANCE_AMQP_URL`` (a vhost of its own), jobs tracked in the PostgreSQL database of
  ``ENGINE_CONFORMANCE_PG_URL`` when the engine's middleware is on;
- ``ENGINE_CONFORMANCE_BROKER=sqlite``: `engine.brokers.SQLiteBroker` in a new SQLite file per test;
- ``ENGINE_CONFORMANCE_MIDDLEWARE=dramatiq``: Dramatiq's default middleware, as a user who
  builds the broker class himself gets it; ``engine``: the broker as `engine.app.build_broker`
  builds it from settings, with the engine's middleware.

Which tests run at all, and why the others do not, is in `expectations` (next to suite.py, on
``PYTHONPATH``): this plugin deselects what is listed there for its combination.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import dramatiq
import pytest
from dramatiq import Broker, Worker
from dramatiq.rate_limits import backends as rate_limit_backends
from dramatiq.results import backends as result_backends

import engine.app
from engine.brokers import RabbitmqBroker, SQLiteBroker
from engine.app import MAX_PRIORITY, build_broker, build_middleware
from engine.middleware import Tracking
from engine.settings import Settings
from engine.store import Store
from engine.lifetime import die_with_parent

import expectations

BROKER = os.environ.get("ENGINE_CONFORMANCE_BROKER", "sqlite")
MIDDLEWARE = os.environ.get("ENGINE_CONFORMANCE_MIDDLEWARE", "dramatiq")
COMBINATION = f"{BROKER}-{MIDDLEWARE}"
AMQP_URL = os.environ.get("ENGINE_CONFORMANCE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PG_URL = os.environ.get("ENGINE_CONFORMANCE_PG_URL", "")


def pytest_configure(config: pytest.Config) -> None:
    # Dramatiq's conftest does the same; some tests read the log records.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(threadName)s] [%(name)s] [%(levelname)s] %(message)s")
    logging.getLogger("pika").setLevel(logging.WARN)
    random.seed(1337)
    parent_pid = os.environ.get("ENGINE_CONFORMANCE_PARENT_PID")
    if parent_pid and not die_with_parent(int(parent_pid)):
        pytest.exit("the pytest run that started this one is gone", returncode=3)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.suffix == ".py" and expectations.module_skipped(collection_path.name, COMBINATION):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Modules named on the command line are collected whatever pytest_ignore_collect says.
    selected, deselected = [], []
    for item in items:
        test = expectations.test_id(item.nodeid)
        skipped = expectations.module_skipped(test.split("::")[0], COMBINATION)
        (deselected if skipped or expectations.deselected(test, COMBINATION) else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


# -- brokers ------------------------------------------------------------------------------------


def _settings(store_url: str) -> Settings:
    """What a user of the engine sets: where RabbitMQ and the store are, the rest left as is."""
    return Settings(_env_file=None, broker_url=AMQP_URL if BROKER == "rabbitmq" else None, store_url=store_url)


@functools.cache
def _postgresql_store() -> Store:
    """The PostgreSQL store of the RabbitMQ run, shared by its tests (closed at the end)."""
    store = Store(PG_URL)
    store.upgrade()
    return store


def pytest_unconfigure(config: pytest.Config) -> None:
    if _postgresql_store.cache_info().currsize:
        _postgresql_store().close()


def _store_url(request: pytest.FixtureRequest) -> str:
    if BROKER == "rabbitmq":
        return PG_URL
    return f"sqlite:///{request.getfixturevalue('tmp_path')}/engine.db"


def _new_broker(request: pytest.FixtureRequest) -> tuple[Broker, list[Store]]:
    """The broker of this run's combination, and the stores to close after it."""
    if MIDDLEWARE == "engine":
        broker = build_broker(_settings(_store_url(request)))
        return broker, [middleware.store for middleware in broker.middleware if isinstance(middleware, Tracking)]
    if BROKER == "rabbitmq":
        return RabbitmqBroker(url=AMQP_URL, max_priority=MAX_PRIORITY), []
    store = Store(_store_url(request))
    store.upgrade()
    return SQLiteBroker(store), [store]


@pytest.fixture
def engine_broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """The broker under test, made the engine's and Dramatiq's global broker, as Dramatiq's
    fixtures make theirs."""
    broker, stores = _new_broker(request)
    broker.join = _join_without_fail_fast(broker.join)
    broker.emit_after("process_boot")
    engine.app.use(broker)
    yield broker
    try:
        if isinstance(broker, RabbitmqBroker):
            # So that no send of this test lands in the next one's queues after the flush.
            broker.settle_sends()
        broker.flush_all()
    finally:
        broker.close()
        for store in stores:
            store.close()
        engine.app._broker = None
        dramatiq.set_broker(None)


def _join_without_fail_fast(join: Callable[..., None]) -> Callable[..., None]:
    """`join`, also taking StubBroker's ``fail_fast=False``: what every other broker's join does
    (wait, and raise nothing about the messages). ``fail_fast=True`` stays a TypeError."""

    @functools.wraps(join)
    def joining(*args: Any, fail_fast: Optional[bool] = None, **kwargs: Any) -> None:
        if fail_fast:
            raise TypeError("fail_fast=True is StubBroker's alone: no other broker's join raises an actor's exception")
        return join(*args, **kwargs)

    return joining


@pytest.fixture
def stub_broker(engine_broker: Broker) -> Broker:
    return engine_broker


@pytest.fixture
def rabbitmq_broker(engine_broker: Broker) -> Broker:
    return engine_broker


@pytest.fixture
def stub_worker(engine_broker: Broker) -> Iterator[Worker]:
    # Dramatiq's own values for its stub worker.
    worker = Worker(engine_broker, worker_timeout=100, worker_threads=32)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def rabbitmq_worker(engine_broker: Broker) -> Iterator[Worker]:
    worker = Worker(engine_broker, worker_threads=32)
    worker.start()
    yield worker
    worker.stop()


class _RunsRabbitmqBroker(RabbitmqBroker):
    """The engine's RabbitmqBroker with this run's middleware unless given other."""

    def __init__(self, **options: Any) -> None:
        if MIDDLEWARE == "engine" and "middleware" not in options:
            options["middleware"] = build_middleware(_settings(PG_URL), _postgresql_store())
        super().__init__(**options)


@pytest.fixture(autouse=True)
def _engine_broker_class(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that build a ``RabbitmqBroker`` themselves build the engine's."""
    if BROKER == "rabbitmq" and getattr(request.module, "RabbitmqBroker", None) is not None:
        monkeypatch.setattr(request.module, "RabbitmqBroker", _RunsRabbitmqBroker)


# -- the rest of Dramatiq's conftest, for the tests that run here ------------------------------


@pytest.fixture(params=["stub"])
def result_backend(request: pytest.FixtureRequest) -> result_backends.StubBackend:
    """Results in Dramatiq's stub backend: the backend is not what is under test here (Redis and
    memcached are not part of the engine)."""
    return result_backends.StubBackend()


@pytest.fixture(params=["stub"])
def rate_limiter_backend(request: pytest.FixtureRequest) -> rate_limit_backends.StubBackend:
    """Rate limits in Dramatiq's stub backend, for the same reason."""
    return rate_limit_backends.StubBackend()


@pytest.fixture
def info_logging() -> Iterator[None]:
    logger = logging.getLogger()
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(logging.DEBUG)
