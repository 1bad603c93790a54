"""The store on PostgreSQL: the distributed mode's database.

The writer's batches are its hot path: a worker's start and end of each job, and the job rows
of sends. Each batch is one statement of fixed text, its rows in one JSON parameter
(`_json_rows`), run on psycopg's cursor (`_execute_on_driver`), which the writer commits
without a transaction around it. The starts that statement cannot decide, and the writes
outside the writer, go through the statements both databases share (`AttemptWrites`).
"""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple, Optional

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from ..job import FINISHED_STATES, REENQUEUE_TRANSITIONS, TRANSITIONS, JobState, Outcome
from .attempts import ENDED_COLUMNS, AttemptWrites, start_of
from .locks import Locks, SessionLocks
from .records import AttemptEnd, AttemptRecord, AttemptStart, EnqueueRecord, StartRequest, duplicate_keys_named

#: The key of the advisory lock that serialises upgrades ("engine").
_SCHEMA_LOCK_KEY = 0x656E67696E65


class PostgreSQL(AttemptWrites):
    """The `engine.store.dialect.Dialect` of PostgreSQL, through psycopg."""

    insert = staticmethod(postgresql.insert)

    def __init__(self) -> None:
        super().__init__(postgresql.insert)
        self.one_statement = frozenset([self.record_attempts, self.record_enqueues])

    def create_engine(self, url: str) -> Engine:
        # pre_ping: a PostgreSQL restart costs one failed checkout, not an error per pooled connection.
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

    def create_writer_engine(self, url: str, engine: Engine) -> Engine:
        """An engine of its own, for sessions whose planner settings suit the writer's batches
        (NullPool: the writer keeps its one connection for as long as it works).

        - Generic plans: the writer runs the same few statements for every job, and PostgreSQL
          would otherwise plan them anew for each batch's values (its custom plans look cheaper
          on paper), spending longer on planning than on running them.
        - No sequential scans: each batch reads its rows by key. A generic plan is made once, at
          the first batch, when a new store's tables are empty and a scan looks cheapest; it
          would then be kept while the tables grow, every batch scanning them whole.
        """
        planner = "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off"
        return create_engine(url, poolclass=NullPool, connect_args={"options": planner})

    def database_file(self, engine: Engine) -> Optional[str]:
        return None

    def lock_schema(self, connection: Connection) -> None:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})

    def locks(self, writer_engine: Engine) -> Locks:
        return SessionLocks(writer_engine)

    def record_enqueues(self, connection: Connection, records: list[EnqueueRecord]) -> list[None]:
        """The batch's rows in one statement (`_RECORD_ENQUEUES`)."""
        rows = [{**record.row, "state": record.state} for record in records]
        with duplicate_keys_named(records):
            _execute_on_driver(connection, _RECORD_ENQUEUES, {"new": _json_rows(rows)})
        return [None] * len(records)

    def record_attempts(self, connection: Connection, records: list[AttemptRecord]) -> list[Optional[AttemptStart]]:
        """The batch in one statement (`_RECORD_ATTEMPTS`). It starts the queued jobs only: a
        start it finds not queued (a redelivery, a takeover), or whose job the batch also ends
        (a retry due at once: no statement updates a row twice), comes back undecided, for
        `start_attempts` to decide."""
        starts = [record for record in records if isinstance(record, StartRequest)]
        ends = [record for record in records if isinstance(record, AttemptEnd)]
        ended = {end.job_id for end in ends}
        starts = [start for start in starts if start.job_id not in ended]
        parameters = {
            "now": time.time(),
            "s": _json_rows([start._asdict() for start in starts]),
            "e": _json_rows([end._asdict() for end in ends]),
        }
        queued = {row[0]: _Started(*row) for row in _execute_on_driver(connection, _RECORD_ATTEMPTS, parameters)}
        # pop: of two deliveries of one job in the batch, the second is undecided.
        return [
            start_of(queued.pop(record.job_id, None)) if isinstance(record, StartRequest) else None for record in records
        ]


def _json_rows(rows: list[dict[str, Any]]) -> str:
    """A batch as one JSON array of objects, for PostgreSQL's ``json_to_recordset`` (see
    `_recordset`), which takes the keys it names and ignores the others. One parameter,
    encoded in C, is far cheaper than psycopg dumping an array per column in Python."""
    return json.dumps(rows)


