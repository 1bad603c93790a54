"""Locks across processes: on PostgreSQL, one process at a time holds each, until its
connection is gone."""

from __future__ import annotations

import pytest

from engine.store import Store

pytestmark = pytest.mark.integration


@pytest.fixture
def store(pg_url) -> Store:
    store = Store(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    yield store
    store.close()


def test_one_process_holds_a_lock_until_its_connection_is_gone(store, pg_url):
    other = Store(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        # when one store (one process) holds a lock
        assert store.hold_lock("a task")

        # then another does not, that lock only, for as long as the first holds it
        assert store.hold_lock("a task") and not other.hold_lock("a task")
        assert other.hold_lock("another task")

        # and takes over once the first is gone
        store.close()
        assert other.hold_lock("a task")
    finally:
        other.close()
