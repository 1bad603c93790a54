"""Cancellation end to end, in real processes, in both modes (embedded and distributed).

Workers run as ``engine worker``; this process cancels through the Python API (or ``engine
cancel`` in another process) and reads the outcome back. Unless a test says otherwise, workers
look in the store for cancel requests only every 30 s, so a job stopped within a second was
stopped by the push.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine
from engine import CancelOutcome, JobState, Outcome
from engine.middleware.cancellation import Cancellation

from tests.support.processes import completions, run_process, wait_for, wait_for_state

pytestmark = pytest.mark.integration

FINISHED = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED}

#: The spec'd bound from the cancel call to the end of the running attempt.
INTERRUPT_WITHIN_S = 1.0


@pytest.fixture
def push_only(engine_env) -> dict[str, str]:
    """Workers that look in the store for cancel requests only every 30 s."""
    engine_env["ENGINE_CANCEL_CHECK_INTERVAL_S"] = "30"
    return engine_env


def starts(env: dict[str, str], job_id: str) -> int:
    """How many times the job's body started (the cancellation actors record it)."""
    path = Path(env["ENGINE_TEST_SIDE_EFFECTS"]) / f"{job_id}.started"
    return len(path.read_text().splitlines()) if path.exists() else 0


def start_running(actor: str, *args) -> engine.Job:
    job = engine.submit(actor, *args)
    wait_for_state(job.id, {JobState.RUNNING})
    return job


def cancel_running(job_id: str) -> float:
    """Cancel a running job and wait for it to end; seconds from the call to its attempt's end."""
    requested_at = time.time()
    assert engine.cancel(job_id).outcome == CancelOutcome.REQUESTED
    wait_for_state(job_id, FINISHED, timeout=10)
    return engine.attempts(job_id)[-1].finished_at - requested_at


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_process(
        [sys.executable, "-m", "engine.cli", *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


# -- waiting jobs ---------------------------------------------------------------------------------


def test_a_job_canceled_while_queued_never_starts(engine_env, push_only, start_engine):
    # given jobs waiting for a worker
    queued = engine.submit("tight_loop", 5)
    delayed = engine.submit("tight_loop", 5, delay=1)

    answers = [engine.cancel(queued.id), engine.cancel(delayed.id), engine.cancel(queued.id)]

    assert [answer.outcome for answer in answers] == [CancelOutcome.CANCELED] * 3
    assert all(answer.job.state == JobState.CANCELED and answer.job.finished_at for answer in answers)
    # when a worker starts and receives their messages (the delayed one once it is due)
    start_engine("worker", "--processes", "1", "--threads", "2")
    marker = engine.submit("echo", "after")
    assert wait_for_state(marker.id, FINISHED).state == JobState.SUCCEEDED
    time.sleep(2)
    # then neither ran
    for job in (queued, delayed):
        assert starts(engine_env, job.id) == 0
        assert engine.get(job.id).state == JobState.CANCELED
    assert engine.attempts(queued.id) == []


def test_cancel_during_a_retry_backoff_ends_the_job_for_good(engine_env, push_only, start_engine):
    start_engine("worker", "--processes", "1", "--threads", "2")
    job = engine.submit("always_failing")
    wait_for_state(job.id, {JobState.SCHEDULED})  # its first attempt failed; the next in 2-4 s

    answer = engine.cancel(job.id)

    assert answer.outcome == CancelOutcome.CANCELED and answer.job.state == JobState.CANCELED
    time.sleep(5)  # past the backoff
    assert starts(engine_env, job.id) == 1  # never ran again
    assert engine.get(job.id).state == JobState.CANCELED
    trail = engine.attempts(job.id)
    assert trail[0].outcome == Outcome.WILL_RETRY
    assert len(trail) == 1  # its stale retry message started nothing


def test_a_canceled_waiting_job_stays_canceled_when_its_message_falls_due(engine_env, push_only, start_engine):
    start_engine("worker", "--processes", "1", "--threads", "2")
    backing_off = engine.submit("always_failing")
    wait_for_state(backing_off.id, {JobState.SCHEDULED})
    engine.cancel(backing_off.id)
    delayed = engine.submit("echo", "later", delay=1)
    engine.cancel(delayed.id)

    states = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states |= {engine.get(delayed.id).state, engine.get(backing_off.id).state}
        time.sleep(0.02)

    assert states == {JobState.CANCELED}
    assert engine.attempts(delayed.id) == []
    assert [a.outcome for a in engine.attempts(backing_off.id)] == [Outcome.WILL_RETRY]


# -- running jobs ---------------------------------------------------------------------------------


def test_cancel_interrupts_a_tight_loop_within_a_second_and_the_thread_takes_the_next_job(
    engine_env, push_only, start_engine
):
    start_engine("worker", "--processes", "1", "--threads", "1")
    job = start_running("tight_loop", 60)

    latency = cancel_running(job.id)

    assert latency < INTERRUPT_WITHIN_S
    assert engine.get(job.id).state == JobState.CANCELED
    [attempt] = engine.attempts(job.id)
    assert attempt.outcome == Outcome.CANCELED and attempt.error_type == "JobCanceled"
    # the worker's only thread runs the next job; the canceled one is never retried (max_retries=3)
    following = engine.submit("echo", "next")
    assert wait_for_state(following.id, FINISHED).state == JobState.SUCCEEDED
    assert engine.attempts(following.id)[0].worker_pid == attempt.worker_pid
    time.sleep(0.5)
    assert len(engine.attempts(job.id)) == 1 and engine.get(job.id).state == JobState.CANCELED
    assert completions(engine_env, job.id) == 0


def test_cancel_stops_cooperative_code_on_whichever_process_runs_it(engine_env, push_only, start_engine):
    start_engine("worker", "--processes", "2", "--threads", "2")
    jobs = [engine.submit("cooperative", 10_000) for _ in range(3)]
    for job in jobs:
        wait_for(lambda: engine.get(job.id).progress_percent, 30, f"progress of {job.id}")

    latencies = [cancel_running(job.id) for job in jobs]

    assert max(latencies) < INTERRUPT_WITHIN_S
    for job in jobs:
        assert engine.get(job.id).state == JobState.CANCELED
        assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.CANCELED]
        assert completions(engine_env, job.id) == 0  # its `except Exception` did not swallow it
    assert len({engine.attempts(job.id)[0].worker_pid for job in jobs}) == 2  # both processes


def test_a_worker_that_missed_the_push_finds_the_cancel_in_the_store(engine_env, start_engine, monkeypatch):
    engine_env["ENGINE_CANCEL_CHECK_INTERVAL_S"] = "0.3"
    monkeypatch.setattr(Cancellation, "broadcast", lambda self, job_id: None)  # the push is lost
    start_engine("worker", "--processes", "1", "--threads", "1")
    job = start_running("tight_loop", 60)

    latency = cancel_running(job.id)

    assert latency < 0.3 + INTERRUPT_WITHIN_S
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.CANCELED]


