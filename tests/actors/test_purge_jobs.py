"""purge_jobs as a job: old finished jobs deleted with their attempts, in batches; the rest kept."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from sqlalchemy import func, select, update

import engine
from engine import JobState, Outcome
from engine.store.schema import attempts, jobs

DAY = 86_400


@pytest.fixture(autouse=True)
def purge_jobs(declare):
    return declare("actors.purge_jobs").purge_jobs


@pytest.fixture
def finished_jobs(stub_broker, wait_done):
    """Six succeeded jobs and one failed one, all ended just now."""

    @engine.actor
    def ok():
        pass

    @engine.actor(max_retries=0)
    def boom():
        raise ValueError("boom")

    ids = [engine.submit("ok").id for _ in range(6)] + [engine.submit("boom").id]
    wait_done()
    return ids


def backdate(store, job_ids, days):
    """As if the jobs had been sent and had ended `days` ago."""
    then = time.time() - days * DAY
    with store.transaction() as connection:
        connection.execute(update(jobs).where(jobs.c.id.in_(job_ids)).values(created_at=then, finished_at=then))


def attempt_rows(store, job_ids):
    """The jobs' rows in the attempts table (only attempts that did not succeed have one)."""
    with store.reading() as connection:
        return connection.execute(select(func.count()).where(attempts.c.job_id.in_(job_ids))).scalar_one()


def trail_length(job_ids):
    return sum(len(engine.attempts(job_id)) for job_id in job_ids)


def test_old_finished_jobs_go_with_their_attempts_and_recent_ones_stay(store, finished_jobs, wait_done):
    # given five jobs (one failed) that finished 40 days ago, two that finished 10 days ago,
    # and a job queued 90 days ago that never ran
    old, recent = finished_jobs[2:], finished_jobs[:2]
    backdate(store, old, days=40)
    backdate(store, recent, days=10)
    never_ran = "never-ran"
    store.record_enqueue(
        {
            "id": never_ran,
            "actor": "ok",
            "queue": "default",
            "args": "[]",
            "kwargs": "{}",
            "options": "{}",
            "priority": 0,
            "idempotency_key": None,
            "created_at": time.time() - 90 * DAY,
            "scheduled_for": None,
        },
        delayed=False,
    )

    # when jobs older than 30 days are purged, two per batch
    job = engine.submit("purge_jobs", older_than_days=30, batch_size=2)
    wait_done()

    # then exactly the old finished jobs are gone, with their attempts
    assert engine.get(job.id).state == JobState.SUCCEEDED
    result = engine.result(job.id)
    assert result["purged"] == 5
    cutoff = datetime.fromisoformat(result["older_than"]).timestamp()
    assert abs(cutoff - (time.time() - 30 * DAY)) < 60
    for job_id in old:
        with pytest.raises(engine.JobNotFound):
            engine.get(job_id)
    assert attempt_rows(store, old) == 0
    assert [engine.get(job_id).state for job_id in recent] == [JobState.SUCCEEDED] * 2
    assert trail_length(recent) == 2
    assert engine.get(never_ran).state == JobState.QUEUED
    done = engine.get(job.id)
    assert (done.progress_percent, done.progress_message) == (100.0, "5 jobs purged")
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.SUCCEEDED]


def test_purge_finished_reports_the_running_total_after_each_batch(store, finished_jobs):
    backdate(store, finished_jobs, days=1)
    totals = []

    purged = store.purge_finished(ended_before=time.time(), batch_size=3, on_batch=totals.append)

    assert purged == 7 and totals == [3, 6, 7]


def test_nothing_to_purge_is_a_success(store, finished_jobs, wait_done):
    job = engine.submit("purge_jobs")
    wait_done()

    assert engine.result(job.id)["purged"] == 0
    assert all(engine.get(job_id).state.finished for job_id in finished_jobs)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"older_than_days": 0}, "older_than_days must be a positive number"),
        ({"older_than_days": -5}, "older_than_days must be a positive number"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
    ],
)
def test_bad_arguments_fail_at_once_and_delete_nothing(store, finished_jobs, wait_done, options, error):
    backdate(store, finished_jobs, days=400)

    job = engine.submit("purge_jobs", **options)
    wait_done()

    failed = engine.get(job.id)
    assert failed.state == JobState.FAILED and error in failed.last_error
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.FAILED]
    assert trail_length(finished_jobs) == 7 and attempt_rows(store, finished_jobs) == 1
