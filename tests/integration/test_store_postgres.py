"""The store on PostgreSQL: the worker's batches stay key lookups whatever the planner was told;
one process at a time leads a task.

A worker's batch runs for every job, so a plan that walks a table or the state index costs
time in proportion to the queue: these tests read PostgreSQL's own scan counters.
"""

from __future__ import annotations

import psycopg
import pytest

from engine.job import JobState, Outcome
from engine.store import AttemptEnd, StartRequest, Store

pytestmark = pytest.mark.integration

JOBS = 20_000
QUEUED = 5_000


@pytest.fixture
def store(pg_url) -> Store:
    store = Store(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    store.upgrade()
    yield store
    store.close()


def seed_with_statistics_that_predate_a_burst(pg_url: str) -> None:
    """JOBS finished jobs, analyzed; then QUEUED of them queued again, which the statistics
    do not know (autovacuum is off for the tables): the planner takes `queued` for rare."""
    with psycopg.connect(pg_url, autocommit=True) as connection:
        for table in ("jobs", "attempts"):
            connection.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        connection.execute(
            """INSERT INTO jobs (id, actor, queue, state, args, kwargs, options, priority, attempts,
                                 created_at, updated_at)
               SELECT 'job-' || n, 'noop', 'default', 'succeeded', '[]', '{}', '{}', 0, 0, n, n
               FROM generate_series(1, %s::int) AS n""",
            (JOBS,),
        )
        connection.execute("ANALYZE jobs")
        connection.execute("ANALYZE attempts")
        connection.execute("UPDATE jobs SET state = 'queued' WHERE created_at > %s", (JOBS - QUEUED,))


def scans(pg_url: str) -> dict[str, int]:
    """Walks of the state index and whole-table scans of jobs and attempts, so far."""
    with psycopg.connect(pg_url, autocommit=True) as connection:
        state_index = connection.execute(
            "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'ix_jobs_state_created'"
        ).fetchone()[0]
        tables = dict(
            connection.execute("SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname IN ('jobs', 'attempts')")
        )
    return {"ix_jobs_state_created": state_index, **tables}


def test_a_workers_batches_find_their_jobs_by_key_with_statistics_from_before_a_burst(store, pg_url):
    seed_with_statistics_that_predate_a_burst(pg_url)
    before = scans(pg_url)

    # when a worker starts and ends queued jobs, batch after batch (psycopg prepares the
    # statement from its fifth run on: both the planner's custom and generic plans are used)
    queued = [f"job-{n}" for n in range(JOBS - QUEUED + 1, JOBS - QUEUED + 41)]
    for job_id in queued:
        start = store.writer.write(store.record_attempts, StartRequest(job_id, "host", 1, None, 60.0))
        assert start.number == 1
        store.writer.write(
            store.record_attempts, AttemptEnd.of(job_id, 1, Outcome.SUCCEEDED, state=JobState.SUCCEEDED)
        )
    store.writer.close()  # the writer's session ends: PostgreSQL counts its scans

    # then every job ran its one attempt, and no batch walked the queue or a table
    assert store.count_by_state()[JobState.SUCCEEDED] == JOBS - QUEUED + len(queued)
    assert scans(pg_url) == before


def test_one_process_leads_until_its_connection_is_gone(store, pg_url):
    other = Store(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        # when one store (one process) leads
        assert store.lead("a task")

        # then another does not, in that task only, for as long as the first holds it
        assert store.lead("a task") and not other.lead("a task")
        assert other.lead("another task")

        # and takes over once the first is gone
        store.close()
        assert other.lead("a task")
    finally:
        other.close()
