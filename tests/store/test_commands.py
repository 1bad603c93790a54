"""The store's commands: jobs whose message never came are claimed for sending again; the
readiness check tells a reachable database from one that is not."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.exc import OperationalError

from engine.store import Store


def recorded(store: Store, job_id: str, *, age_s: float, queue: str = "default", due_in_s=None) -> None:
    """A job's row as its sender recorded it `age_s` seconds ago; delayed by `due_in_s` if given."""
    created = time.time() - age_s
    row = dict(
        id=job_id, actor="echo", queue=queue, args="[]", kwargs="{}", options='{"max_retries": 2}',
        priority=0, idempotency_key=None, created_at=created,
        scheduled_for=None if due_in_s is None else created + due_in_s,
    )  # fmt: skip
    store.record_enqueue(row, delayed=due_in_s is not None)


def test_jobs_whose_message_never_came_are_claimed_once(store):
    recorded(store, "lost", age_s=120)
    recorded(store, "fresh", age_s=5)
    recorded(store, "in-a-queue-with-messages", queue="busy", age_s=120)
    recorded(store, "overdue", age_s=120, due_in_s=10)
    recorded(store, "not-due-yet", age_s=120, due_in_s=3600)

    claimed = store.claim_unsent(["default"], older_than_s=60)

    assert sorted(job.id for job, _ in claimed) == ["lost", "overdue"]
    assert [options for _, options in claimed] == [{"max_retries": 2}] * 2
    # claimed: not taken again before another 60 s
    assert store.claim_unsent(["default"], older_than_s=60) == []


def test_the_readiness_check_passes_on_a_reachable_store_and_raises_on_one_that_is_not(store, tmp_path):
    store.ping()

    unreachable = Store(f"sqlite:///{tmp_path}/no-such-directory/engine.db")
    try:
        with pytest.raises(OperationalError):
            unreachable.ping()
    finally:
        unreachable.close()
