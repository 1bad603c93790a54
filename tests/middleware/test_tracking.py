"""Tracking on the StubBroker: rows, transitions, attempts, results, progress, idempotency."""

from __future__ import annotations

import time

import dramatiq
import pytest

import engine
from engine import JobState, Outcome


def wait_done(broker, worker):
    broker.join("default", fail_fast=False)
    worker.join()


def test_a_sent_job_is_tracked_from_queued_to_succeeded(stub_broker, stub_worker):
    @engine.actor
    def add(x, y):
        return x + y

    # when the actor is sent directly, not through engine.submit (the worker paused, so that
    # the job cannot start before it is looked at)
    stub_worker.pause()
    message = add.send(2, 3)
    assert engine.get(message.message_id).state == JobState.QUEUED
    stub_worker.resume()
    wait_done(stub_broker, stub_worker)

    job = engine.get(message.message_id)
    assert job.state == JobState.SUCCEEDED
    assert job.attempts == 1 and job.actor == "add" and job.args == [2, 3]
    assert engine.result(job.id) == 5
    [attempt] = engine.attempts(job.id)
    assert attempt.outcome == Outcome.SUCCEEDED and attempt.number == 1
    assert attempt.duration_ms is not None and attempt.worker_pid > 0


def test_retries_record_one_attempt_each_and_wait_as_scheduled(stub_broker, stub_worker, store):
    calls = []

    @engine.actor(max_retries=2, min_backoff=100, max_backoff=10_000)
    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError(f"try {len(calls)}")
        return "ok"

    job = engine.submit("flaky")
    deadline = time.monotonic() + 5
    while engine.get(job.id).state != JobState.SCHEDULED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.get(job.id).state == JobState.SCHEDULED  # waiting out the backoff
    wait_done(stub_broker, stub_worker)

    assert engine.get(job.id).state == JobState.SUCCEEDED
    outcomes = [a.outcome for a in engine.attempts(job.id)]
    assert outcomes == [Outcome.WILL_RETRY, Outcome.WILL_RETRY, Outcome.SUCCEEDED]
    assert engine.attempts(job.id)[0].error_message == "try 1"
    assert "ConnectionError: try 1" in engine.attempts(job.id)[0].traceback
    # exponential backoff with jitter: 100-200 ms, then 200-400 ms
    assert calls[1] - calls[0] >= 0.1 and calls[2] - calls[1] >= 0.2


def test_exhausted_retries_fail_the_job_with_its_last_error(stub_broker, stub_worker):
    @engine.actor(max_retries=1, min_backoff=10)
    def broken():
        raise ValueError("bad input")

    job = engine.submit("broken")
    wait_done(stub_broker, stub_worker)

    failed = engine.get(job.id)
    assert failed.state == JobState.FAILED and failed.last_error == "ValueError: bad input"
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.WILL_RETRY, Outcome.FAILED]
    assert stub_broker.dead_letters  # dead-lettered, so `retry` can requeue it


def test_a_permanent_error_fails_at_once(stub_broker, stub_worker):
    @engine.actor(max_retries=5, throws=(KeyError,))
    def hopeless():
        raise engine.PermanentError("not an image")

    job = engine.submit("hopeless")
    wait_done(stub_broker, stub_worker)

    assert engine.get(job.id).state == JobState.FAILED
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.FAILED]


def test_a_time_limit_records_timed_out(stub_broker, stub_worker):
    @engine.actor(time_limit=100, max_retries=0)
    def slow():
        for _ in range(300):
            time.sleep(0.01)

    job = engine.submit("slow")
    wait_done(stub_broker, stub_worker)

    assert engine.get(job.id).state == JobState.FAILED
    [attempt] = engine.attempts(job.id)
    assert attempt.outcome == Outcome.TIMED_OUT and attempt.error_type == "TimeLimitExceeded"


def test_progress_and_result_round_trip(stub_broker, stub_worker):
    @engine.actor
    def count(n):
        for i in range(n):
            engine.progress(100 * (i + 1) / n, f"item {i + 1} of {n}")
        return {"counted": n}

    job = engine.submit("count", 1000)
    wait_done(stub_broker, stub_worker)

    done = engine.get(job.id)
    assert (done.progress_percent, done.progress_message) == (100.0, "item 1000 of 1000")  # the last lands
    assert engine.result(job.id) == {"counted": 1000}


