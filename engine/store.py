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
from typing import Any, Callable, Iterator, Optional

from sqlalchemy import Connection, Engine, and_, create_engine, delete, event, func, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from . import migrations
from .errors import DuplicateJob, EngineError, InvalidJobState, JobNotFound
from .job import FINISHED_STATES, TRANSITIONS, Attempt, Job, JobState, Outcome
from .schema import attempts, jobs


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


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(created_at), str(job_id)
    except (ValueError, TypeError) as error:
        raise EngineError(f"malformed cursor {cursor!r}: pass back the next_cursor of a previous page") from error


class Store:
    """Jobs and attempts in a SQL database.

    Parameters:
      url(str): a SQLAlchemy URL: ``sqlite:///engine.db`` or ``postgresql+psycopg://...``.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _create_engine(url)
        self._insert = (sqlite if self.engine.dialect.name == "sqlite" else postgresql).insert
        self._current: ContextVar[Optional[Connection]] = ContextVar(f"store-{id(self)}", default=None)

    # -- connections -------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction; nested calls in the same thread join the outer one."""
        current = self._current.get()
        if current is not None:
            yield current
            return
        with self.engine.connect() as connection:
            connection = connection.execution_options(write=True)
            with connection.begin():
                token = self._current.set(connection)
                try:
                    yield connection
                finally:
                    self._current.reset(token)

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

    def close(self) -> None:
        self.engine.dispose()

    # -- enqueue -------------------------------------------------------------------------------

    def record_enqueue(self, row: dict[str, Any], *, delayed: bool) -> None:
        """Create the job row of a message being enqueued, or move an existing one.

        A message is enqueued again when a retry waits out its backoff, when a delayed message
        becomes due, and when a failed job is retried by hand: the row then moves to `scheduled`
        or `queued` if its current state allows it.

        Raises:
          DuplicateJob: another job holds the row's idempotency key.
        """
        now = row["created_at"]
        state = JobState.SCHEDULED if delayed else JobState.QUEUED
        with self.transaction() as connection:
            statement = (
                self._insert(jobs)
                .values(**row, state=state, attempts=0, updated_at=now)
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(jobs.c.id)  # rowcount is not reliable for ON CONFLICT with every driver
            )
            try:
                inserted = connection.execute(statement).first()
            except IntegrityError:
                raise DuplicateJob(row["idempotency_key"]) from None
            if inserted is None:
                self._transition(connection, row["id"], state, scheduled_for=row["scheduled_for"])

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
            if not self._transition(connection, job_id, JobState.QUEUED, finished_at=None, scheduled_for=None):
                job = self.get(job_id)
                raise InvalidJobState(f"job {job_id} is {job.state}; only failed or canceled jobs can be retried")
            return self.get(job_id)

    # -- attempts ------------------------------------------------------------------------------

    def start_attempt(self, job_id: str, *, host: str, pid: int, redelivered: bool) -> Optional[int]:
        """Move the job to `running` and open an attempt row, in one transaction.

        A redelivered message whose job is still `running` lost its worker: the open attempt is
        closed as `abandoned` and a new one starts.

        Returns:
          The new attempt's number, or None when the job must not run (it is finished,
          canceled, unknown, or running under a live delivery).
        """
        now = time.time()
        started = jobs.update().values(attempts=jobs.c.attempts + 1, started_at=now, updated_at=now)
        with self.transaction() as connection:
            runnable = started.values(state=JobState.RUNNING).where(
                jobs.c.id == job_id, jobs.c.state.in_(TRANSITIONS[JobState.RUNNING])
            )
            number = connection.execute(runnable.returning(jobs.c.attempts)).scalar()
            if number is None and redelivered:
                if self._close_open_attempts(connection, job_id, Outcome.ABANDONED, now):
                    rerun = started.where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING)
                    number = connection.execute(rerun.returning(jobs.c.attempts)).scalar()
            if number is None:
                return None
            connection.execute(
                attempts.insert().values(job_id=job_id, number=number, worker_host=host, worker_pid=pid, started_at=now)
            )
            return number

    def finish_attempt(
        self,
        job_id: str,
        number: int,
        outcome: Outcome,
        *,
        state: Optional[JobState] = None,
        result: Optional[str] = None,
        error: Optional[BaseException] = None,
        traceback: Optional[str] = None,
        progress: Optional[tuple[float, Optional[str]]] = None,
    ) -> None:
        """Close attempt `number` with its outcome and, when `state` is given, end the job there.

        When `state` is None the job's state was already moved (a retry set it to `scheduled`)
        and only its last error and progress are written.
        """
        now = time.time()
        job_values: dict[str, Any] = {"updated_at": now}
        if error is not None:
            job_values["last_error"] = f"{type(error).__name__}: {error}"
        if progress is not None:
            job_values["progress_percent"], job_values["progress_message"] = progress
        with self.transaction() as connection:
            if state is None:
                connection.execute(jobs.update().where(jobs.c.id == job_id).values(**job_values))
            else:
                self._transition(connection, job_id, state, result=result, finished_at=now, **job_values)
            connection.execute(
                attempts.update()
                .where(attempts.c.job_id == job_id, attempts.c.number == number)
                .values(
                    finished_at=now,
                    duration_ms=(now - attempts.c.started_at) * 1000,
                    outcome=outcome,
                    error_type=type(error).__name__ if error is not None else None,
                    error_message=str(error) if error is not None else None,
                    traceback=traceback,
                )
            )

    def set_progress(self, job_id: str, percent: float, message: Optional[str]) -> None:
        """Record progress of a running job (ignored once it has ended)."""
        with self.transaction() as connection:
            connection.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING)
                .values(progress_percent=percent, progress_message=message, updated_at=time.time())
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
        """The audit trail of a job, oldest attempt first. Raises: JobNotFound."""
        with self.reading() as connection:
            rows = connection.execute(
                select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.number)
            ).all()
            if not rows and connection.execute(select(jobs.c.id).where(jobs.c.id == job_id)).first() is None:
                raise JobNotFound(job_id)
        return [_attempt(row) for row in rows]

    def list_jobs(
        self,
        *,
        state: Optional[JobState] = None,
        actor: Optional[str] = None,
        limit: int = 50,
        cursor: Optional[str] = None,
        created_since: Optional[float] = None,
    ) -> tuple[list[Job], Optional[str]]:
        """Jobs newest first, optionally filtered; returns the page and the cursor of the next."""
        query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        if state is not None:
            query = query.where(jobs.c.state == state)
        if actor is not None:
            query = query.where(jobs.c.actor == actor)
        if created_since is not None:
            query = query.where(jobs.c.created_at >= created_since)
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
    def _transition(connection: Connection, job_id: str, to: JobState, **values: Any) -> bool:
        """Compare-and-set the job's state; False when its current state does not allow `to`."""
        moved = connection.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state.in_(TRANSITIONS[to]))
            .values({"state": to, "updated_at": time.time(), **values})
        )
        return moved.rowcount == 1

    @staticmethod
    def _close_open_attempts(connection: Connection, job_id: str, outcome: Outcome, now: float) -> int:
        closed = connection.execute(
            attempts.update()
            .where(attempts.c.job_id == job_id, attempts.c.finished_at.is_(None))
            .values(finished_at=now, duration_ms=(now - attempts.c.started_at) * 1000, outcome=outcome)
        )
        return closed.rowcount


def _finished_before(cutoff: float) -> Any:
    return and_(jobs.c.state.in_([state.value for state in FINISHED_STATES]), jobs.c.finished_at < cutoff)


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
    )


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
