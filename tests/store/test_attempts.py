"""The store's decisions when a job is delivered (run it, skip it, or leave it to a live worker),
and the audit trail its writer's batches record."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import update

from engine.job import JobState, Outcome
from engine.store import AttemptEnd, AttemptStart, StartRequest, Store
from engine.store.schema import workers

DEAD_AFTER_S = 10


@pytest.fixture
def job(store: Store) -> str:
    now = time.time()
    row = dict(
        id="job-1", actor="echo", queue="default", args="[]", kwargs="{}", options="{}",
        priority=0, idempotency_key=None, created_at=now, scheduled_for=None,
    )  # fmt: skip
    store.record_enqueue(row, delayed=False)
    return "job-1"


def start(store: Store, job_id: str, worker_id: str, pid: int = 1) -> AttemptStart:
    return decided(store.start_attempt(job_id, host="h", pid=pid, worker_id=worker_id, dead_after_s=DEAD_AFTER_S))


def decided(start: AttemptStart) -> AttemptStart:
    """The decision, without the start's time: checked here to be there when the job runs."""
    assert (start.started_at is not None) == (start.number is not None), start
    return start._replace(started_at=None)


def test_a_queued_job_starts_its_first_attempt(store, job):
    store.heartbeat("w1", host="h", pid=1)

    assert start(store, job, "w1") == AttemptStart(1)
    assert store.get(job).state == JobState.RUNNING


def test_a_job_running_under_a_live_worker_is_left_to_it(store, job):
    store.heartbeat("w1", host="h", pid=1)
    start(store, job, "w1")

    # a second delivery, e.g. after RabbitMQ closed the first consumer's channel
    assert start(store, job, "w2") == AttemptStart(None, running_elsewhere=True)
    assert [a.outcome for a in store.list_attempts(job)] == [None]  # still running, untouched


def test_a_start_tried_again_after_it_was_committed_finds_itself_not_another_delivery(store, job):
    store.heartbeat("w1", host="h", pid=1)
    request = StartRequest(job, "h", 1, "w1", DEAD_AFTER_S, time.time())
    with store.transaction() as connection:
        assert [decided(each) for each in store.dialect.start_attempts(connection, [request])] == [AttemptStart(1)]

    # the same start again, as when the reply to its commit was lost: the same attempt, no new one
    with store.transaction() as connection:
        assert [decided(each) for each in store.dialect.start_attempts(connection, [request])] == [AttemptStart(1)]
    # another delivery to the same worker is not it
    with store.transaction() as connection:
        again = request._replace(requested_at=request.requested_at + 1)
        assert [decided(each) for each in store.dialect.start_attempts(connection, [again])] == [
            AttemptStart(None, running_elsewhere=True)
        ]
    assert [a.number for a in store.list_attempts(job)] == [1]


def test_a_job_whose_worker_went_silent_is_run_again_and_its_attempt_abandoned(store, job):
    store.heartbeat("w1", host="h", pid=1)
    start(store, job, "w1")
    with store.transaction() as connection:
        connection.execute(update(workers).values(heartbeat_at=time.time() - DEAD_AFTER_S - 1))

    assert start(store, job, "w2", pid=2) == AttemptStart(2, took_over=True)
    first, second = store.list_attempts(job)
    assert (first.outcome, first.worker_pid) == (Outcome.ABANDONED, 1)  # with the worker that held it
    assert second.outcome is None and second.worker_pid == 2


def test_a_job_whose_worker_the_supervisor_saw_die_is_run_again_at_once(store, job):
    store.heartbeat("w1", host="h", pid=1)
    start(store, job, "w1")
    store.mark_workers_stopped(host="h", pid=1)

    assert start(store, job, "w2", pid=2) == AttemptStart(2, took_over=True)


def test_two_deliveries_racing_to_take_over_an_abandoned_job_run_it_once(store, job):
    store.heartbeat("w1", host="h", pid=1)
    store.heartbeat("w2", host="h", pid=2)
    store.heartbeat("w3", host="h", pid=3)
    start(store, job, "w1")
    store.mark_workers_stopped(worker_id="w1")

    assert start(store, job, "w2", pid=2) == AttemptStart(2, took_over=True)
    assert start(store, job, "w3", pid=3) == AttemptStart(None, running_elsewhere=True)  # w2 holds it now, alive
    assert [a.outcome for a in store.list_attempts(job)] == [Outcome.ABANDONED, None]


