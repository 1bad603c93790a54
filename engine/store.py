"""The job store: jobs and their attempts, on SQLite or PostgreSQL through SQLAlchemy Core.

Every state change is a compare-and-set on the states `engine.job.TRANSITIONS` allows before
it, so concurrent or duplicate deliveries cannot move a job backwards. Writes made inside
`Store.transaction()` share one transaction, which is how the embedded broker writes a job row
and its message atomically.
"""

from __future__ import annotations

import base64
import json
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

from sqlalchemy import Connection, Engine, and_, bindparam, case, create_engine, delete, event, func, literal_column, or_, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.pool import NullPool

from . import migrations
from .errors import DuplicateJob, EngineError, InvalidJobState, JobNotFound
from .job import FINISHED_STATES, REENQUEUE_TRANSITIONS, TRANSITIONS, Attempt, Job, JobState, Outcome, Worker
from .schema import attempts, jobs, workers
from .writer import GroupCommit


def _create_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        # pre_ping: a PostgreSQL restart costs one failed checkout, not an error per pooled connection.
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let the "begin" hook below issue BEGIN, so that writers can take the lock up front.
        dbapi_connection.isolation_level = None
        # Switching to WAL takes an exclusive lock that concurrent first connections would
        # fight over; the mode persists in the file, so it is set once.
        if dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
        for pragma in ("synchronous=FULL", "foreign_keys=ON"):
            dbapi_connection.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # A deferred transaction that later writes can fail with SQLITE_BUSY without waiting;
        # BEGIN IMMEDIATE queues writers on the busy timeout instead.
        immediate = connection.get_execution_options().get("write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _create_writer_engine(url: str, engine: Engine) -> Engine:
    """Where the writer thread (`GroupCommit`) gets its connection: `engine` itself on SQLite,
    whose hooks take the write lock; on PostgreSQL an engine of its own, for sessions whose
    planner settings suit the writer's batches (NullPool: the writer keeps its one connection
    for as long as it works).

    - Generic plans: the writer runs the same few statements for every job, and PostgreSQL
      otherwise planned them anew for each batch's values (its custom plans look cheaper on
      paper), 0.7-1.6 ms of planning for a statement that runs in 0.4 ms.
    - No sequential scans: each batch reads its rows by key. A generic plan is made once, at
      the first batch, when a new store's tables are empty and a scan looks cheapest; it was
      then kept while the attempts table grew, every batch scanning it whole.
    """
    if engine.dialect.name != "postgresql":
        return engine
    planner = "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off"
    return create_engine(url, poolclass=NullPool, connect_args={"options": planner})


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(created_at), str(job_id)
    except (ValueError, TypeError) as error:
        raise EngineError(f"malformed cursor {cursor!r}: pass back the next_cursor of a previous page") from error


class AttemptStart(NamedTuple):
    """What `Store.start_attempts` decided for one delivery.

    Attributes:
      number(int): the new attempt's number when the job is to run now, else None.
      running_elsewhere(bool): the job is running under a live worker: look again later, as
        that worker may still die before it ends.
      cancel_requested(bool): the job is to run, but its cancel was requested already.
      undecided(bool): the writer's one statement on PostgreSQL (`Store.record_attempts`)
        found the job not queued, or ending in the same batch: `Store.start_attempts` decides.
      started_at(float): the start's time as the job's row has it, for the attempt's row.
    """

    number: Optional[int]
    running_elsewhere: bool = False
    cancel_requested: bool = False
    undecided: bool = False
    started_at: Optional[float] = None  # when the job runs now: the start as committed


class StartRequest(NamedTuple):
    """A delivered job to start, and the worker process that is to run it.

    `requested_at` (``time.time()`` when the worker asked), kept as the attempt's
    ``start_token``, tells the start apart from any other of the job: a batch tried again after
    its connection failed may find its own start committed by the first try, and must not take
    it for another worker's (see `Store._start_running`).
    """

    job_id: str
    host: str
    pid: int
    worker_id: Optional[str]
    dead_after_s: float
    requested_at: float

    def run(self, started_at: float) -> "AttemptRun":
        """The attempt this request started at `started_at`."""
        return AttemptRun(self.host, self.pid, self.worker_id, started_at, self.requested_at)


class AttemptRun(NamedTuple):
    """Who ran an attempt, and from when: kept by its worker while it runs, and written into
    the attempt's row, with how it ended, in one insert."""

    host: str
    pid: int
    worker_id: Optional[str]
    started_at: float
    start_token: Optional[float]


class AttemptEnd(NamedTuple):
    """How an attempt ended, to be recorded by `Store.finish_attempts`, with who ran it (the
    fields of `AttemptRun`). When `state` is None, the job's state was moved already (a retry
    set it to `scheduled`)."""

    job_id: str
    number: int
    outcome: Outcome
    state: Optional[JobState]
    result: Optional[str]
    last_error: Optional[str]
    error_type: Optional[str]
    error_message: Optional[str]
    traceback: Optional[str]
    progress_percent: Optional[float]
    progress_message: Optional[str]
    host: str
    pid: int
    worker_id: Optional[str]
    started_at: float
    start_token: Optional[float]

    @classmethod
    def of(
        cls,
        job_id: str,
        number: int,
        outcome: Outcome,
        *,
        run: AttemptRun,
        state: Optional[JobState] = None,
        result: Optional[str] = None,
        error: Optional[BaseException] = None,
        traceback: Optional[str] = None,
        progress: Optional[tuple[float, Optional[str]]] = None,
    ) -> "AttemptEnd":
        percent, message = progress or (None, None)
        if error is None:
            return cls(job_id, number, outcome, state, result, None, None, None, traceback, percent, message, *run)
        # PostgreSQL text holds no NUL, and an exception's message may.
        error_type, error_message = type(error).__name__, str(error).replace("\0", "\ufffd")
        last_error = f"{error_type}: {error_message}"
        return cls(
            job_id, number, outcome, state, result, last_error, error_type, error_message, traceback, percent, message, *run
        )

    def parameters(self, now: float) -> dict[str, Any]:
        """For `_END_JOB`, executed with many ends at once."""
        return {"now": now, **{f"b_{name}": value for name, value in zip(self._fields, self)}}

    def attempt_row(self, now: float) -> dict[str, Any]:
        """The attempt's row, ended at `now`."""
        return {
            "job_id": self.job_id,
            "number": self.number,
            "worker_host": self.host,
            "worker_pid": self.pid,
            "worker_id": self.worker_id,
            "started_at": self.started_at,
            "start_token": self.start_token,
            "finished_at": now,
            "duration_ms": (now - self.started_at) * 1000,
            "outcome": self.outcome,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "traceback": self.traceback,
        }


class EnqueueRecord(NamedTuple):
    """The job row of a message being enqueued (see `Store.record_enqueues`)."""

    row: dict[str, Any]
    delayed: bool

    @property
    def state(self) -> JobState:
        return JobState.SCHEDULED if self.delayed else JobState.QUEUED


#: A write of Tracking's: the start or the end of an attempt.
AttemptRecord = Union[StartRequest, AttemptEnd]


def _json_rows(rows: list[dict[str, Any]]) -> str:
    """A batch as one JSON array of objects, for PostgreSQL's ``json_to_recordset`` (see
    `_recordset`), which takes the keys it names and ignores the others. One parameter,
    encoded in C, costs a fraction of what psycopg takes to dump an array per column."""
    return json.dumps(rows)


def _for_psycopg(statement: Any) -> str:
    """A statement's SQL as psycopg takes it (``%(name)s`` placeholders), for
    `_execute_on_driver`: the writer's batches run for every job, and SQLAlchemy's compiled
    cache lookup and parameter processing cost a sixth of each one's CPU."""
    return str(statement.compile(dialect=postgresql.psycopg.dialect()))


def _execute_on_driver(connection: Connection, sql: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Run one of the writer's statements (`_for_psycopg`) on psycopg itself, in `connection`'s
    transaction, and return its rows as tuples. SQLAlchemy's execution and result objects cost
    the writer a fifth of its CPU per batch; its error classes are kept (`DBAPIError.instance`),
    since the writer tells an outage from a bad write by them."""
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    # psycopg's errors through the dialect: importing psycopg would cost an embedded store 9 MB.
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


def _state_in(states: frozenset[JobState]) -> Any:
    """``jobs.state IN (...)`` with the states written into the SQL, as executemany requires."""
    return jobs.c.state.in_([literal_column(f"'{state.value}'") for state in sorted(states)])


# The statements of the writer's batches, built once: they run for every job.

_START_QUEUED = (
    update(jobs)
    .where(jobs.c.id.in_(bindparam("ids", expanding=True)), _state_in(TRANSITIONS[JobState.RUNNING]))
    .values(state=JobState.RUNNING, attempts=jobs.c.attempts + 1, started_at=bindparam("now"), updated_at=bindparam("now"))
    .returning(jobs.c.id, jobs.c.attempts, jobs.c.cancel_requested_at, jobs.c.started_at)
)

#: The worker of each attempt `_START_QUEUED` opened, into its job's row.
_OPEN_ATTEMPT = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_job_id"))
    .values(
        attempt_host=bindparam("b_host"),
        attempt_pid=bindparam("b_pid"),
        attempt_worker_id=bindparam("b_worker_id"),
        attempt_token=bindparam("b_requested_at"),
    )
)

#: Columns of an ended job that keep their value when the end brings none.
_KEEP_UNLESS_GIVEN = {
    "updated_at": bindparam("now"),
    "last_error": func.coalesce(bindparam("b_last_error"), jobs.c.last_error),
    "progress_percent": func.coalesce(bindparam("b_progress_percent"), jobs.c.progress_percent),
    "progress_message": func.coalesce(bindparam("b_progress_message"), jobs.c.progress_message),
}

#: By the state the job ends in (None: it was moved already), each a compare-and-set.
_END_JOB = {
    None: update(jobs).where(jobs.c.id == bindparam("b_job_id")).values(_KEEP_UNLESS_GIVEN),
    **{
        state: update(jobs)
        .where(jobs.c.id == bindparam("b_job_id"), _state_in(TRANSITIONS[state]))
        .values(state=state, result=bindparam("b_result"), finished_at=bindparam("now"), **_KEEP_UNLESS_GIVEN)
        for state in FINISHED_STATES
    },
}

#: What an ended attempt's row takes from its end when the row exists (see `_completing`).
_ENDED_COLUMNS = ("finished_at", "duration_ms", "outcome", "error_type", "error_message", "traceback")

#: The columns of an attempt's row that `AttemptEnd.attempt_row` gives: all but its key.
_ATTEMPT_ROW_COLUMNS = tuple(column.name for column in attempts.columns if not column.primary_key)


def _completing(ended: Any) -> Any:
    """An INSERT of attempt rows that completes the row when one exists: the row a takeover
    wrote when it judged the worker dead, or one a store older than schema 6 opened at the start."""
    return ended.on_conflict_do_update(
        index_elements=["job_id", "number"], set_={column: ended.excluded[column] for column in _ENDED_COLUMNS}
    )


def _ended_attempts_insert(insert: Callable[[Any], Any]) -> Any:
    """The INSERT of ended attempts' rows (`AttemptEnd.attempt_row`, executemany), run after
    their jobs' update in the same transaction, that skips the attempt whose end moved its job
    to `succeeded` (its job's row holds it: see `engine.schema`) unless that attempt has a row
    already (a takeover's, a schema-5 start's), which it completes.

    The job's row shows that this end moved it: `succeeded`, with this attempt's number and this
    end's time as its `finished_at` (the update and the row share `now`). Most jobs succeed at
    their first attempt, and that insert (a row, two index entries, a foreign-key check) was a
    fifth of PostgreSQL's CPU per job. `_RECORD_ATTEMPTS_PG` applies the same rule.
    """
    row = {name: bindparam(name, type_=attempts.c[name].type) for name in _ATTEMPT_ROW_COLUMNS}
    ended_the_job = (
        select(jobs.c.id)
        .where(
            jobs.c.id == row["job_id"], jobs.c.state == JobState.SUCCEEDED,
            jobs.c.attempts == row["number"], jobs.c.finished_at == row["finished_at"],
        )  # fmt: skip
        .exists()
    )
    has_row = (
        select(attempts.c.id).where(attempts.c.job_id == row["job_id"], attempts.c.number == row["number"]).exists()
    )
    in_job = and_(row["outcome"] == Outcome.SUCCEEDED.value, ended_the_job, ~has_row)
    chosen = select(*(value.label(name) for name, value in row.items())).where(~in_job)
    return _completing(insert(attempts).from_select(list(_ATTEMPT_ROW_COLUMNS), chosen))


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
    """The compare-and-set of an ending job, `TRANSITIONS` written out for `_RECORD_ATTEMPTS_PG`."""
    return "e.state IS NULL OR " + _moves_sql("e.state", {state: TRANSITIONS[state] for state in FINISHED_STATES})


#: `Store.record_enqueues` on PostgreSQL: the batch's rows in one statement of fixed text (a
#: multi-row VALUES has a text per batch size, which psycopg parses again each time), with the
#: rows in one JSON parameter (`_json_rows`). A job enqueued again (its row exists) is moved by
#: a compare-and-set on `REENQUEUE_TRANSITIONS`, and left alone when its state allows no move.
_RECORD_ENQUEUES_PG = _for_psycopg(text(
    f"""
INSERT INTO jobs ({", ".join(_NEW_JOB_COLUMNS)}, attempts, updated_at)
SELECT {", ".join(_NEW_JOB_COLUMNS)}, 0, created_at FROM {_recordset("new", _NEW_JOB_COLUMNS)}
ON CONFLICT (id) DO UPDATE SET
  state = excluded.state, scheduled_for = excluded.scheduled_for, updated_at = excluded.updated_at
WHERE {_moves_sql("excluded.state", REENQUEUE_TRANSITIONS)}
"""
))


#: The columns of `StartRequest` and `AttemptEnd` that `_RECORD_ATTEMPTS_PG` takes, with types.
_START_COLUMNS = {"job_id": "text", "host": "text", "pid": "int", "worker_id": "text", "requested_at": "float8"}
_END_COLUMNS = {
    "job_id": "text", "number": "int", "outcome": "text", "state": "text", "result": "text",
    "last_error": "text", "error_type": "text", "error_message": "text", "traceback": "text",
    "progress_percent": "float8", "progress_message": "text",
    "host": "text", "pid": "int", "worker_id": "text", "started_at": "float8", "start_token": "float8",
}

#: The writer's batch on PostgreSQL in one statement: the queued jobs of the starts moved to
#: `running` with their attempt's worker (as `Store.start_attempts` does), and the ends with
#: their attempt rows but for those whose job's row holds them (`_ended_attempts_insert`'s
#: rule, with the jobs this statement's update moved). Returns the jobs started; the other
#: starts are left undecided (`AttemptStart.undecided`). The ``= ANY(ARRAY(...))`` conditions
#: repeat the joins for the planner: psycopg prepares the statement, and PostgreSQL's generic
#: plan, which takes each set of rows for 100 rows, would otherwise scan a small jobs table
#: whole. They take the ids from the rows, not from parameters of their own: psycopg dumps a
#: list parameter in Python, which cost the writer 35 us per batch. The started
#: jobs' state is compared as ``state || ''``, which no index serves, so that they are found
#: by their key: with statistics taken before a burst of sends, the planner judged
#: ``ix_jobs_state_created`` selective and walked every queued job (3 ms per batch at 20,000).
_RECORD_ATTEMPTS_PG = _for_psycopg(text(
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
    {", ".join(f"{column} = excluded.{column}" for column in _ENDED_COLUMNS)}
)
SELECT id, attempts, cancel_requested_at, started_at FROM started
"""
))


class Store:
    """Jobs and attempts in a SQL database.

    Parameters:
      url(str): a SQLAlchemy URL: ``sqlite:///engine.db`` or ``postgresql+psycopg://...``.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _create_engine(url)
        self._insert = (sqlite if self.engine.dialect.name == "sqlite" else postgresql).insert
        # rowcount is not reliable for ON CONFLICT with every driver: RETURNING says which went in.
        self._insert_new_jobs = self._insert(jobs).on_conflict_do_nothing(index_elements=["id"]).returning(jobs.c.id)
        self._insert_abandoned = _completing(self._insert(attempts))
        self._insert_ended = _ended_attempts_insert(self._insert)
        self._current: ContextVar[Optional[Connection]] = ContextVar(f"store-{id(self)}", default=None)
        #: Commits the writes of this process's worker threads together (see `engine.writer`).
        self._writer_engine = _create_writer_engine(url, self.engine)
        self._leads: dict[str, Connection] = {}  # the locks of `lead`, each on its connection
        postgres = self.engine.dialect.name == "postgresql"
        one_statement = frozenset([self.record_attempts, self.record_enqueues]) if postgres else frozenset()
        self.writer = GroupCommit(
            lambda: self._writer_engine.connect().execution_options(write=True), one_statement=one_statement
        )

    # -- connections -------------------------------------------------------------------------

    def in_transaction(self) -> bool:
        """Whether this thread is inside `transaction`, whose writes join it."""
        return self._current.get() is not None

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction; nested calls in the same thread join the outer one."""
        current = self._current.get()
        if current is not None:
            yield current
            return
        with self.connect_for_writes() as connection:
            with connection.begin():
                token = self._current.set(connection)
                try:
                    yield connection
                finally:
                    self._current.reset(token)

    def connect_for_writes(self) -> Connection:
        """A connection whose transactions write: on SQLite, ``begin()`` takes the write lock
        at once (see `_create_engine`)."""
        return self.engine.connect().execution_options(write=True)

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection for reads (the current transaction's, if there is one)."""
        current = self._current.get()
        if current is not None:
            yield current
            return
        with self.engine.connect() as connection:
            yield connection

    def upgrade(self) -> int:
        """Create or migrate the schema; returns the version found (0 for a new database)."""
        with self.transaction() as connection:
            return migrations.upgrade(connection)

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.reading() as connection:
            connection.execute(text("SELECT 1"))

    def lead(self, name: str) -> bool:
        """Whether this process leads in `name`: holds a database-wide lock of that name,
        taken now if it was free, so that one process at a time does what it guards. The lock
        is held on a connection of its own until `close`; a process that dies frees it with
        its connection. On SQLite, which one host uses, always True."""
        if self.engine.dialect.name != "postgresql":
            return True
        held = self._leads.get(name)
        if held is not None:
            try:
                held.exec_driver_sql("SELECT 1")
                held.rollback()
                return True
            except DBAPIError:  # the connection broke, and the lock went with it
                del self._leads[name]
                held.invalidate()
                held.close()
        connection = self._writer_engine.connect()
        try:
            taken = connection.execute(text("SELECT pg_try_advisory_lock(hashtext(:name))"), {"name": name}).scalar()
            connection.rollback()  # the lock is the session's: no transaction is left open
        except BaseException:
            connection.close()
            raise
        if taken:
            self._leads[name] = connection
        else:
            connection.close()
        return bool(taken)

    def close(self) -> None:
        for connection in self._leads.values():
            connection.close()
        self._leads.clear()
        self.writer.close()
        self._writer_engine.dispose()
        self.engine.dispose()

    # -- enqueue -------------------------------------------------------------------------------

    def record_enqueue(self, row: dict[str, Any], *, delayed: bool) -> None:
        """Create the job row of a message being enqueued, or move an existing one, in the
        current transaction or a new one (see `record_enqueues`).

        Raises:
          DuplicateJob: another job holds the row's idempotency key.
        """
        with self.transaction() as connection:
            self.record_enqueues(connection, [EnqueueRecord(row, delayed)])

    def record_enqueues(self, connection: Connection, records: list[EnqueueRecord]) -> list[None]:
        """Create the job rows of messages being enqueued, or move existing ones, in
        `connection`'s transaction: one statement for the batch on PostgreSQL
        (`_RECORD_ENQUEUES_PG`, which the writer commits without a transaction around it).

        A message is enqueued again when a retry waits out its backoff, when a delayed message
        becomes due, and when a failed job is retried by hand: the row then moves to `scheduled`
        or `queued` if its current state allows it.

        Raises:
          DuplicateJob: another job holds the idempotency key of the batch's one row.
          IntegrityError: the same, in a batch of several (the writer then tries each alone).
        """
        rows = [{**record.row, "state": record.state} for record in records]
        try:
            if self.engine.dialect.name == "postgresql":
                _execute_on_driver(connection, _RECORD_ENQUEUES_PG, {"new": _json_rows(rows)})
                return [None] * len(records)
            values = [{**row, "attempts": 0, "updated_at": row["created_at"]} for row in rows]
            inserted = set(connection.execute(self._insert_new_jobs, values).scalars())
        except IntegrityError:
            if len(records) > 1:
                raise
            raise DuplicateJob(records[0].row["idempotency_key"]) from None
        for record in records:
            if record.row["id"] not in inserted:
                self._transition(
                    connection,
                    record.row["id"],
                    record.state,
                    from_states=REENQUEUE_TRANSITIONS[record.state],
                    scheduled_for=record.row["scheduled_for"],
                )
        return [None] * len(records)

    def find_by_idempotency_key(self, key: str) -> Optional[Job]:
        with self.reading() as connection:
            found = connection.execute(select(jobs).where(jobs.c.idempotency_key == key)).first()
        return _job(found) if found else None

    def requeue(self, job_id: str) -> Job:
        """Move a failed or canceled job back to `queued` so that its message can be sent again.

        Raises:
          JobNotFound, InvalidJobState
        """
        with self.transaction() as connection:
            # The new run must not inherit the cancel request of the one before.
            reset = {"finished_at": None, "scheduled_for": None, "cancel_requested_at": None}
            if not self._transition(connection, job_id, JobState.QUEUED, **reset):
                job = self.get(job_id)
                raise InvalidJobState(f"job {job_id} is {job.state}; only failed or canceled jobs can be retried")
            return self.get(job_id)

    # -- unsent messages -----------------------------------------------------------------------

    def claim_unsent(self, drained_queues: list[str], *, older_than_s: float, limit: int = 500) -> list[tuple[Job, dict[str, Any]]]:
        """Jobs whose message was most likely never sent, claimed for sending again (see
        `engine.middleware.resend`), with the options of their message. Untouched for
        `older_than_s` seconds, each is:

        - `queued` in one of `drained_queues` (queues whose messages RabbitMQ has all delivered);
        - or `scheduled` for more than `older_than_s` seconds ago.

        A claim sets the job's ``updated_at``: one process takes each job, and takes it again
        only after another `older_than_s`, should its message still not have come.
        """
        now = time.time()
        cutoff = now - older_than_s
        untouched = and_(jobs.c.created_at < cutoff, jobs.c.updated_at < cutoff)
        lost = and_(jobs.c.state == JobState.SCHEDULED, jobs.c.scheduled_for < cutoff)
        if drained_queues:
            lost = or_(and_(jobs.c.state == JobState.QUEUED, jobs.c.queue.in_(drained_queues)), lost)
        # No order: the scan stops at `limit` found, and what is left is found at the next look.
        candidates = select(jobs.c.id).where(untouched, lost).limit(limit)
        with self.transaction() as connection:
            claimed = connection.execute(
                update(jobs)
                .where(jobs.c.id.in_(candidates.scalar_subquery()), untouched, lost)
                .values(updated_at=now)
                .returning(*jobs.c)
            ).all()
        return [(_job(row), json.loads(row.options)) for row in claimed]

    def forget_unsent(self, job_id: str, *, recorded_since: float) -> bool:
        """Delete the row of a new job whose message the broker did not take, so that no job
        waits as `queued` for a message that does not exist.

        Only a row recorded by that enqueue goes: still `queued` or `scheduled`, never started,
        and created at or after `recorded_since` (when the enqueue began). The row of a job
        recorded before (a retry, a delayed message falling due, a job requeued by hand) stays.

        Returns:
          bool: True if the row was deleted.
        """
        with self.transaction() as connection:
            deleted = connection.execute(
                delete(jobs).where(
                    jobs.c.id == job_id,
                    jobs.c.state.in_([JobState.QUEUED, JobState.SCHEDULED]),
                    jobs.c.attempts == 0,
                    jobs.c.created_at >= recorded_since,
                )
            )
        return deleted.rowcount == 1

    def fail_unsent(self, job_id: str, reason: str) -> bool:
        """Fail a job whose message the broker never took, long after it was sent (see
        `forget_unsent` for a sender still waiting): it is not left `queued` for a message
        that does not exist, and `engine retry` sends it again.

        Returns:
          bool: True if the job was waiting for that message (`queued` or `scheduled`, never
          started), and is now `failed`.
        """
        now = time.time()
        with self.transaction() as connection:
            failed = connection.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_([JobState.QUEUED, JobState.SCHEDULED]), jobs.c.attempts == 0)
                .values(state=JobState.FAILED, last_error=reason, finished_at=now, updated_at=now)
            )
        return failed.rowcount == 1

    # -- attempts ------------------------------------------------------------------------------

    def start_attempt(
        self, job_id: str, *, host: str, pid: int, worker_id: Optional[str], dead_after_s: float
    ) -> AttemptStart:
        """Move the job to `running` and open an attempt row, in one transaction (see
        `start_attempts`)."""
        request = StartRequest(job_id, host, pid, worker_id, dead_after_s, time.time())
        with self.transaction() as connection:
            [start] = self.start_attempts(connection, [request])
        return start

    def record_attempts(self, connection: Connection, records: list[AttemptRecord]) -> list[Optional[AttemptStart]]:
        """Starts and ends of attempts, on `connection`: how the store's writer commits those
        of all the worker threads of a process together.

        On PostgreSQL it is one statement (`_RECORD_ATTEMPTS_PG`), which the writer commits
        without a transaction around it (`one_statement`). It starts the queued jobs only: a
        start it finds not queued (a redelivery, a takeover), or whose job the batch also ends
        (a retry due at once: no statement updates a row twice), comes back undecided, for
        `start_attempts` to decide. Elsewhere, `start_attempts` and `finish_attempts` each take
        one statement per kind.

        Returns:
          one `AttemptStart` per `StartRequest`, None per `AttemptEnd`, in order.
        """
        starts = [record for record in records if isinstance(record, StartRequest)]
        ends = [record for record in records if isinstance(record, AttemptEnd)]
        if self.engine.dialect.name != "postgresql":
            started = iter(self.start_attempts(connection, starts))
            self.finish_attempts(connection, ends)
            return [next(started) if isinstance(record, StartRequest) else None for record in records]
        ended = {end.job_id for end in ends}
        starts = [start for start in starts if start.job_id not in ended]
        parameters = {
            "now": time.time(),
            "s": _json_rows([start._asdict() for start in starts]),
            "e": _json_rows([end._asdict() for end in ends]),
        }
        queued = {row[0]: _Started(*row) for row in _execute_on_driver(connection, _RECORD_ATTEMPTS_PG, parameters)}
        # pop: of two deliveries of one job in the batch, the second is undecided.
        return [
            _started(queued.pop(record.job_id, None)) if isinstance(record, StartRequest) else None for record in records
        ]

    def start_attempts(self, connection: Connection, requests: list[StartRequest]) -> list[AttemptStart]:
        """Move each request's job to `running` with its attempt's worker, in `connection`'s
        transaction: one UPDATE for every queued job of the batch, one more for the workers.
        The attempt's row is written when it ends (`finish_attempts`).

        A job found `running` already is run again only if the worker of its open attempt is
        dead: silent for `dead_after_s`, stopped, or unknown. That attempt is then closed as
        `abandoned`. Under a live worker it is left alone, however long it runs: liveness, not
        a timeout, decides. Two deliveries racing to rerun it are settled by a compare-and-set
        on the attempt count, so at most one wins. The start also reads whether the job's
        cancel was requested, so that the worker need not ask again.

        Returns:
          list[AttemptStart]: one per request, in order.
        """
        if not requests:
            return []
        now = time.time()
        moved = connection.execute(
            _START_QUEUED, {"ids": [request.job_id for request in requests], "now": now}
        ).all()
        queued = {row.id: row for row in moved}
        starts, opened = [], []
        for request in requests:
            # pop: a second delivery of the same job in this batch finds it `running`.
            row = queued.pop(request.job_id, None)
            if row is None:
                starts.append(self._start_running(connection, request, now))
            else:
                starts.append(_started(row))
                opened.append({f"b_{name}": value for name, value in request._asdict().items()})
        if opened:
            connection.execute(_OPEN_ATTEMPT, opened)
        return starts

    def _start_running(self, connection: Connection, request: StartRequest, now: float) -> AttemptStart:
        """Start a job that was not queued: take it over if its worker died, else say why not."""
        found = _latest_attempt(connection, request.job_id)
        if found is None or found.state != JobState.RUNNING:
            return AttemptStart(None)
        own = (request.worker_id, request.requested_at)
        if request.worker_id is not None and (found.worker_id, found.start_token) == own:
            return _started(found)  # this very start, committed by a try whose reply was lost
        alive = (
            found.heartbeat_at is not None
            and found.stopped_at is None
            and now - found.heartbeat_at < request.dead_after_s
        )
        if alive:
            return AttemptStart(None, running_elsewhere=True)
        number = connection.execute(
            update(jobs)
            .where(jobs.c.id == request.job_id, jobs.c.state == JobState.RUNNING, jobs.c.attempts == found.attempts)
            .values(
                attempts=jobs.c.attempts + 1, started_at=now, updated_at=now, attempt_host=request.host,
                attempt_pid=request.pid, attempt_worker_id=request.worker_id, attempt_token=request.requested_at,
            )  # fmt: skip
            .returning(jobs.c.attempts)
        ).scalar()
        if number is None:  # another delivery took it over first: it runs there now
            return AttemptStart(None, running_elsewhere=True)
        abandoned = AttemptEnd.of(request.job_id, found.attempts, Outcome.ABANDONED, run=_run_of(found))
        connection.execute(self._insert_abandoned, abandoned.attempt_row(now))
        return AttemptStart(number, cancel_requested=found.cancel_requested_at is not None, started_at=now)

    def finish_attempt(self, job_id: str, number: int, outcome: Outcome, **fields: Any) -> None:
        """Record how attempt `number`, the job's latest, ended and, when a `state` is given,
        end the job there, in a transaction of its own (see `finish_attempts`; `fields` as
        `AttemptEnd.of`, without `run`: it is read from the store)."""
        with self.transaction() as connection:
            found = _latest_attempt(connection, job_id)
            if found is None:
                raise JobNotFound(job_id)
            self.finish_attempts(connection, [AttemptEnd.of(job_id, number, outcome, run=_run_of(found), **fields)])

    def finish_attempts(self, connection: Connection, ends: list[AttemptEnd]) -> list[None]:
        """Write the rows of ended attempts, in `connection`'s transaction, one executemany
        per statement for the whole batch.

        A job whose end has a `state` is moved there (compare-and-set). When `state` is None
        the job's state was already moved (a retry set it to `scheduled`) and only its last
        error and progress are written.

        Returns:
          list[None]: one per end, for the writer that batches them.
        """
        if not ends:
            return []
        now = time.time()
        rows = [end.parameters(now) for end in ends]
        for state in {end.state for end in ends}:
            connection.execute(_END_JOB[state], [row for row in rows if row["b_state"] == state])
        connection.execute(self._insert_ended, [end.attempt_row(now) for end in ends])
        return [None] * len(ends)

    def set_progress(self, job_id: str, percent: float, message: Optional[str]) -> None:
        """Record progress of a running job (ignored once it has ended)."""
        with self.transaction() as connection:
            connection.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING)
                .values(progress_percent=percent, progress_message=message, updated_at=time.time())
            )

    # -- workers -------------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, *, host: str, pid: int) -> None:
        """Say that the worker process lives; its first heartbeat registers it."""
        now = time.time()
        beat = (
            self._insert(workers)
            .values(id=worker_id, host=host, pid=pid, started_at=now, heartbeat_at=now)
            .on_conflict_do_update(index_elements=["id"], set_={"heartbeat_at": now})
        )
        with self.transaction() as connection:
            connection.execute(beat)

    def mark_workers_stopped(
        self, *, worker_id: Optional[str] = None, host: Optional[str] = None, pid: Optional[int] = None
    ) -> None:
        """Record that a worker process is gone, by id or by host and pid (the supervisor knows
        only the pid of a child that died): its running jobs may be taken over at once."""
        condition = workers.c.id == worker_id if worker_id else and_(workers.c.host == host, workers.c.pid == pid)
        with self.transaction() as connection:
            connection.execute(
                update(workers).where(condition, workers.c.stopped_at.is_(None)).values(stopped_at=time.time())
            )

    # -- reads ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """Raises: JobNotFound."""
        with self.reading() as connection:
            row = connection.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(job_id)
        return _job(row)

    def get_result(self, job_id: str) -> tuple[JobState, Optional[str]]:
        """The job's state and its JSON-encoded result (None until it succeeds)."""
        with self.reading() as connection:
            row = connection.execute(select(jobs.c.state, jobs.c.result).where(jobs.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(job_id)
        return JobState(row.state), row.result

    def message_options(self, job_id: str) -> dict[str, Any]:
        """The options the job's message was sent with, to send it again."""
        with self.reading() as connection:
            options = connection.execute(select(jobs.c.options).where(jobs.c.id == job_id)).scalar()
        if options is None:
            raise JobNotFound(job_id)
        return json.loads(options)

    def list_attempts(self, job_id: str) -> list[Attempt]:
        """The audit trail of a job, oldest attempt first. Its latest attempt, while it runs and
        once it has ended the job as `succeeded`, is read from the job's row when it has no row
        of its own (see `engine.schema`). Raises: JobNotFound."""
        with self.reading() as connection:
            latest = _latest_attempt(connection, job_id)
            if latest is None:
                raise JobNotFound(job_id)
            rows = connection.execute(
                select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.number)
            ).all()
        trail = [_attempt(row) for row in rows]
        if latest.host is not None and latest.attempts not in {attempt.number for attempt in trail}:
            if latest.state in (JobState.RUNNING, JobState.SUCCEEDED):
                # Unless an earlier attempt, taken for abandoned but alive, ended the job: the
                # end of this one is not known yet.
                ended_it = latest.state == JobState.SUCCEEDED and Outcome.SUCCEEDED not in {a.outcome for a in trail}
                trail.append(_attempt_in_job(job_id, latest, ended_it))
        return trail

    def list_jobs(
        self,
        *,
        state: Optional[JobState] = None,
        actor: Optional[str] = None,
        queue: Optional[str] = None,
        schedule: Optional[str] = None,
        limit: int = 50,
        cursor: Optional[str] = None,
        created_since: Optional[float] = None,
        created_before: Optional[float] = None,
    ) -> tuple[list[Job], Optional[str]]:
        """Jobs newest first, optionally filtered (each filter has an index on it and
        ``created_at``); returns the page and the cursor of the next."""
        query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        if state is not None:
            query = query.where(jobs.c.state == state)
        if actor is not None:
            query = query.where(jobs.c.actor == actor)
        if queue is not None:
            query = query.where(jobs.c.queue == queue)
        if schedule is not None:
            query = query.where(jobs.c.schedule == schedule)
        if created_since is not None:
            query = query.where(jobs.c.created_at >= created_since)
        if created_before is not None:
            query = query.where(jobs.c.created_at < created_before)
        if cursor is not None:
            query = query.where(tuple_(jobs.c.created_at, jobs.c.id) < tuple_(*decode_cursor(cursor)))
        with self.reading() as connection:
            rows = connection.execute(query).all()
        page = [_job(row) for row in rows[:limit]]
        next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
        return page, next_cursor

    def count_by_state(self, *, created_since: Optional[float] = None) -> dict[JobState, int]:
        """How many jobs are in each state (states with none are 0)."""
        query = select(jobs.c.state, func.count()).group_by(jobs.c.state)
        if created_since is not None:
            query = query.where(jobs.c.created_at >= created_since)
        with self.reading() as connection:
            counts = dict(connection.execute(query).all())
        return {state: counts.get(state, 0) for state in JobState}

    def list_workers(self, *, seen_since: float) -> list[Worker]:
        """Worker processes whose last heartbeat is at or after `seen_since`, live or not,
        newest start first, each with the jobs it is running."""
        query = select(workers).where(workers.c.heartbeat_at >= seen_since).order_by(workers.c.started_at.desc())
        running = select(jobs.c.attempt_worker_id, jobs.c.id).where(jobs.c.state == JobState.RUNNING)
        with self.reading() as connection:
            rows = connection.execute(query).all()
            jobs_of: dict[str, list[str]] = {}
            for worker_id, job_id in connection.execute(running):
                jobs_of.setdefault(worker_id, []).append(job_id)
        return [
            Worker(id=row.id, host=row.host, pid=row.pid, started_at=row.started_at, heartbeat_at=row.heartbeat_at,
                   stopped_at=row.stopped_at, running_jobs=sorted(jobs_of.get(row.id, [])))  # fmt: skip
            for row in rows
        ]

    # -- cancellation --------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a job, or ask its worker to, in one transaction with the row locked.

        A `scheduled` or `queued` job becomes `canceled` at once (compare-and-set, with its
        finished_at): whichever worker receives its message later skips it. A `running` job
        stays `running` with ``cancel_requested_at`` set, durably: its worker interrupts it and
        records it `canceled`. A finished job is left as it is. ``cancel_requested_at`` keeps
        the first request's time when the job is canceled twice.

        Returns:
          Job: the job after the request: `canceled`, `running` (the request is recorded), or
          the finished state it already had.

        Raises:
          JobNotFound
        """
        now = time.time()
        with self.transaction() as connection:
            state = connection.execute(select(jobs.c.state).where(jobs.c.id == job_id).with_for_update()).scalar()
            if state is None:
                raise JobNotFound(job_id)
            requested = func.coalesce(jobs.c.cancel_requested_at, now)
            if state in (JobState.SCHEDULED, JobState.QUEUED):
                self._transition(connection, job_id, JobState.CANCELED, finished_at=now, cancel_requested_at=requested)
            elif state == JobState.RUNNING:
                connection.execute(
                    jobs.update().where(jobs.c.id == job_id).values(cancel_requested_at=requested, updated_at=now)
                )
            return self.get(job_id)

    def cancel_requests(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs have a cancel request: a worker asks about the jobs it runs."""
        if not job_ids:
            return set()
        query = select(jobs.c.id).where(jobs.c.id.in_(job_ids), jobs.c.cancel_requested_at.is_not(None))
        with self.reading() as connection:
            return set(connection.execute(query).scalars())

    # -- retention -----------------------------------------------------------------------------

    def purge_finished(
        self, *, older_than: float, batch_size: int = 1000, on_batch: Optional[Callable[[int], None]] = None
    ) -> int:
        """Delete finished jobs (and their attempts) that ended before `older_than`, one batch
        per transaction so that a large purge never holds a long lock. Returns how many went.

        `on_batch`, when given, is called with the running total after each batch that deleted
        jobs has been committed, e.g. to report progress.

        Raises:
          ValueError: batch_size below 1."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        purged = 0
        while True:
            with self.transaction() as connection:
                ids = (
                    connection.execute(select(jobs.c.id).where(_finished_before(older_than)).limit(batch_size))
                    .scalars()
                    .all()
                )
                if ids:
                    connection.execute(delete(attempts).where(attempts.c.job_id.in_(ids)))
                    connection.execute(delete(jobs).where(jobs.c.id.in_(ids)))
            purged += len(ids)
            if ids and on_batch is not None:
                on_batch(purged)
            if len(ids) < batch_size:
                return purged

    def count_finished_before(self, older_than: float) -> int:
        """How many jobs `purge_finished` would delete for this cutoff."""
        with self.reading() as connection:
            return connection.execute(select(func.count()).where(_finished_before(older_than))).scalar_one()

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _transition(
        connection: Connection,
        job_id: str,
        to: JobState,
        *,
        from_states: Optional[frozenset[JobState]] = None,
        **values: Any,
    ) -> bool:
        """Compare-and-set the job's state from `from_states` (by default, every state
        `TRANSITIONS` allows before `to`); False when its current state is not one of them."""
        moved = connection.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state.in_(from_states or TRANSITIONS[to]))
            .values({"state": to, "updated_at": time.time(), **values})
        )
        return moved.rowcount == 1


def ended_attempt_durations(since: float) -> Any:
    """A query of (actor, duration_ms), one row per ended attempt of the jobs created since
    `since`: the attempts' rows, and the attempts that ended their job as `succeeded` and that
    only their job's row holds (see `engine.schema`)."""
    with_rows = (
        select(jobs.c.actor, attempts.c.duration_ms)
        .join(attempts, attempts.c.job_id == jobs.c.id)
        .where(jobs.c.created_at >= since, attempts.c.duration_ms.is_not(None))
    )
    # A row for its latest attempt, or for an attempt taken for abandoned that ended it after all.
    in_a_row = or_(attempts.c.number == jobs.c.attempts, attempts.c.outcome == Outcome.SUCCEEDED)
    in_job_rows = select(jobs.c.actor, ((jobs.c.finished_at - jobs.c.started_at) * 1000).label("duration_ms")).where(
        jobs.c.created_at >= since, jobs.c.state == JobState.SUCCEEDED, jobs.c.attempt_host.is_not(None),
        ~select(attempts.c.id).where(attempts.c.job_id == jobs.c.id, in_a_row).exists(),
    )  # fmt: skip
    return with_rows.union_all(in_job_rows)


