"""Versioned schema migrations, applied on start or by ``engine db upgrade``.

A new database is created from `engine.store.schema` as it is now and stamped with `LATEST`. An older
one is brought up to date by running, in order, each migration numbered above its version. To
change the schema: edit `engine.store.schema`, then append a migration that makes the same change to
an existing database, and bump nothing else: `LATEST` follows the list.

Concurrent starts (several workers booting at once) are serialised by the lock the store's
dialect takes first (`engine.store.dialect.Dialect.lock_schema`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from loguru import logger
from sqlalchemy import Connection, inspect, select, text

from .schema import (
    claim_order,
    idempotency_keys,
    jobs,
    metadata,
    schedule_fires,
    schedule_jobs,
    schedule_versions,
    schedules,
    schema_version,
    workers,
)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _add_liveness_and_cancellation(connection: Connection) -> None:
    workers.create(connection)
    connection.execute(text("ALTER TABLE attempts ADD COLUMN worker_id VARCHAR(64)"))
    connection.execute(text("ALTER TABLE jobs ADD COLUMN cancel_requested_at FLOAT"))


def _add_claim_order(connection: Connection) -> None:
    claim_order.create(connection)


def _add_start_token(connection: Connection) -> None:
    connection.execute(text("ALTER TABLE attempts ADD COLUMN start_token FLOAT"))


def _lighten_job_indexes(connection: Connection) -> None:
    """Idempotency keys in a partial index, and no index on finished_at (see `engine.store.schema`).
    SQLite cannot drop the unique constraint a table was created with: on a migrated SQLite
    store it stays beside the new index, and costs an index entry per new job."""
    idempotency_keys.create(connection)
    connection.execute(text("DROP INDEX IF EXISTS ix_jobs_finished"))
    if connection.dialect.name == "postgresql":
        for constraint in inspect(connection).get_unique_constraints(jobs.name):
            if constraint["column_names"] == ["idempotency_key"]:
                connection.execute(text(f'ALTER TABLE jobs DROP CONSTRAINT "{constraint["name"]}"'))


def _move_open_attempts_to_jobs(connection: Connection) -> None:
    """The running attempt's worker and token in its job's row (see `engine.store.schema`), copied
    from the open attempt rows, which the attempt's end then completes."""
    for column, kind in (("attempt_host", "VARCHAR(255)"), ("attempt_pid", "INTEGER"),
                         ("attempt_worker_id", "VARCHAR(64)"), ("attempt_token", "FLOAT")):  # fmt: skip
        connection.execute(text(f"ALTER TABLE jobs ADD COLUMN {column} {kind}"))
    latest = "FROM attempts WHERE attempts.job_id = jobs.id AND attempts.number = jobs.attempts"
    connection.execute(text(
        f"""UPDATE jobs SET attempt_host = (SELECT worker_host {latest}), attempt_pid = (SELECT worker_pid {latest}),
        attempt_worker_id = (SELECT worker_id {latest}), attempt_token = (SELECT start_token {latest})
        WHERE state = 'running'"""
    ))


def _add_schedules(connection: Connection) -> None:
    """Cron schedules, their fire ledger and change counter, and each job's schedule and fire time."""
    connection.execute(text("ALTER TABLE jobs ADD COLUMN schedule VARCHAR(100)"))
    connection.execute(text("ALTER TABLE jobs ADD COLUMN fire_time FLOAT"))
    schedule_jobs.create(connection)
    for table in (schedules, schedule_fires, schedule_versions):
        table.create(connection)
    connection.execute(schedule_versions.insert().values(version=0))


def _add_queue_listing(connection: Connection) -> None:
    """The HTTP API lists a queue's jobs newest first, like a state's or an actor's."""
    connection.execute(text("CREATE INDEX IF NOT EXISTS ix_jobs_queue_created ON jobs (queue, created_at, id)"))


#: Migrations from older schemas, oldest first. Version 1 is the first released schema.
MIGRATIONS: list[Migration] = [
    Migration(2, "worker heartbeats and durable cancel requests", _add_liveness_and_cancellation),
    Migration(3, "the embedded broker's claim index", _add_claim_order),
    Migration(4, "a token per attempt start", _add_start_token),
    Migration(5, "lighter job indexes", _lighten_job_indexes),
    Migration(6, "an attempt's row written once, when it ends", _move_open_attempts_to_jobs),
    Migration(7, "cron schedules and their fire ledger", _add_schedules),
    Migration(8, "an index for listing a queue's jobs", _add_queue_listing),
]

LATEST = MIGRATIONS[-1].version if MIGRATIONS else 1


def upgrade(connection: Connection) -> int:
    """Bring the schema to `LATEST` inside the caller's transaction, which holds the schema lock.

    Returns:
      int: the version the database had before (0 for a new database).
    """
    if not inspect(connection).has_table(schema_version.name):
        metadata.create_all(connection)
        connection.execute(schema_version.insert().values(version=LATEST))
        connection.execute(schedule_versions.insert().values(version=0))
        logger.info("Created the job store at schema version {}.", LATEST)
        return 0
    current = connection.execute(select(schema_version.c.version)).scalar_one()
    for migration in MIGRATIONS:
        if migration.version > current:
            logger.info("Migrating the job store to version {}: {}.", migration.version, migration.description)
            migration.apply(connection)
            connection.execute(schema_version.update().values(version=migration.version))
    return current