@pytest.mark.parametrize("mode", ["distributed"])
def test_the_listener_reconnects_when_rabbitmq_drops_its_connection(engine_env, push_only, start_engine):
    start_engine("worker", "--processes", "1", "--threads", "1")
    vhost = engine_env["ENGINE_BROKER_URL"].rsplit("/", 1)[1]
    listeners = wait_for(lambda: _cancel_listeners(vhost), 30, "the cancel listener's connection")

    for pid in listeners:
        subprocess.run(["rabbitmqctl", "close_connection", pid, "test"], check=True, capture_output=True, timeout=60)
    wait_for(lambda: set(_cancel_listeners(vhost)) - set(listeners), 30, "a new cancel listener connection")
    job = start_running("tight_loop", 60)

    assert cancel_running(job.id) < INTERRUPT_WITHIN_S
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.CANCELED]


def _cancel_listeners(vhost: str) -> list[str]:
    """The pids of the vhost's connections named as cancel listeners."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "-p", vhost, "pid", "client_properties"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [line.split("\t", 1)[0] for line in listed.splitlines() if "cancel listener" in line]


# -- answers --------------------------------------------------------------------------------------


def test_cancel_answers_for_each_state_from_the_api_and_the_cli(engine_env, push_only, start_engine):
    start_engine("worker", "--processes", "1", "--threads", "2")
    done = engine.submit("echo", "done")
    finished = wait_for_state(done.id, FINISHED)
    running = start_running("cooperative", 10_000)

    # a running job, canceled from another process: the CLI
    first = cli(engine_env, "cancel", running.id, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["outcome"] == "cancel-requested"
    assert json.loads(first.stdout)["job"]["state"] == "running"
    wait_for_state(running.id, FINISHED, timeout=5)
    again = cli(engine_env, "cancel", running.id)
    assert again.returncode == 0 and re.match(rf"{running.id} canceled\s*$", again.stdout), again.stdout
    assert engine.cancel(running.id).outcome == CancelOutcome.CANCELED
    assert [a.outcome for a in engine.attempts(running.id)] == [Outcome.CANCELED]

    # a finished job is left as it is
    answer = engine.cancel(done.id)
    assert answer.outcome == CancelOutcome.ALREADY_FINISHED and answer.job == finished
    shown = cli(engine_env, "cancel", done.id)
    assert shown.returncode == 0 and "already finished" in shown.stdout

    # an unknown id
    with pytest.raises(engine.JobNotFound):
        engine.cancel("no-such-id")
    unknown = cli(engine_env, "cancel", "no-such-id")
    assert unknown.returncode == 2 and "no job with id 'no-such-id'" in unknown.stderr