def _open_attempt_row() -> Any:
    """The job's latest attempt row, when it is still open: only a worker of schema 5 or older
    opens one (a rolling upgrade, or a job it started before the migration)."""
    return and_(attempts.c.job_id == jobs.c.id, attempts.c.number == jobs.c.attempts, attempts.c.finished_at.is_(None))


def _latest_attempt(connection: Connection, job_id: str) -> Any:
    """The job's state, attempt count, cancel request and start, who runs its latest attempt
    (`_running_attempt`) and that worker's heartbeat; None for an unknown job."""
    run = _running_attempt()
    return connection.execute(
        select(
            jobs.c.state, jobs.c.attempts, jobs.c.cancel_requested_at, jobs.c.started_at, jobs.c.finished_at,
            *run.values(), workers.c.heartbeat_at, workers.c.stopped_at,
        )  # fmt: skip
        .select_from(jobs.outerjoin(attempts, _open_attempt_row()).outerjoin(workers, workers.c.id == run["worker_id"]))
        .where(jobs.c.id == job_id)
    ).first()


def _run_of(latest: Any) -> AttemptRun:
    """Who runs the attempt that `_latest_attempt` found."""
    return AttemptRun(latest.host or "", latest.pid or 0, latest.worker_id, latest.run_started_at, latest.start_token)