def _for_psycopg(statement: Any) -> str:
    """A statement's SQL as psycopg takes it (``%(name)s`` placeholders), for
    `_execute_on_driver`: the writer's batches run for every job, and SQLAlchemy's compiled
    cache lookup and parameter processing are a large part of each one's CPU."""
    return str(statement.compile(dialect=postgresql.psycopg.dialect()))


def _execute_on_driver(connection: Connection, sql: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Run one of the writer's statements (`_for_psycopg`) on psycopg itself, in `connection`'s
    transaction, and return its rows as tuples, without SQLAlchemy's execution and result
    objects, which the writer would pay for at every batch. SQLAlchemy's error classes are kept
    (`DBAPIError.instance`), since the writer tells an outage from a bad write by them."""
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    # psycopg's errors through the dialect: importing psycopg would weigh on an embedded store's memory.
    driver_error = connection.dialect.loaded_dbapi.Error
    try:
        cursor.execute(sql, parameters, prepare=True)
        return cursor.fetchall() if cursor.description else []
    except driver_error as error:
        raise DBAPIError.instance(sql, parameters, error, driver_error) from error
    finally:
        cursor.close()


def _recordset(parameter: str, columns: dict[str, str]) -> str:
    """The SQL that unpacks a `_json_rows` parameter into rows with typed `columns`."""
    typed = ", ".join(f"{name} {kind}" for name, kind in columns.items())
    return f"json_to_recordset(CAST(:{parameter} AS json)) AS {parameter}({typed})"


#: The columns of a new job's row (`EnqueueRecord.row` and its state), with their types. The
#: last two only a cron fire's row has (`scheduler.service`); other rows leave them NULL.
_NEW_JOB_COLUMNS = {
    "id": "text",
    "actor": "text",
    "queue": "text",
    "state": "text",
    "args": "text",
    "kwargs": "text",
    "options": "text",
    "priority": "int",
    "idempotency_key": "text",
    "created_at": "float8",
    "scheduled_for": "float8",
    "schedule": "text",
    "fire_time": "float8",
}


def _sql_states(states: frozenset[JobState]) -> str:
    """States as an SQL list, for the compare-and-sets of the writer's statements."""
    return ", ".join(f"'{state.value}'" for state in sorted(states))


def _moves_sql(new_state: str, allowed: dict[JobState, frozenset[JobState]]) -> str:
    """A compare-and-set as SQL: the job's state (``jobs.state``) is one that `allowed` lists
    before the state the `new_state` column asks for."""
    return " OR ".join(
        f"({new_state} = '{state.value}' AND jobs.state IN ({_sql_states(before)}))"
        for state, before in sorted(allowed.items())
    )


def _may_end_sql() -> str:
    """The compare-and-set of an ending job, `TRANSITIONS` written out for `_RECORD_ATTEMPTS`."""
    return "e.state IS NULL OR " + _moves_sql("e.state", {state: TRANSITIONS[state] for state in FINISHED_STATES})


#: `PostgreSQL.record_enqueues`: the batch's rows in one statement of fixed text (a
#: multi-row VALUES has a text per batch size, which psycopg parses again each time), with the
#: rows in one JSON parameter (`_json_rows`). A job enqueued again (its row exists) is moved by
#: a compare-and-set on `REENQUEUE_TRANSITIONS`, and left alone when its state allows no move.
_RECORD_ENQUEUES = _for_psycopg(text(
    f"""
INSERT INTO jobs ({", ".join(_NEW_JOB_COLUMNS)}, attempts, updated_at)
SELECT {", ".join(_NEW_JOB_COLUMNS)}, 0, created_at FROM {_recordset("new", _NEW_JOB_COLUMNS)}
ON CONFLICT (id) DO UPDATE SET
  state = excluded.state, scheduled_for = excluded.scheduled_for, updated_at = excluded.updated_at
WHERE {_moves_sql("excluded.state", REENQUEUE_TRANSITIONS)}
"""
))


#: The columns of `StartRequest` and `AttemptEnd` that `_RECORD_ATTEMPTS` takes, with types.
_START_COLUMNS = {"job_id": "text", "host": "text", "pid": "int", "worker_id": "text", "requested_at": "float8"}
_END_COLUMNS = {
    "job_id": "text", "number": "int", "outcome": "text", "state": "text", "result": "text",
    "last_error": "text", "error_type": "text", "error_message": "text", "traceback": "text",
    "progress_percent": "float8", "progress_message": "text",
    "host": "text", "pid": "int", "worker_id": "text", "started_at": "float8", "start_token": "float8",
}

#: The writer's batch on PostgreSQL in one statement: the queued jobs of the starts moved to
#: `running` with their attempt's worker (as `AttemptWrites.start_attempts` does), and the ends with
#: their attempt rows but for those whose job's row holds them (`engine.store.attempts`'s
#: rule, with the jobs this statement's update moved). Returns the jobs started; the other
#: starts are left undecided (`AttemptStart.undecided`). The ``= ANY(ARRAY(...))`` conditions
#: repeat the joins for the planner: psycopg prepares the statement, and PostgreSQL's generic
#: plan, which takes each set of rows for 100 rows, would otherwise scan a small jobs table
#: whole. They take the ids from the rows, not from parameters of their own: psycopg dumps a
#: list parameter in Python. The started jobs' state is compared as ``state || ''``, which no
#: index serves, so that they are found by their key: with statistics taken before a burst of
#: sends, the planner would judge ``ix_jobs_state_created`` selective and walk every queued job.
_RECORD_ATTEMPTS = _for_psycopg(text(
    f"""
WITH s AS (
  SELECT * FROM {_recordset("s", _START_COLUMNS)}
), started AS (
  UPDATE jobs SET state = 'running', attempts = jobs.attempts + 1, started_at = :now, updated_at = :now,
    attempt_host = s.host, attempt_pid = s.pid, attempt_worker_id = s.worker_id, attempt_token = s.requested_at
  FROM s WHERE jobs.id = s.job_id AND jobs.id = ANY(ARRAY(SELECT job_id FROM s))
    AND (jobs.state || '') IN ({_sql_states(TRANSITIONS[JobState.RUNNING])})
  RETURNING jobs.id, jobs.attempts, jobs.cancel_requested_at, jobs.started_at
), e AS (
  SELECT * FROM {_recordset("e", _END_COLUMNS)}
), ended AS (
  UPDATE jobs SET
    state = coalesce(e.state, jobs.state),
    result = CASE WHEN e.state IS NULL THEN jobs.result ELSE e.result END,
    finished_at = CASE WHEN e.state IS NULL THEN jobs.finished_at ELSE :now END,
    updated_at = :now,
    last_error = coalesce(e.last_error, jobs.last_error),
    progress_percent = coalesce(e.progress_percent, jobs.progress_percent),
    progress_message = coalesce(e.progress_message, jobs.progress_message)
  FROM e WHERE jobs.id = e.job_id AND jobs.id = ANY(ARRAY(SELECT job_id FROM e)) AND ({_may_end_sql()})
  RETURNING jobs.id, jobs.attempts
), closed AS (
  INSERT INTO attempts (
    job_id, number, worker_host, worker_pid, worker_id, started_at, start_token,
    finished_at, duration_ms, outcome, error_type, error_message, traceback
  )
  SELECT job_id, number, host, pid, worker_id, started_at, start_token,
    :now, (:now - started_at) * 1000, outcome, error_type, error_message, traceback FROM e
  WHERE NOT (
    e.outcome = '{Outcome.SUCCEEDED.value}' AND e.state IS NOT DISTINCT FROM '{JobState.SUCCEEDED.value}'
    AND EXISTS (SELECT 1 FROM ended WHERE ended.id = e.job_id AND ended.attempts = e.number)
    AND NOT EXISTS (SELECT 1 FROM attempts AS a WHERE a.job_id = e.job_id AND a.number = e.number)
  )
  ON CONFLICT (job_id, number) DO UPDATE SET
    {", ".join(f"{column} = excluded.{column}" for column in ENDED_COLUMNS)}
)
SELECT id, attempts, cancel_requested_at, started_at FROM started
"""
))


class _Started(NamedTuple):
    """A row of the jobs `_RECORD_ATTEMPTS` started."""

    id: str
    attempts: int
    cancel_requested_at: Optional[float]
    started_at: float
