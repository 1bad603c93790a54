"""The engine end to end, in real processes, in both modes (embedded and distributed).

Each test starts ``engine worker`` or ``engine run`` against its own store and broker, sends
jobs, and reads the outcome back through the Python API.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

import engine
from engine import JobState, Outcome

from tests.support.processes import completions, run_python, wait_for, wait_for_state

pytestmark = pytest.mark.integration

FINISHED = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED}


def workers_of(process) -> list[psutil.Process]:
    return psutil.Process(process.pid).children()


def test_a_job_sent_by_another_process_runs_and_is_tracked(engine_env, start_engine):
    start_engine("worker", "--processes", "2", "--threads", "2")

    # given a job sent with actor.send() from a process that is neither the test nor a worker
    job_id = run_python(
        "from tests.support import actors; print(actors.echo.send('hello').message_id)", engine_env
    )

    job = wait_for_state(job_id, FINISHED)
    assert job.state == JobState.SUCCEEDED and job.attempts == 1
    assert engine.result(job_id) == "hello"
    [attempt] = engine.attempts(job_id)
    assert attempt.outcome == Outcome.SUCCEEDED and attempt.worker_pid != os.getpid()
    assert completions(engine_env, job_id) == 1


def test_retries_back_off_and_record_one_attempt_each(engine_env, start_engine):
    start_engine("worker", "--processes", "1", "--threads", "2")

    job = engine.submit("flaky", 2)

    assert wait_for_state(job.id, FINISHED).state == JobState.SUCCEEDED
    trail = engine.attempts(job.id)
    assert [a.outcome for a in trail] == [Outcome.WILL_RETRY, Outcome.WILL_RETRY, Outcome.SUCCEEDED]
    assert trail[0].error_type == "ConnectionError" and "attempt 1 failed" in trail[0].traceback
    gaps = [later.started_at - earlier.finished_at for earlier, later in zip(trail, trail[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # min_backoff 200 ms, doubling


@pytest.mark.parametrize("actor", ["flaky_at_once", "flaky_within_a_millisecond"])
def test_a_retry_with_no_backoff_runs_at_once(engine_env, start_engine, actor):
    start_engine("worker", "--processes", "1", "--threads", "2")
    wait_for_state(engine.submit("echo", "warm-up").id, FINISHED)  # the worker is up

    # given a job whose first attempt fails and whose retry is due at once
    job = engine.submit(actor, 1)

    # then it succeeds at its second attempt within a second, each attempt recorded
    succeeded = wait_for_state(job.id, FINISHED, timeout=1)
    assert succeeded.state == JobState.SUCCEEDED and succeeded.attempts == 2
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.WILL_RETRY, Outcome.SUCCEEDED]


def test_a_permanent_error_fails_at_once(engine_env, start_engine):
    start_engine("worker", "--processes", "1", "--threads", "1")

    job = engine.submit("hopeless")

    failed = wait_for_state(job.id, FINISHED)
    assert failed.state == JobState.FAILED and "can never succeed" in failed.last_error
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.FAILED]


def test_a_time_limit_interrupts_a_busy_loop_and_records_timed_out(engine_env, start_engine):
    start_engine("worker", "--processes", "1", "--threads", "1")

    job = engine.submit("busy_loop", 30)

    assert wait_for_state(job.id, FINISHED, timeout=20).state == JobState.FAILED
    [attempt] = engine.attempts(job.id)
    assert attempt.outcome == Outcome.TIMED_OUT and attempt.duration_ms < 5_000


def test_progress_and_result_round_trip(engine_env, start_engine):
    start_engine("worker", "--processes", "1", "--threads", "1")

    job = engine.submit("counted", 30)

    done = wait_for_state(job.id, FINISHED)
    assert done.state == JobState.SUCCEEDED
    assert (done.progress_percent, done.progress_message) == (100.0, "step 30 of 30")
    assert engine.result(job.id) == {"steps": 30}


def test_an_idempotent_resubmit_enqueues_nothing(engine_env, start_engine):
    first = engine.submit("echo", 1, idempotency_key="import-2026-11-22")
    again_id = run_python(
        "import engine.actors, engine; print(engine.submit('echo', 1, idempotency_key='import-2026-11-22').id)",
        engine_env,
    )
    start_engine("worker", "--processes", "1", "--threads", "2")

    assert again_id == first.id
    wait_for_state(first.id, FINISHED)
    time.sleep(0.5)  # a second message, had one been sent, would run now
    assert completions(engine_env, first.id) == 1
    assert len(engine.jobs().jobs) == 1


def test_sigkill_of_engine_run_loses_no_job(engine_env, start_engine):
    run = start_engine("run", "--processes", "1", "--threads", "1")
    running = engine.submit("sleepy", 2)
    wait_for_state(running.id, {JobState.RUNNING})
    queued = [engine.submit("echo", n) for n in range(3)]
    delayed = engine.submit("echo", "later", delay=2)
    children = workers_of(run)

    # when the whole engine dies at once, mid-job
    run.kill()
    psutil.wait_procs(children, timeout=5)
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    start_engine("run", "--processes", "1", "--threads", "2")

    # then every job still ends, once, and the interrupted one shows its abandoned attempt
    for job in [running, *queued, delayed]:
        assert wait_for_state(job.id, FINISHED, timeout=60).state == JobState.SUCCEEDED
        assert completions(engine_env, job.id) == 1
    assert [a.outcome for a in engine.attempts(running.id)] == [Outcome.ABANDONED, Outcome.SUCCEEDED]
    assert engine.get(delayed.id).started_at >= delayed.scheduled_for


def test_a_killed_worker_process_is_back_within_two_seconds_and_its_sibling_is_undisturbed(
    engine_env, start_engine
):
    supervisor = start_engine("worker", "--processes", "2", "--threads", "1")
    wait_for(lambda: len(workers_of(supervisor)) == 2, 20, "two workers")
    # one long job in each process (one thread and a prefetch of one each)
    jobs = [engine.submit("sleepy", 4) for _ in range(2)]
    wait_for(lambda: all(engine.get(job.id).state == JobState.RUNNING for job in jobs), 20, "both jobs running")
    by_pid = {engine.attempts(job.id)[0].worker_pid: job for job in jobs}
    victim, sibling = (psutil.Process(pid) for pid in by_pid)

    victim.kill()
    killed_at = time.monotonic()
    wait_for(lambda: [p for p in workers_of(supervisor) if p.pid not in by_pid], 5, "a replacement")

    assert time.monotonic() - killed_at < 2
    sibling_job = by_pid[sibling.pid]
    assert wait_for_state(sibling_job.id, FINISHED, timeout=30).state == JobState.SUCCEEDED
    assert [a.outcome for a in engine.attempts(sibling_job.id)] == [Outcome.SUCCEEDED]  # never interrupted
    victim_job = by_pid[victim.pid]
    assert wait_for_state(victim_job.id, FINISHED, timeout=60).state == JobState.SUCCEEDED
    assert [a.outcome for a in engine.attempts(victim_job.id)] == [Outcome.ABANDONED, Outcome.SUCCEEDED]