def _running_attempt() -> dict[str, Any]:
    """Who runs a job's latest attempt, as columns by name (outer-joined with
    `_open_attempt_row`): from the open attempt row if there is one, else from the job's row
    (see `engine.schema`)."""
    return {
        name: case((attempts.c.id.is_not(None), open_row), else_=job_row).label(name)
        for name, open_row, job_row in (
            ("host", attempts.c.worker_host, jobs.c.attempt_host),
            ("pid", attempts.c.worker_pid, jobs.c.attempt_pid),
            ("worker_id", attempts.c.worker_id, jobs.c.attempt_worker_id),
            ("run_started_at", attempts.c.started_at, jobs.c.started_at),
            ("start_token", attempts.c.start_token, jobs.c.attempt_token),
        )
    }


def _finished_before(cutoff: float) -> Any:
    """Finished jobs that ended before `cutoff`. A job ends after it was created, so the
    condition on ``created_at`` drops none of them: it gives the planner a range of the
    created_at indexes to walk (finished_at has no index: see `engine.schema`)."""
    return and_(
        jobs.c.state.in_([state.value for state in FINISHED_STATES]),
        jobs.c.created_at < cutoff,
        jobs.c.finished_at < cutoff,
    )


class _Started(NamedTuple):
    """A row of the jobs `_RECORD_ATTEMPTS_PG` started."""

    id: str
    attempts: int
    cancel_requested_at: Optional[float]
    started_at: float


