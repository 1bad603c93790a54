"""The store's commands: jobs whose message never came are claimed for sending again; the
readiness check tells a reachable database from one that is not."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.exc import OperationalError

from engine.errors import InvalidJobState
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


@pytest.mark.parametrize("delayed", [False, True], ids=["queued", "scheduled"])
def test_a_job_still_on_its_way_is_not_retried_by_hand(store, delayed):
    # given a job waiting in its queue, or waiting out a delay or a retry's backoff
    recorded(store, "waiting", age_s=1, due_in_s=30 if delayed else None)

    # when it is retried by hand, then it is refused and left as it was: no second message
    with pytest.raises(InvalidJobState, match="only failed or canceled jobs can be retried"):
        store.requeue("waiting")
    assert store.get("waiting").state == ("scheduled" if delayed else "queued")
