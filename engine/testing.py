"""Testing your own actors: the engine's middleware on Dramatiq's StubBroker.

    # tests/conftest.py, before your actors are imported
    from engine.testing import stub_broker
    broker = stub_broker(max_retries=0)

Each job is then tracked in a SQLite store of its own, with the same states, attempts, retries
and results as in production; ``broker.join(queue)`` and a ``dramatiq.Worker`` run them. The
StubBroker is for unit tests only: it keeps messages in memory, in one process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

from dramatiq.brokers.stub import StubBroker

from .app import build_middleware, use
from .settings import Settings
from .store import Store

__all__ = ["stub_broker"]


def stub_broker(directory: Optional[Path] = None, **settings: Any) -> StubBroker:
    """A StubBroker with the engine's middleware, made the engine's and Dramatiq's broker.

    Parameters:
      directory(Path): where its SQLite store is made; a new temporary directory by default.
      **settings: `Settings` fields to override (``max_retries=0``, ``min_backoff_ms=10``...).
        Backoffs default to 10-50 ms, so that a retried job does not hold a test up.

    Returns:
      StubBroker: booted, with its store created; close it with ``broker.close()``.
    """
    directory = Path(directory or tempfile.mkdtemp(prefix="engine-test-"))
    options = {"min_backoff_ms": 10, "max_backoff_ms": 50, **settings}
    configured = Settings(store_url=f"sqlite:///{directory / 'engine.db'}", **options)
    store = Store(configured.store_url)
    store.upgrade()
    broker = StubBroker(middleware=build_middleware(configured, store))
    broker.emit_after("process_boot")
    return use(broker, store)
