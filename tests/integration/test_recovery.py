"""Nothing lost, nothing run twice: dead workers, dropped connections, consumer timeouts, a
RabbitMQ restart. Distributed mode unless said otherwise."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest
from sqlalchemy import func, select

import engine
from engine import JobState, Outcome
from engine.store.schema import jobs
from tests.support import actors
from tests.support.processes import completions, run_process, wait_for, wait_for_state

pytestmark = pytest.mark.integration

FINISHED = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED}


def restart_rabbitmq() -> None:
    for command in (["stop_app"], ["start_app"], ["await_startup"]):
        subprocess.run(["rabbitmqctl", *command], check=True, capture_output=True, timeout=120)


def restart_postgresql() -> None:
    cluster = subprocess.run(["ls", "/etc/postgresql"], check=True, capture_output=True, text=True).stdout.split()[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )


def running_worker_pid(job_id: str) -> int:
    [attempt] = [a for a in engine.attempts(job_id) if a.finished_at is None]
    return attempt.worker_pid


def test_a_dead_workers_job_runs_again_once_and_its_attempt_is_abandoned(engine_env, start_engine):
    supervisor = start_engine("worker", "--processes", "2", "--threads", "2")
    job = engine.submit("sleepy", 3)
    wait_for_state(job.id, {JobState.RUNNING})
    holder = running_worker_pid(job.id)
    sibling = [p for p in psutil.Process(supervisor.pid).children() if p.pid != holder]

    psutil.Process(holder).kill()

    assert wait_for_state(job.id, FINISHED, timeout=60).state == JobState.SUCCEEDED
    first, second = engine.attempts(job.id)
    assert (first.outcome, first.worker_pid) == (Outcome.ABANDONED, holder)
    assert second.outcome == Outcome.SUCCEEDED and second.worker_pid != holder
    assert completions(engine_env, job.id) == 1
    assert all(p.is_running() for p in sibling)


@pytest.mark.parametrize("mode", ["distributed"], indirect=True)
def test_a_slow_but_alive_job_is_not_run_again_when_connections_drop(engine_env, start_engine):
    start_engine("worker", "--processes", "2", "--threads", "2")
    job = engine.submit("sleepy", 5)
    wait_for_state(job.id, {JobState.RUNNING})

    # RabbitMQ requeues the unacked message, and a second worker receives it
    vhost = engine_env["ENGINE_BROKER_URL"].rsplit("/", 1)[1]
    subprocess.run(["rabbitmqctl", "close_all_connections", "-p", vhost, "test"], check=True, capture_output=True)

    assert wait_for_state(job.id, FINISHED, timeout=60).state == JobState.SUCCEEDED
    time.sleep(1)
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.SUCCEEDED]
    assert completions(engine_env, job.id) == 1


@pytest.mark.parametrize("mode", ["distributed"], indirect=True)
def test_a_job_longer_than_the_consumer_timeout_runs_exactly_once(
    consumer_timeout_ms, engine_env, short_hold, start_engine
):
    # short_hold keeps delays (the re-checks of the running job) below the timeout, as deployments must
    start_engine("worker", "--processes", "2", "--threads", "2")
    job = engine.submit("sleepy", 3 * consumer_timeout_ms / 1000)

    assert wait_for_state(job.id, FINISHED, timeout=60).state == JobState.SUCCEEDED
    time.sleep(2)  # a second run, had one started, would show now
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.SUCCEEDED]
    assert completions(engine_env, job.id) == 1
    assert wait_for_state(engine.submit("echo", "after").id, FINISHED).state == JobState.SUCCEEDED


#: A process that sends a job and a delayed one, and is killed once their rows are committed,
#: before its sender thread could publish their messages (it is kept from doing so).
KILLED_SENDER = """
import os, signal
import engine
from engine.brokers.rabbitmq.sender import Publisher
from tests.support import actors
Publisher.__call__ = lambda self, batch: signal.pause()
print(actors.echo.send("lost").message_id)
print(actors.echo.send_with_options(args=("late",), delay=300).message_id, flush=True)
engine.app.get_store().writer.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_sender(env: dict[str, str]) -> list[str]:
    """Run `KILLED_SENDER`; the ids of the jobs it sent."""
    done = run_process(
        [sys.executable, "-c", KILLED_SENDER], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize("mode", ["distributed"], indirect=True)
def test_jobs_whose_sender_was_killed_before_sending_them_run_once(engine_env, start_engine):
    # given jobs recorded by a process killed before it sent their messages
    ids = killed_sender(engine_env)
    assert [engine.get(job_id).state for job_id in ids] == [JobState.QUEUED, JobState.SCHEDULED]

    # when workers run (whose senders would give up after 0.5 s: one of them looks for such
    # jobs every 0.5 s, untouched for 1 s)
    engine_env["ENGINE_SEND_BEHIND_TIMEOUT_S"] = "0.5"
    start_engine("worker", "--processes", "2", "--threads", "2")

    # then each job is sent again and runs, once
    done = [wait_for_state(job_id, FINISHED, timeout=30) for job_id in ids]
    assert [job.state for job in done] == [JobState.SUCCEEDED, JobState.SUCCEEDED]
    assert [completions(engine_env, job_id) for job_id in ids] == [1, 1]


@pytest.mark.parametrize("mode", ["distributed"], indirect=True)
def test_a_postgresql_restart_loses_no_job_and_runs_none_twice(engine_env, start_engine):
    sent = [actors.sleepy.send(0.05).message_id for _ in range(300)]
    start_engine("worker", "--processes", "2", "--threads", "4")
    store = engine.get_store()

    def succeeded() -> int:
        with store.reading() as connection:
            return connection.execute(select(func.count()).where(jobs.c.state == JobState.SUCCEEDED)).scalar()

    wait_for(lambda: succeeded() >= 50, 60, "50 jobs done")
    restart_postgresql()  # workers are mid-job: their start and end writes must wait for it

    wait_for(lambda: succeeded() == len(sent), 120, "every job to succeed")
    for job_id in sent:
        assert completions(engine_env, job_id) == 1
        assert [a.outcome for a in engine.attempts(job_id)] == [Outcome.SUCCEEDED]


@pytest.mark.parametrize("mode", ["distributed"], indirect=True)
def test_5000_jobs_survive_killed_workers_and_a_rabbitmq_restart(engine_env, start_engine):
    total = 5000
    # All queued before any worker starts, so that the chaos below meets a full queue.
    sent = [actors.sleepy.send(0.03).message_id for _ in range(total)]
    supervisor = start_engine("worker", "--processes", "2", "--threads", "8")
    store = engine.get_store()

    def succeeded() -> int:
        with store.reading() as connection:
            return connection.execute(select(func.count()).where(jobs.c.state == JobState.SUCCEEDED)).scalar()

    killed: list[int] = []

    def kill_a_worker(after: int) -> None:
        wait_for(lambda: succeeded() >= after, 120, f"{after} jobs done")
        victim = random.choice(wait_for(lambda: psutil.Process(supervisor.pid).children(), 10, "workers"))
        killed.append(victim.pid)
        victim.kill()

    kill_a_worker(after=300)
    kill_a_worker(after=900)
    wait_for(lambda: succeeded() >= 1500, 120, "1500 jobs done")
    restart_rabbitmq()
    kill_a_worker(after=min(succeeded() + 300, total - 500))

    wait_for(lambda: succeeded() == total, 300, "every job to succeed")
    time.sleep(2)  # anything run twice would finish by now
    with store.reading() as connection:
        states = dict(connection.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all())
    trail = [attempt for job_id in sent for attempt in store.list_attempts(job_id)]
    assert states == {JobState.SUCCEEDED: total}
    succeeded_attempts = Counter(attempt.outcome for attempt in trail if attempt.outcome == Outcome.SUCCEEDED)
    assert succeeded_attempts == {Outcome.SUCCEEDED: total}
    abandoned = {attempt.job_id for attempt in trail if attempt.outcome == Outcome.ABANDONED}
    assert {attempt.outcome for attempt in trail} <= {Outcome.SUCCEEDED, Outcome.ABANDONED}
    assert abandoned, "the kills hit no running job: the test proved nothing"
    assert {attempt.worker_pid for attempt in trail if attempt.outcome == Outcome.ABANDONED} <= set(killed)
    for job_id in sent:
        runs = completions(engine_env, job_id)
        assert runs == 1 or (job_id in abandoned and runs == 2), f"job {job_id} completed {runs} times"
