"""Queues through real ``engine worker`` processes: priorities, prefetch, queue depths, and (on
RabbitMQ) long delays through the hold queue."""

from __future__ import annotations

import time

import pytest

import engine
from engine import JobState

from tests.support.processes import completions, wait_for, wait_for_state

pytestmark = pytest.mark.integration

FINISHED = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED}


def wait_until_ready(supervisor, processes: int) -> None:
    """Wait until each worker process of `supervisor` consumes."""
    wait_for(
        lambda: supervisor.output().count("Worker process is ready for action.") >= processes,
        30,
        f"{processes} worker processes to be ready",
    )


def test_a_higher_priority_job_queued_behind_lower_ones_runs_first(engine_env, start_engine):
    start_engine("worker", "--processes", "1", "--threads", "1")  # prefetch: 1
    blocker = engine.submit("sleepy", 2)
    wait_for_state(blocker.id, {JobState.RUNNING})

    # given jobs queued while the only worker thread is busy, the most urgent last
    low = [engine.submit("echo", n) for n in range(3)]
    high = engine.submit("echo", "urgent", priority=10)
    assert engine.get(blocker.id).state == JobState.RUNNING

    # then the most urgent runs first once the thread is free
    done = [wait_for_state(job.id, FINISHED) for job in [*low, high]]
    assert all(job.state == JobState.SUCCEEDED for job in done)
    *low_done, high_done = done
    assert high_done.started_at < min(job.started_at for job in low_done)


def test_short_jobs_are_not_stuck_behind_a_long_one_in_a_busy_process(engine_env, start_engine):
    supervisor = start_engine("worker", "--processes", "2", "--threads", "1")  # prefetch: 1 each
    wait_until_ready(supervisor, 2)

    # when a long job is sent, then short ones
    long = engine.submit("sleepy", 4)
    short = [engine.submit("echo", n) for n in range(4)]

    # then the short ones all finish in the other process while the long one runs (with
    # Dramatiq's prefetch of two per thread, the long job's process would hold one back until
    # the long one ended; its start may still be being recorded when the short ones are done)
    done = [wait_for_state(job.id, FINISHED, timeout=10) for job in short]
    long_done = wait_for_state(long.id, FINISHED)
    assert all(job.state == JobState.SUCCEEDED for job in [*done, long_done])
    assert max(job.finished_at for job in done) < long_done.started_at + 2.5


def test_queue_depths_count_ready_and_delayed_jobs(engine_env):
    for n in range(2):
        engine.submit("echo", n)
    engine.submit("echo", "later", delay=60)

    depths = engine.queue_depths()["default"]

    assert {kind: depths[kind] for kind in ("ready", "delayed", "dead")} == {"ready": 2, "delayed": 1, "dead": 0}


# -- RabbitMQ: long delays ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["distributed"], indirect=True)
def test_a_long_delay_waits_in_the_hold_queue_and_runs_once_on_time(engine_env, short_hold, start_engine):
    supervisor = start_engine("worker", "--processes", "1", "--threads", "2")
    wait_until_ready(supervisor, 1)

    # when a job is delayed by four hold times
    job = engine.submit("echo", "later", delay=4)

    # then, until it is due, it waits in the hold queue (counted as delayed), save for at most a
    # hold time at a time when a worker holds it (unacknowledged: counted nowhere)
    samples = []
    while time.time() < job.scheduled_for:
        samples.append((time.time(), engine.queue_depths()["default"]["delayed"]))
        time.sleep(0.05)
    assert samples[0][1] == 1
    held_since, longest_held = None, 0.0
    for at, delayed in samples:
        if delayed:
            held_since = None
        else:
            held_since = held_since or at
            longest_held = max(longest_held, at - held_since)
    assert longest_held < short_hold / 1000 + 0.2

    # and it runs once, on time
    done = wait_for_state(job.id, FINISHED)
    assert done.state == JobState.SUCCEEDED
    assert job.scheduled_for <= done.started_at < job.scheduled_for + 1.5
    time.sleep(1)
    assert completions(engine_env, job.id) == 1
