"""Cron schedules with real scheduler processes, in both modes: exactly one job per fire time
however many schedulers run or die, a crash between claim and publish, changes made on one
host firing on another's scheduler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import select

import engine
from engine.store.schema import jobs
from scheduler.ledger import FireOutcome
from scheduler.service import Scheduler

from tests.support.processes import completions, start_process, wait_for

#: What `tests.support.actors.echo` needs to run as a schedule's job every second.
EVERY_SECOND = "* * * * * *"


def _fire_times(name: str) -> list[float]:
    return sorted(job.fire_time for job in engine.jobs(schedule=name, limit=1000).jobs)


def test_each_fire_time_makes_exactly_one_job_while_schedulers_come_and_die(start_engine):
    # Given two schedulers, and a schedule defined here once they run
    schedulers = [start_engine("scheduler"), start_engine("scheduler")]
    time.sleep(3)  # both have loaded the (empty) store
    defined_at = time.time()
    engine.set_schedule("tick", "echo", EVERY_SECOND, args=["tick"])
    # Then it fires on theirs within 5 s
    wait_for(lambda: _fire_times("tick"), 5, "the first job of a schedule defined in another process")
    assert _fire_times("tick")[0] - defined_at < 5
    # When a third joins, and later one of the first two is killed
    time.sleep(7)
    schedulers.append(start_engine("scheduler"))
    time.sleep(6)
    schedulers[0].kill()
    killed_at = time.time()
    time.sleep(8)
    engine.pause_schedule("tick")
    time.sleep(1.5)  # a fire under way when the pause came is committed by now
    # Then every fire time from the first to the last has one job, none twice, none missing
    fire_times = _fire_times("tick")
    assert fire_times[-1] - fire_times[0] >= 20
    assert len(set(fire_times)) == len(fire_times), "a fire time made two jobs"
    assert fire_times == [fire_times[0] + second for second in range(len(fire_times))], "a fire time made no job"
    assert fire_times[-1] > killed_at + 5
    # and at most one was late by more than a second (the scheduler that died was one of several)
    lateness = [job.created_at - job.fire_time for job in engine.jobs(schedule="tick", limit=1000).jobs]
    assert sum(late > 1.0 for late in lateness) <= 1, sorted(lateness)[-5:]
    # and the ledger says each was enqueued
    fires = engine.schedule_fires("tick", limit=1000)
    assert {fire.outcome for fire in fires} == {FireOutcome.ENQUEUED}
    assert sorted(fire.fire_time for fire in fires) == fire_times


def test_a_change_made_here_fires_on_a_scheduler_process_within_5_s(start_engine):
    start_engine("scheduler")
    engine.set_schedule("greeting", "echo", EVERY_SECOND, args=["hello"])
    wait_for(lambda: engine.jobs(schedule="greeting").jobs, 8, "a job of the new schedule")
    changed_at = time.time()
    engine.set_schedule("greeting", "echo", EVERY_SECOND, args=["changed"])
    wait_for(
        lambda: any(job.args == ["changed"] for job in engine.jobs(schedule="greeting").jobs), 5, "a job with the new args"
    )
    assert time.time() - changed_at < 5


#: A scheduler that dies after the commit of its first claim, before the message is sent.
_CRASHING_SCHEDULER = """
import os
from scheduler.service import Scheduler
Scheduler._send = lambda self, message: os._exit(9)
from scheduler.__main__ import main
main([])
"""


@pytest.mark.parametrize("mode", ["distributed"], indirect=True)
def test_a_scheduler_killed_between_claim_and_publish_still_runs_the_job_once(engine_env, start_engine, tmp_path):
    # Given workers that look for jobs whose message was never sent every second
    engine_env["ENGINE_SEND_BEHIND_TIMEOUT_S"] = "1"
    start_engine("worker", "--processes", "1")
    engine.set_schedule("fragile", "echo", EVERY_SECOND, args=["once"])
    # When a scheduler claims a fire time, commits its job's row and dies before publishing
    with open(tmp_path / "crashing.log", "wb") as log:
        crashing = start_process(
            [sys.executable, "-c", _CRASHING_SCHEDULER], env={**os.environ, **engine_env}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            assert crashing.wait(timeout=30) == 9
        finally:
            if crashing.poll() is None:
                crashing.send_signal(signal.SIGKILL)
    engine.pause_schedule("fragile")
    [job] = engine.jobs(schedule="fragile").jobs
    # Then the job is recorded, is sent again by the workers' resend, and runs once
    wait_for(lambda: engine.get(job.id).state == "succeeded", 30, "the job whose message was never sent to run")
    time.sleep(3)  # another resend round: it must not run the job again
    assert completions(engine_env, job.id) == 1
    assert [(fire.outcome, fire.job_id) for fire in engine.schedule_fires("fragile")] == [(FireOutcome.ENQUEUED, job.id)]


@pytest.mark.parametrize("mode", ["embedded"], indirect=True)
def test_engine_run_supervises_a_scheduler_beside_the_workers(start_engine):
    # Given the whole engine on one machine
    whole = start_engine("run", "--processes", "1")
    engine.set_schedule("heartbeat", "echo", EVERY_SECOND, args=["beat"])
    # Then its scheduler fires the schedule and its workers run the jobs
    wait_for(lambda: any(job.state == "succeeded" for job in engine.jobs(schedule="heartbeat").jobs), 30, "a job run")
    # and one SIGTERM stops them all
    assert whole.stop() == 0


def _jobs_by_schedule() -> dict[str, list[float]]:
    """Each schedule's jobs' fire times, sorted."""
    query = select(jobs.c.schedule, jobs.c.fire_time).where(jobs.c.schedule.is_not(None))
    with engine.get_store().reading() as connection:
        found: dict[str, list[float]] = {}
        for name, fire_time in connection.execute(query):
            found.setdefault(name, []).append(fire_time)
    return {name: sorted(fire_times) for name, fire_times in found.items()}


#: Schedules due at the same second: their fires are claimed in batches.
BATCH_NAMES = [f"batch-{number:03d}" for number in range(200)]


@pytest.mark.parametrize("mode", ["distributed"], indirect=True)
def test_two_schedulers_claiming_the_same_batch_at_once_make_one_job_per_fire(engine_env):
    # Given 200 schedules due at the same second, and two schedulers that know them
    for name in BATCH_NAMES:
        engine.set_schedule(name, "echo", EVERY_SECOND, args=[name])
    schedulers = [Scheduler(engine.get_broker(), engine.get_store()) for _ in range(2)]
    for scheduler in schedulers:
        scheduler.sync()
    fire_time = float(int(time.time()) + 1)
    time.sleep(fire_time - time.time())
    # When both fire that second's batch at the same moment
    together = threading.Barrier(2)
    sent: list[list[str]] = [[], []]

    def fire(number: int) -> None:
        scheduler = schedulers[number]
        scheduler._send = lambda messages: sent[number].extend(message.message_id for message in messages)  # type: ignore[method-assign]
        together.wait()
        scheduler.fire_due({name: [fire_time] for name in BATCH_NAMES})

    threads = [threading.Thread(target=fire, args=(number,)) for number in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Then each schedule has one job for it, sent by the scheduler that created it
    assert _jobs_by_schedule() == {name: [fire_time] for name in BATCH_NAMES}
    assert len(sent[0]) + len(sent[1]) == len(BATCH_NAMES)
    fires = [fire for name in BATCH_NAMES for fire in engine.schedule_fires(name)]
    assert {(fire.fire_time, fire.outcome) for fire in fires} == {(fire_time, FireOutcome.ENQUEUED)}
    assert sorted(fire.job_id for fire in fires) == sorted(sent[0] + sent[1])


@pytest.mark.parametrize("mode", ["distributed"], indirect=True)
def test_two_hundred_schedules_every_second_on_two_schedulers_make_one_job_per_fire_time(start_engine):
    # Given 200 schedules firing every second, and two schedulers and a worker
    for name in BATCH_NAMES:
        engine.set_schedule(name, "echo", EVERY_SECOND, args=[name])
    start_engine("worker", "--processes", "1")
    schedulers = [start_engine("scheduler"), start_engine("scheduler")]
    time.sleep(8)
    for scheduler in schedulers:
        assert scheduler.stop() == 0
    # Then every schedule has one job per second from the first fire time all share to the
    # last, none twice
    by_schedule = _jobs_by_schedule()
    assert sorted(by_schedule) == BATCH_NAMES
    first = max(fire_times[0] for fire_times in by_schedule.values())
    last = min(fire_times[-1] for fire_times in by_schedule.values())
    assert last - first >= 4
    for name, fire_times in by_schedule.items():
        assert len(set(fire_times)) == len(fire_times), f"{name}: a fire time made two jobs"
        shared = [each for each in fire_times if first <= each <= last]
        assert shared == [first + second for second in range(int(last - first) + 1)], f"{name}: a fire time made no job"
    # and the workers run them
    wait_for(lambda: engine.get(engine.schedule_fires(BATCH_NAMES[-1])[-1].job_id).state == "succeeded", 30, "a job run")
