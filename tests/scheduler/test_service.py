"""The scheduler on the embedded engine, in this process: misfires, overlap, changes."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import update

import engine
from engine.store.schema import schedules
from scheduler.definition import Misfire, Schedule
from scheduler.ledger import MAX_MISSED_RECORDED, FireOutcome, Ledger
from scheduler.service import RECENT_S, Scheduler, plan_fires

from tests.support.processes import wait_for


def _down_since(name: str, fire_time: float) -> None:
    """As if every scheduler had stopped right after the schedule's fire at `fire_time`."""
    ledger = Ledger(engine.get_store())
    with ledger.store.transaction() as connection:
        assert ledger.claim(connection, name, fire_time, FireOutcome.ENQUEUED)
        connection.execute(update(schedules).where(schedules.c.name == name).values(active_since=fire_time - 1))


def _yearly_fire_times(count: int) -> list[float]:
    """The last `count` fire times of the yearly schedule below, oldest first."""
    schedule = Schedule.define(name="x", actor="echo", cron="0 3 1 1 *")
    start = datetime(datetime.now(timezone.utc).year - count - 1, 6, 1, tzinfo=timezone.utc)
    found = [each.timestamp() for each in schedule.next_fire_times(count + 2, after=start) if each.timestamp() <= time.time()]
    return found[-(count + 1):]


@pytest.mark.parametrize("misfire, jobs_expected", [(Misfire.ONCE, 1), (Misfire.SKIP, 0)])
def test_fires_missed_past_the_grace_become_one_job_or_none_and_the_ledger_shows_them(
    start_scheduler, misfire, jobs_expected
):
    # Given a yearly schedule whose schedulers were all down for its last three fire times
    engine.set_schedule("new-year", "echo", "0 3 1 1 *", args=["hello"], misfire=misfire, misfire_grace_s=60)
    last_fired, *missed = _yearly_fire_times(3)
    _down_since("new-year", last_fired)
    # When a scheduler starts
    start_scheduler()
    # Then the ledger records each missed fire time, and `once` made one job, for the latest
    wait_for(lambda: len(engine.schedule_fires("new-year")) == 4, 10, "the missed fires in the ledger")
    fires = {fire.fire_time: fire for fire in engine.schedule_fires("new-year")}
    jobs = engine.jobs(schedule="new-year").jobs
    assert len(jobs) == jobs_expected
    if misfire == Misfire.ONCE:
        assert jobs[0].fire_time == missed[-1]
        assert fires[missed[-1]].outcome == FireOutcome.ENQUEUED and fires[missed[-1]].job_id == jobs[0].id
        assert [fires[each].outcome for each in missed[:-1]] == [FireOutcome.MISSED] * 2
    else:
        assert [fires[each].outcome for each in missed] == [FireOutcome.MISSED] * 3


def test_a_long_outage_of_a_frequent_schedule_ends_in_no_burst(start_scheduler):
    # Given a schedule firing every second, down for two hours
    engine.set_schedule("often", "echo", "* * * * * *", args=[1])
    _down_since("often", float(int(time.time()) - 7200))
    # When a scheduler starts
    start_scheduler()
    time.sleep(2)
    # Then only the last few seconds' fire times made jobs; the ledger keeps many of the latest
    # missed ones (a bounded walk of the trigger finds them), never all 7,200
    jobs = engine.jobs(schedule="often", limit=1000).jobs
    assert len(jobs) <= RECENT_S + 3
    outcomes = [fire.outcome for fire in Ledger(engine.get_store()).fires("often", limit=2000)]
    assert 500 <= outcomes.count(FireOutcome.MISSED) <= MAX_MISSED_RECORDED


def test_a_schedule_without_overlap_skips_a_fire_while_its_job_is_unfinished(start_scheduler):
    # Given a schedule with overlap = false, and no worker, so its first job stays queued
    start_scheduler()
    engine.set_schedule("exclusive", "echo", "* * * * * *", args=[1], overlap=False)
    # When it comes to fire again
    wait_for(lambda: len(engine.schedule_fires("exclusive")) >= 3, 10, "three fire times")
    # Then the first made a job, and the later ones were skipped and recorded as such
    fires = sorted(engine.schedule_fires("exclusive"), key=lambda fire: fire.fire_time)
    assert fires[0].outcome == FireOutcome.ENQUEUED
    assert {fire.outcome for fire in fires[1:]} == {FireOutcome.SKIPPED_OVERLAP}
    assert len(engine.jobs(schedule="exclusive").jobs) == 1


