"""Shared fixtures: a fresh SQLite store per test and Dramatiq's StubBroker for unit tests.

Integration fixtures (real RabbitMQ and PostgreSQL, engine processes) live in
tests/integration/conftest.py.
"""

from __future__ import annotations

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker

import engine.app
from engine.app import build_middleware
from engine.settings import Settings
from engine.store import Store


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(store_url=f"sqlite:///{tmp_path}/engine.db", min_backoff_ms=10, max_backoff_ms=50)


@pytest.fixture
def store(settings) -> Store:
    store = Store(settings.store_url)
    store.upgrade()
    yield store
    store.close()


@pytest.fixture
def stub_broker(settings, store):
    """The engine's middleware on Dramatiq's StubBroker, made the engine's broker."""
    broker = StubBroker(middleware=build_middleware(settings, store))
    broker.emit_after("process_boot")
    engine.app.use(broker, store)
    yield broker
    broker.flush_all()
    broker.close()
    engine.app._broker = None
    dramatiq.set_broker(None)


@pytest.fixture
def stub_worker(stub_broker):
    worker = Worker(stub_broker, worker_timeout=50, worker_threads=2)
    worker.start()
    yield worker
    worker.stop()
