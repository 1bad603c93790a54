"""The store on PostgreSQL: the worker's batches stay key lookups whatever the planner was told,
and a start whose commit was not confirmed is not lost.

A worker's batch runs for every job, so a plan that walks a table or the state index costs
time in proportion to the queue: these tests read PostgreSQL's own scan counters.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from sqlalchemy.exc import IntegrityError, OperationalError

from engine.job import JobState, Outcome
from engine.store import AttemptEnd, AttemptStart, StartRequest, Store
from engine.writer import GroupCommit
from tests.store.test_attempts import (  # noqa: F401 (collected again here: the audit trail on PostgreSQL's batches)
    job,
    test_a_job_that_succeeds_at_once_has_its_attempt_in_its_trail,
    test_a_job_that_succeeds_when_retried_keeps_the_failed_attempt_with_its_traceback,
    test_a_success_after_its_attempt_was_taken_for_abandoned_completes_that_attempt,
)

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


def report_scans_so_far(store: Store) -> None:
    """Have the store's pooled session report its scans (the schema's index builds) now, not
    at its next report, which PostgreSQL defers by a second or more."""
    with store.reading() as connection:
        connection.exec_driver_sql("SELECT pg_stat_force_next_flush()")  # done at the rollback


def test_a_workers_batches_find_their_jobs_by_key_with_statistics_from_before_a_burst(store, pg_url):
    seed_with_statistics_that_predate_a_burst(pg_url)
    report_scans_so_far(store)
    before = scans(pg_url)

    # when a worker starts and ends queued jobs, batch after batch (psycopg prepares the
    # statement from its fifth run on: both the planner's custom and generic plans are used)
    queued = [f"job-{n}" for n in range(JOBS - QUEUED + 1, JOBS - QUEUED + 41)]
    for job_id in queued:
        request = StartRequest(job_id, "host", 1, None, 60.0, time.time())
        start = store.start(request)
        assert start.number == 1
        run = request.run(start.started_at)
        store.end(AttemptEnd.of(job_id, 1, Outcome.SUCCEEDED, run=run, state=JobState.SUCCEEDED)).result()
    store.writer.close()  # the writer's session ends: PostgreSQL counts its scans

    # then no batch walked the queue or a table, and every job ran its one attempt (counted
    # after: the count scans the jobs)
    assert scans(pg_url) == before
    assert store.count_by_state()[JobState.SUCCEEDED] == JOBS - QUEUED + len(queued)


def test_a_start_committed_by_a_batch_whose_reply_was_lost_runs_when_the_batch_is_tried_again(store):
    store.record_enqueue(
        dict(id="job-1", actor="echo", queue="default", args="[]", kwargs="{}", options="{}",
             priority=0, idempotency_key=None, created_at=time.time(), scheduled_for=None),
        delayed=False,
    )  # fmt: skip
    store.heartbeat("w1", host="h", pid=1)
    lost = []

    def reply_lost_once(connection, records):
        """The writer's batch, committed by its statement; the first reply never comes back."""
        results = store.dialect.record_attempts(connection, records)
        if not lost:
            lost.append(records)
            raise OperationalError("the batch", {}, Exception("server closed the connection unexpectedly"))
        return results

    writer = GroupCommit(store.connect_for_writes, one_statement=frozenset([reply_lost_once]))
    try:
        # when a worker's start is committed, its reply lost, and the batch tried again
        request = StartRequest("job-1", "h", 1, "w1", 60.0, time.time())
        start = writer.write(reply_lost_once, request)
        assert lost and start.undecided  # the job is `running` already: decided on its own
        start = writer.write(store.dialect.start_attempts, request)
    finally:
        writer.close()

    # then the worker runs it as the attempt that was committed, and no other
    assert start == AttemptStart(1, started_at=store.get("job-1").started_at)
    assert [a.number for a in store.list_attempts("job-1")] == [1]


def test_a_batch_whose_session_is_killed_is_committed_on_a_new_one_and_a_bad_one_fails_alone(store, pg_url):
    def queued(job_id: str) -> None:
        store.record_enqueue(
            dict(id=job_id, actor="echo", queue="default", args="[]", kwargs="{}", options="{}",
                 priority=0, idempotency_key=None, created_at=time.time(), scheduled_for=None),
            delayed=False,
        )  # fmt: skip

    queued("job-1")
    queued("job-2")
    request = StartRequest("job-1", "h", 1, None, 60.0, time.time())
    assert store.start(request).number == 1
    # when PostgreSQL ends the writer's session (a restart, a failover, an administrator)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    assert killed

    # then the next batch is an outage, waited out on a new session: the start is committed
    assert store.start(request._replace(job_id="job-2")).number == 1
    # and a write the database refuses is an error of its own, raised to its writer alone
    with pytest.raises(IntegrityError):
        store.end(AttemptEnd.of("job-1", 1, Outcome.SUCCEEDED, run=request.run(None))).result()


def test_a_batch_of_a_one_statement_kind_is_committed_by_it_and_any_other_in_a_transaction(store):
    with store.transaction() as connection:
        connection.exec_driver_sql("CREATE TABLE notes (n int)")
    seen = {}

    def note(connection, items):
        connection.exec_driver_sql("INSERT INTO notes SELECT unnest(%(n)s::int[])", {"n": items})
        seen[len(seen)] = connection.connection.driver_connection.info.transaction_status
        return items

    def other(connection, items):
        return note(connection, items)

    writer = GroupCommit(store.connect_for_writes, one_statement=frozenset([note]))
    try:
        writer.write(note, 1)
        pending = [writer.submit(note, 2), writer.submit(other, 3)]  # one batch of both, or two
        assert [each.result() for each in pending] == [2, 3]
    finally:
        writer.close()

    assert seen[0] == psycopg.pq.TransactionStatus.IDLE  # committed already: autocommit
    assert seen[len(seen) - 1] == psycopg.pq.TransactionStatus.INTRANS