@pytest.mark.parametrize("final", [JobState.SUCCEEDED, JobState.FAILED])
def test_a_finished_job_is_never_started_again(store, job, final):
    store.heartbeat("w1", host="h", pid=1)
    start(store, job, "w1")
    store.finish_attempt(job, 1, Outcome.SUCCEEDED, state=final)
    store.mark_workers_stopped(worker_id="w1")

    assert start(store, job, "w2") == AttemptStart(None)
    assert store.get(job).attempts == 1


def test_an_unknown_job_is_not_started(store):
    assert start(store, "nope", "w1") == AttemptStart(None)


# -- the audit trail: the writer's batches (one statement per batch on PostgreSQL, where
# tests/store/test_postgres.py runs these again) -----------------------------------------------


def run_attempt(store: Store, job_id: str, outcome: Outcome, state: JobState, **fields) -> None:
    """One attempt of the job through the writer, as Tracking records it: its start, then its end."""
    request = StartRequest(job_id, "h", 1, "w1", DEAD_AFTER_S, time.time())
    started = store.start(request)
    assert started.number is not None, started
    end = AttemptEnd.of(job_id, started.number, outcome, run=request.run(started.started_at), state=state, **fields)
    store.end(end).result()


def test_a_job_that_succeeds_at_once_has_its_attempt_in_its_trail(store, job):
    store.heartbeat("w1", host="h", pid=1)
    run_attempt(store, job, Outcome.SUCCEEDED, JobState.SUCCEEDED, result="42")

    (attempt,) = store.list_attempts(job)
    ended = store.get(job)
    assert (attempt.number, attempt.outcome, attempt.worker_host, attempt.worker_pid) == (1, Outcome.SUCCEEDED, "h", 1)
    assert (attempt.started_at, attempt.finished_at) == (ended.started_at, ended.finished_at)
    assert attempt.duration_ms == pytest.approx((ended.finished_at - ended.started_at) * 1000)


def test_a_job_that_succeeds_when_retried_keeps_the_failed_attempt_with_its_traceback(store, job):
    store.heartbeat("w1", host="h", pid=1)
    run_attempt(store, job, Outcome.FAILED, JobState.FAILED, error=ValueError("flaky"), traceback="Traceback: flaky")
    store.requeue(job)  # engine retry
    run_attempt(store, job, Outcome.SUCCEEDED, JobState.SUCCEEDED)

    first, second = store.list_attempts(job)
    assert (first.number, first.outcome, first.error_type, first.traceback) == (
        1, Outcome.FAILED, "ValueError", "Traceback: flaky"
    )  # fmt: skip
    assert (second.number, second.outcome, second.error_type) == (2, Outcome.SUCCEEDED, None)
    assert second.started_at > first.started_at and second.duration_ms is not None


def test_a_success_after_its_attempt_was_taken_for_abandoned_completes_that_attempt(store, job):
    # given a job whose worker was taken for dead while it ran: attempt 1 abandoned, 2 started
    store.heartbeat("w1", host="h", pid=1)
    request = StartRequest(job, "h", 1, "w1", DEAD_AFTER_S, time.time())
    first = store.start(request)
    store.mark_workers_stopped(worker_id="w1")
    store.heartbeat("w2", host="h", pid=2)
    assert start(store, job, "w2", pid=2) == AttemptStart(2, took_over=True)

    # when the first worker, alive after all, ends attempt 1 successfully
    end = AttemptEnd.of(job, 1, Outcome.SUCCEEDED, run=request.run(first.started_at), state=JobState.SUCCEEDED)
    store.end(end).result()

    # then attempt 1's row says so, and attempt 2 is shown running, from the job's row
    trail = [(a.number, a.outcome, a.worker_pid) for a in store.list_attempts(job)]
    assert trail == [(1, Outcome.SUCCEEDED, 1), (2, None, 2)]
    assert store.get(job).state == JobState.SUCCEEDED
    # and when attempt 2 ends too (the job has ended already), it gets a row of its own
    run = request._replace(pid=2).run(time.time())
    second = AttemptEnd.of(job, 2, Outcome.SUCCEEDED, run=run, state=JobState.SUCCEEDED)
    store.end(second).result()
    trail = [(a.number, a.outcome, a.worker_pid) for a in store.list_attempts(job)]
    assert trail == [(1, Outcome.SUCCEEDED, 1), (2, Outcome.SUCCEEDED, 2)]
