"""Schema migrations on SQLite and PostgreSQL: an older store is brought up to date in place."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from engine.store import migrations, schema
from engine.errors import DuplicateJob
from engine.job import JobState, Outcome
from engine.store import AttemptEnd, AttemptRun, AttemptStart, Store

#: Columns that schema version 1 did not have, by the version that added them.
ADDED = {
    ("attempts", "worker_id"): 2,
    ("jobs", "cancel_requested_at"): 2,
    ("attempts", "start_token"): 4,
    **{("jobs", column): 6 for column in ("attempt_host", "attempt_pid", "attempt_worker_id", "attempt_token")},
    ("jobs", "schedule"): 7,
    ("jobs", "fire_time"): 7,
}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/engine.db"
    return request.getfixturevalue("pg_url").replace("postgresql://", "postgresql+psycopg://")


def create_version_1(store: Store) -> None:
    old = sa.MetaData()
    for table in (schema.jobs, schema.attempts, schema.messages, schema.schema_version):
        columns = [column._copy() for column in table.columns if (table.name, column.name) not in ADDED]
        sa.Table(table.name, old, *columns)
    old.tables["attempts"].append_constraint(sa.UniqueConstraint("job_id", "number", name="uq_attempts_job_number"))
    # The job indexes that version 5 replaced: a unique constraint on every row's key, and finished_at.
    old.tables["jobs"].c.idempotency_key.unique = True
    sa.Index("ix_jobs_finished", old.tables["jobs"].c.finished_at)
    with store.transaction() as connection:
        old.create_all(connection)
        connection.execute(schema.schema_version.insert().values(version=1))


def test_a_version_1_store_is_migrated_to_the_latest(store_url):
    store = Store(store_url)
    create_version_1(store)

    assert store.upgrade() == 1
    inspector = sa.inspect(store.engine)
    for table, column in ADDED:
        assert column in [c["name"] for c in inspector.get_columns(table)]
    assert inspector.has_table("workers")
    assert "ix_messages_claim" in [index["name"] for index in inspector.get_indexes("messages")]  # added in 3
    assert store.upgrade() == migrations.LATEST  # a second upgrade has nothing left to do
    store.close()


def test_a_new_store_is_created_at_the_latest_version(store_url):
    store = Store(store_url)

    assert store.upgrade() == 0
    assert store.upgrade() == migrations.LATEST
    store.close()


def job_row(job_id: str, key=None) -> dict:
    return dict(
        id=job_id, actor="echo", queue="default", args="[]", kwargs="{}", options="{}",
        priority=0, idempotency_key=key, created_at=0.0, scheduled_for=None,
    )  # fmt: skip


def test_after_version_5_idempotency_keys_stay_unique_in_a_partial_index(store_url):
    store = Store(store_url)
    create_version_1(store)

    store.upgrade()

    inspector = sa.inspect(store.engine)
    indexes = {index["name"] for index in inspector.get_indexes("jobs")}
    assert "uq_jobs_idempotency_key" in indexes and "ix_jobs_finished" not in indexes
    if store.engine.dialect.name == "postgresql":  # SQLite keeps the table's own constraint
        assert inspector.get_unique_constraints("jobs") == []
    store.record_enqueue(job_row("a", key="k"), delayed=False)
    store.record_enqueue(job_row("b"), delayed=False)
    store.record_enqueue(job_row("c"), delayed=False)  # jobs without a key do not collide
    with pytest.raises(DuplicateJob):
        store.record_enqueue(job_row("d", key="k"), delayed=False)
    assert store.find_by_idempotency_key("k").id == "a"
    store.close()


@pytest.mark.parametrize("ended_by", ["finish_attempt", "writer"])
def test_after_version_6_a_job_started_before_it_keeps_its_worker_and_ends_in_its_attempt_row(
    store_url, monkeypatch, ended_by
):
    store = Store(store_url)
    create_version_1(store)
    monkeypatch.setattr(migrations, "MIGRATIONS", [each for each in migrations.MIGRATIONS if each.version <= 5])
    assert store.upgrade() == 1 and store.upgrade() == 5
    monkeypatch.undo()
    # a job that a worker of schema 5 started: its attempt row opened, its job's row knows no worker
    with store.transaction() as connection:
        connection.execute(
            schema.jobs.insert().values(**job_row("a"), state="running", attempts=1, started_at=10.0, updated_at=10.0)
        )
        connection.execute(
            schema.attempts.insert().values(
                job_id="a", number=1, worker_host="old", worker_pid=7, worker_id="w-old", started_at=10.0, start_token=9.0
            )
        )

    assert store.upgrade() == 5
    [running] = store.list_attempts("a")
    assert (running.number, running.worker_host, running.worker_pid, running.outcome) == (1, "old", 7, None)
    # its worker still lives: another delivery leaves the job to it
    store.heartbeat("w-old", host="old", pid=7)
    started = store.start_attempt("a", host="new", pid=8, worker_id="w-new", dead_after_s=60)
    assert started == AttemptStart(None, running_elsewhere=True)
    # and its end, in a transaction of its own or in a batch of the writer's, completes the
    # attempt row it opened
    if ended_by == "writer":
        run = AttemptRun("old", 7, "w-old", 10.0, 9.0)
        end = AttemptEnd.of("a", 1, Outcome.SUCCEEDED, run=run, state=JobState.SUCCEEDED)
        store.end(end).result()
    else:
        store.finish_attempt("a", 1, Outcome.SUCCEEDED, state=JobState.SUCCEEDED)
    [ended] = store.list_attempts("a")
    assert (ended.worker_host, ended.started_at, ended.outcome) == ("old", 10.0, Outcome.SUCCEEDED)
    assert store.get("a").state == JobState.SUCCEEDED
    store.close()


def test_a_job_a_schema_5_worker_started_after_the_migration_is_left_to_it_while_it_lives(store_url):
    store = Store(store_url)
    store.upgrade()
    # attempt 1 ran under a worker of this version, now dead; attempt 2 is run by a worker of
    # schema 5, still running during a rolling upgrade: it opened a row and left the job's alone
    store.record_enqueue(job_row("a"), delayed=False)
    store.heartbeat("w-new", host="new", pid=1)
    store.start_attempt("a", host="new", pid=1, worker_id="w-new", dead_after_s=60)
    store.mark_workers_stopped(worker_id="w-new")
    store.heartbeat("w-old", host="old", pid=2)
    with store.transaction() as connection:
        connection.execute(schema.jobs.update().where(schema.jobs.c.id == "a").values(attempts=2, started_at=20.0))
        connection.execute(
            schema.attempts.insert().values(
                job_id="a", number=2, worker_host="old", worker_pid=2, worker_id="w-old", started_at=20.0, start_token=19.0
            )
        )

    # then a redelivery finds the worker of the open row alive, not the dead one of the job's row
    redelivered = store.start_attempt("a", host="other", pid=3, worker_id="w-other", dead_after_s=60)
    assert redelivered == AttemptStart(None, running_elsewhere=True)
    # and once that worker is gone, the takeover closes that row as abandoned, with its worker
    store.mark_workers_stopped(worker_id="w-old")
    assert store.start_attempt("a", host="other", pid=3, worker_id="w-other", dead_after_s=60).number == 3
    second = {attempt.number: attempt for attempt in store.list_attempts("a")}[2]
    assert (second.number, second.worker_host, second.outcome) == (2, "old", Outcome.ABANDONED)
    store.close()