def test_a_result_over_the_limit_fails_the_job_clearly(stub_broker, stub_worker, settings):
    @engine.actor(max_retries=3)
    def huge():
        return "x" * (settings.result_max_bytes + 1)

    job = engine.submit("huge")
    wait_done(stub_broker, stub_worker)

    failed = engine.get(job.id)
    assert failed.state == JobState.FAILED and "ENGINE_RESULT_MAX_BYTES" in failed.last_error
    assert len(engine.attempts(job.id)) == 1  # a retry would not shrink it
    with pytest.raises(engine.ResultNotReady):
        engine.result(job.id)


def test_an_idempotent_resubmit_returns_the_first_job_and_enqueues_nothing(stub_broker):
    @engine.actor
    def send_invoice(number):
        pass

    first = engine.submit("send_invoice", 7, idempotency_key="invoice-7")
    again = engine.submit("send_invoice", 7, idempotency_key="invoice-7")

    assert again.id == first.id
    assert stub_broker.queues["default"].qsize() == 1
    assert len(engine.jobs().jobs) == 1


def test_bad_input_gets_a_clear_error_and_loses_no_other_job(stub_broker, stub_worker):
    @engine.actor
    def noop(*args):
        pass

    kept = engine.submit("noop", 1)
    with pytest.raises(engine.UnknownActor, match="known actors: noop"):
        engine.submit("nope")
    with pytest.raises(engine.ArgumentsNotSerializable, match="JSON-serializable"):
        noop.send(object())
    with pytest.raises(engine.JobNotFound):
        engine.get("no-such-id")
    with pytest.raises(engine.JobNotFound):
        engine.attempts("no-such-id")
    wait_done(stub_broker, stub_worker)

    assert [job.id for job in engine.jobs().jobs] == [kept.id]  # nothing half-recorded
    assert engine.get(kept.id).state == JobState.SUCCEEDED


def test_a_duplicate_message_does_not_run_a_finished_job_again(stub_broker, stub_worker):
    runs = []

    @engine.actor
    def once():
        runs.append(1)

    message = once.send()
    wait_done(stub_broker, stub_worker)
    stub_broker.enqueue(message)  # the same message delivered a second time
    wait_done(stub_broker, stub_worker)

    assert len(runs) == 1
    assert len(engine.attempts(message.message_id)) == 1


def test_a_failed_job_can_be_retried_by_hand(stub_broker, stub_worker):
    fail = {"now": True}

    @engine.actor(max_retries=0)
    def fragile():
        if fail["now"]:
            raise RuntimeError("down")

    job = engine.submit("fragile")
    wait_done(stub_broker, stub_worker)
    assert engine.get(job.id).state == JobState.FAILED

    fail["now"] = False
    assert engine.retry(job.id).state == JobState.QUEUED
    wait_done(stub_broker, stub_worker)

    assert engine.get(job.id).state == JobState.SUCCEEDED
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.FAILED, Outcome.SUCCEEDED]
    with pytest.raises(engine.InvalidJobState):
        engine.retry(job.id)


def test_jobs_pages_newest_first_with_filters(stub_broker):
    @engine.actor
    def a(i):
        pass

    @engine.actor
    def b(i):
        pass

    sent = [engine.submit("a" if i % 2 else "b", i).id for i in range(7)]
    first = engine.jobs(limit=3)
    second = engine.jobs(limit=3, cursor=first.next_cursor)
    third = engine.jobs(limit=3, cursor=second.next_cursor)

    assert [j.id for j in first.jobs + second.jobs + third.jobs] == sent[::-1]
    assert third.next_cursor is None
    assert {j.actor for j in engine.jobs(actor="a").jobs} == {"a"}
    assert len(engine.jobs(status="queued").jobs) == 7
    with pytest.raises(engine.EngineError, match="unknown status"):
        engine.jobs(status="pending")


def test_an_actor_called_as_a_plain_function_reports_progress_nowhere(stub_broker):
    @engine.actor
    def halfway():
        engine.progress(50, "half")
        return "done"

    assert halfway() == "done"
    with pytest.raises(ValueError, match="between 0 and 100"):
        engine.progress(150)


def test_an_actor_option_typo_fails_at_declaration(stub_broker):
    with pytest.raises(ValueError, match="max_retry"):
        dramatiq.actor(lambda: None, broker=stub_broker, max_retry=3)
