"""Per-process metrics on the StubBroker: what Tracking decides is what is counted."""

from __future__ import annotations

import json
import time

import pytest
from dramatiq import Message
from prometheus_client import REGISTRY

import engine
from engine import CancelOutcome, JobState, Outcome
from engine.metrics import process as metrics
from engine.store.schema import jobs
from engine.writer import Pending
from tests.support.processes import wait_for

FINISHED = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED}


def value(name: str, **labels: str) -> float:
    """A sample of this process's default registry, 0 when it has none yet."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def attempts(actor: str, outcome: Outcome) -> float:
    return value("engine_attempts_total", actor=actor, queue="default", outcome=outcome.value)


def finished(job_id: str) -> engine.Job:
    return wait_for(lambda: (job := engine.get(job_id)).state in FINISHED and job, 10, f"{job_id} to finish")


def wait_done(broker, worker) -> None:
    broker.join("default", fail_fast=False)
    worker.join()


def test_each_outcome_is_counted_with_its_actor_and_queue(stub_broker, stub_worker):
    @engine.actor(max_retries=1, min_backoff=10, max_backoff=20)
    def metered_fails():
        raise ValueError("no")

    @engine.actor
    def metered_succeeds():
        return 1

    @engine.actor(time_limit=50, max_retries=0)
    def metered_times_out():
        time.sleep(2)

    before = {outcome: attempts("metered_fails", outcome) for outcome in Outcome}
    engine.submit("metered_fails")
    engine.submit("metered_succeeds")
    engine.submit("metered_times_out")
    wait_done(stub_broker, stub_worker)

    assert attempts("metered_fails", Outcome.WILL_RETRY) == before[Outcome.WILL_RETRY] + 1
    assert attempts("metered_fails", Outcome.FAILED) == before[Outcome.FAILED] + 1
    assert attempts("metered_fails", Outcome.SUCCEEDED) == before[Outcome.SUCCEEDED]
    assert attempts("metered_succeeds", Outcome.SUCCEEDED) == 1
    assert attempts("metered_times_out", Outcome.TIMED_OUT) == 1
    # The attempt ended: none is in progress any more.
    assert value("engine_attempts_in_progress", actor="metered_succeeds", queue="default") == 0


def test_a_canceled_attempt_is_counted_as_canceled(stub_broker, stub_worker):
    @engine.actor(max_retries=3)
    def metered_cancelable():
        for _ in range(1000):
            engine.cancel_requested()
            time.sleep(0.01)

    job = engine.submit("metered_cancelable")
    wait_for(lambda: engine.get(job.id).state == JobState.RUNNING, 5, "the job to run")
    assert value("engine_attempts_in_progress", actor="metered_cancelable", queue="default") == 1
    assert engine.cancel(job.id).outcome == CancelOutcome.REQUESTED
    finished(job.id)
    wait_for(lambda: attempts("metered_cancelable", Outcome.CANCELED) == 1, 5, "the cancel to be counted")
    assert value("engine_attempts_in_progress", actor="metered_cancelable", queue="default") == 0


def test_an_attempt_closed_as_abandoned_by_a_takeover_is_counted(stub_broker, stub_worker, store):
    @engine.actor
    def metered_report():
        return "done"

    job = engine.submit("metered_report", delay=60)  # not due: only the redelivery below runs it
    # As if a worker, dead since, had started it.
    store.start_attempt(job.id, host="gone", pid=1, worker_id="dead-worker", dead_after_s=10)
    stub_broker.enqueue(Message(queue_name="default", actor_name="metered_report", args=(), kwargs={}, options={}, message_id=job.id))

    assert finished(job.id).state == JobState.SUCCEEDED
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.ABANDONED, Outcome.SUCCEEDED]
    assert attempts("metered_report", Outcome.ABANDONED) == 1
    assert attempts("metered_report", Outcome.SUCCEEDED) == 1


def test_a_job_is_counted_as_enqueued_once_however_often_it_is_retried(stub_broker, stub_worker):
    @engine.actor(max_retries=2, min_backoff=10, max_backoff=20)
    def metered_retried():
        raise ConnectionError("down")

    job = engine.submit("metered_retried")
    wait_done(stub_broker, stub_worker)
    assert finished(job.id).attempts == 3
    assert value("engine_jobs_enqueued_total", actor="metered_retried", queue="default") == 1

    engine.retry(job.id)  # requeued by hand: sent again
    wait_done(stub_broker, stub_worker)
    assert value("engine_jobs_enqueued_total", actor="metered_retried", queue="default") == 2
    assert attempts("metered_retried", Outcome.WILL_RETRY) + attempts("metered_retried", Outcome.FAILED) == 6


def test_durations_and_queue_waits_are_observed(stub_broker, stub_worker):
    @engine.actor
    def metered_sleeps(seconds):
        time.sleep(seconds)

    for _ in range(3):
        engine.submit("metered_sleeps", 0.05)
    wait_done(stub_broker, stub_worker)

    labels = {"actor": "metered_sleeps", "queue": "default"}
    assert value("engine_attempt_duration_seconds_count", **labels) == 3
    assert value("engine_attempt_duration_seconds_sum", **labels) >= 3 * 0.05
    assert value("engine_attempt_duration_seconds_bucket", le="0.025", **labels) == 0
    assert value("engine_queue_wait_seconds_count", **labels) == 3
    assert value("engine_queue_wait_seconds_bucket", le="+Inf", **labels) == 3


def test_a_delayed_job_waits_from_its_due_time_which_its_row_does_not_keep(stub_broker, stub_worker, store):
    @engine.actor
    def metered_later():
        return None

    stub_worker.pause()
    sent_at_ms = int(time.time() * 1000)
    job = engine.submit("metered_later", delay=5)
    [encoded] = list(stub_broker.queues["default.DQ"].queue)
    due_ms = Message.decode(encoded).options[metrics.DUE_OPTION]
    assert sent_at_ms + 5000 <= due_ms <= time.time() * 1000 + 5000
    # A requeue by hand starts from the row's options: it must fall due anew.
    with store.transaction() as connection:
        options = json.loads(connection.execute(jobs.select().where(jobs.c.id == job.id)).one().options)
    assert metrics.DUE_OPTION not in options


def test_the_queue_wait_is_measured_from_the_due_time():
    message = Message(queue_name="waits.DQ", actor_name="metered_waits", args=(), kwargs={}, options={})
    started_at = time.time()
    message.options[metrics.DUE_OPTION] = int((started_at - 2) * 1000)

    metrics.attempt_started(message, started_at)

    labels = {"actor": "metered_waits", "queue": "waits"}  # the queue's canonical name
    assert value("engine_queue_wait_seconds_sum", **labels) == pytest.approx(2, abs=0.002)
    assert value("engine_attempts_in_progress", **labels) == 1


@pytest.mark.parametrize("failed", [False, True])
def test_an_attempt_is_counted_once_its_end_is_committed(failed):
    message = Message(queue_name="commits", actor_name=f"metered_commit_{failed}", args=(), kwargs={}, options={})
    labels = {"actor": message.actor_name, "queue": "commits"}
    recorded: Pending[None] = Pending()
    metrics.attempt_started(message, time.time())

    metrics.attempt_ended(message, Outcome.SUCCEEDED, time.time(), recorded)

    assert value("engine_attempts_in_progress", **labels) == 0  # no longer running, at once
    assert value("engine_attempts_total", outcome="succeeded", **labels) == 0
    if failed:
        recorded.set_exception(OSError("the store is gone"))
    else:
        recorded.set_result(None)
    assert value("engine_attempts_total", outcome="succeeded", **labels) == (0 if failed else 1)
    assert value("engine_attempt_duration_seconds_count", **labels) == (0 if failed else 1)