def _started(row: Any) -> AttemptStart:
    """The start of a job moved to `running` (`row` has its attempt count, cancel request and
    start time); undecided when there is no row."""
    if row is None:
        return AttemptStart(None, undecided=True)
    return AttemptStart(row.attempts, cancel_requested=row.cancel_requested_at is not None, started_at=row.started_at)


def _job(row: Any) -> Job:
    return Job(
        id=row.id,
        actor=row.actor,
        queue=row.queue,
        state=JobState(row.state),
        args=json.loads(row.args),
        kwargs=json.loads(row.kwargs),
        priority=row.priority,
        idempotency_key=row.idempotency_key,
        attempts=row.attempts,
        progress_percent=row.progress_percent,
        progress_message=row.progress_message,
        last_error=row.last_error,
        created_at=row.created_at,
        scheduled_for=row.scheduled_for,
        started_at=row.started_at,
        finished_at=row.finished_at,
        schedule=row.schedule,
        fire_time=row.fire_time,
    )


def _attempt_in_job(job_id: str, latest: Any, ended_the_job: bool) -> Attempt:
    """The latest attempt from its job's row (`_latest_attempt`): running, or the one that
    ended the job as `succeeded`."""
    run = _run_of(latest)
    finished_at = latest.finished_at if ended_the_job else None
    return Attempt(
        job_id=job_id, number=latest.attempts, worker_host=run.host, worker_pid=run.pid, started_at=run.started_at,
        finished_at=finished_at, duration_ms=(finished_at - run.started_at) * 1000 if ended_the_job else None,
        outcome=Outcome.SUCCEEDED if ended_the_job else None, error_type=None, error_message=None, traceback=None,
    )  # fmt: skip


def _attempt(row: Any) -> Attempt:
    return Attempt(
        job_id=row.job_id,
        number=row.number,
        worker_host=row.worker_host,
        worker_pid=row.worker_pid,
        started_at=row.started_at,
        finished_at=row.finished_at,
        duration_ms=row.duration_ms,
        outcome=Outcome(row.outcome) if row.outcome else None,
        error_type=row.error_type,
        error_message=row.error_message,
        traceback=row.traceback,
    )