def test_changes_reach_a_running_scheduler_without_a_restart(start_scheduler):
    start_scheduler()
    engine.set_schedule("later", "echo", "* * * * * *", args=[1])
    wait_for(lambda: engine.jobs(schedule="later").jobs, 5, "a job of the new schedule")
    engine.pause_schedule("later")
    time.sleep(0.5)  # a poll, and a fire under way when it came
    paused = len(engine.jobs(schedule="later", limit=100).jobs)
    time.sleep(2)
    assert len(engine.jobs(schedule="later", limit=100).jobs) == paused
    engine.resume_schedule("later")
    wait_for(lambda: len(engine.jobs(schedule="later", limit=100).jobs) > paused, 5, "a job after the resume")
    # The pause made no misfires: its fire times were not due.
    assert FireOutcome.MISSED not in {fire.outcome for fire in engine.schedule_fires("later", limit=100)}
    engine.delete_schedule("later")
    with pytest.raises(engine.ScheduleNotFound):
        engine.get_schedule("later")


def test_run_now_makes_a_job_of_the_schedule_outside_its_cron_times(embedded):
    engine.set_schedule("yearly", "echo", "0 3 1 1 *", args=["now"], enabled=False)
    job = engine.run_schedule("yearly")
    assert (job.actor, job.args, job.schedule, job.fire_time) == ("echo", ["now"], "yearly", None)
    assert engine.get(job.id).schedule == "yearly"


def test_the_api_refuses_an_unknown_actor_and_stores_nothing(embedded):
    with pytest.raises(engine.InvalidSchedule, match="actor: unknown actor 'nope'"):
        engine.set_schedule("bad", "nope", "* * * * *")
    assert engine.list_schedules() == []


def test_the_preview_shows_fire_times_in_the_zone_with_the_offset_in_force(embedded):
    engine.set_schedule("berlin", "echo", "30 2 * * *", timezone="Europe/Berlin")
    previews = engine.preview_schedule("berlin", 3)
    # 03:30 only on a spring-forward day, whose 02:30 does not exist
    assert {each.strftime("%H:%M") for each in previews} <= {"02:30", "03:30"}
    assert all(str(each.tzinfo) == "Europe/Berlin" for each in previews)


@pytest.mark.parametrize(
    "ages, misfire, grace, fired, missed",
    [
        ([2], Misfire.SKIP, 300, [2], []),  # late by 2 s: an ordinary fire
        ([40, 20, 5, 1], Misfire.SKIP, 300, [5, 1], [40, 20]),  # the recent ones each fire
        ([400, 200], Misfire.SKIP, 300, [200], [400]),  # the latest, within the grace
        ([900, 600], Misfire.SKIP, 300, [], [900, 600]),
        ([900, 600], Misfire.ONCE, 300, [600], [900]),  # one catch-up, for the latest
        ([3], Misfire.SKIP, 1, [], [3]),  # the grace bounds the recent ones too
    ],
)
def test_plan_fires(ages, misfire, grace, fired, missed):
    now = 10_000.0
    schedule = Schedule.define(name="s", actor="echo", cron="* * * * * *", misfire=misfire, misfire_grace_s=grace)
    to_fire, not_fired = plan_fires(schedule, [now - age for age in ages], now)
    assert (to_fire, not_fired) == ([now - age for age in fired], [now - age for age in missed])


def test_a_batch_of_fires_makes_a_job_each_but_one_per_batch_without_overlap(embedded):
    # Given two schedules, one without overlap, each with two fire times due
    engine.set_schedule("free", "echo", "* * * * * *", args=[1])
    engine.set_schedule("exclusive", "echo", "* * * * * *", args=[1], overlap=False)
    scheduler = Scheduler(engine.get_broker(), engine.get_store())
    scheduler.sync()
    due = [float(int(time.time()) + 1), float(int(time.time()) + 2)]
    time.sleep(due[-1] - time.time())
    # When they are fired in one batch, twice (as by two schedulers)
    scheduler.fire_due({"free": due, "exclusive": due})
    scheduler.fire_due({"free": due, "exclusive": due})
    # Then each fire time of the first made one job; the second's later fire time was skipped
    assert sorted(job.fire_time for job in engine.jobs(schedule="free").jobs) == due
    assert [job.fire_time for job in engine.jobs(schedule="exclusive").jobs] == due[:1]
    outcomes = {fire.fire_time: fire.outcome for fire in engine.schedule_fires("exclusive")}
    assert outcomes == {due[0]: FireOutcome.ENQUEUED, due[1]: FireOutcome.SKIPPED_OVERLAP}
