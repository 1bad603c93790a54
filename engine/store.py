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
from typing import Any, Callable, Iterator, NamedTuple, Optional

from sqlalchemy import Connection, Engine, and_, create_engine, delete, event, func, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from . import migrations
from .errors import DuplicateJob, EngineError, InvalidJobState, JobNotFound
from .job import FINISHED_STATES, REENQUEUE_TRANSITIONS, TRANSITIONS, Attempt, Job, JobState, Outcome
from .schema import attempts, jobs, workers


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


class AttemptStart(NamedTuple):
    """What `Store.start_attempt` decided.

    Attributes:
      number(int): the new attempt's number when the job is to run now, else None.
      running_elsewhere(bool): the job is running under a live worker: look again later, as
        that worker may still die before it ends.
    """

    number: Optional[int]
    running_elsewhere: bool = False


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
                self._transition(
                    connection,
                    row["id"],
                    state,
                    from_states=REENQUEUE_TRANSITIONS[state],
                    scheduled_for=row["scheduled_for"],
                )

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

    # -- attempts ------------------------------------------------------------------------------

    def start_attempt(
        self, job_id: str, *, host: str, pid: int, worker_id: Optional[str], dead_after_s: float
    ) -> AttemptStart:
        """Move the job to `running` and open an attempt row, in one transaction.

        A job found `running` already is run again only if the worker of its open attempt is
        dead: silent for `dead_after_s`, stopped, or unknown. That attempt is then closed as
        `abandoned`. Under a live worker it is left alone, however long it runs: liveness, not
        a timeout, decides. Two deliveries racing to rerun it are settled by a compare-and-set
        on the attempt count, so at most one wins.
        """
        now = time.time()
        with self.transaction() as connection:
            queued = (
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_(TRANSITIONS[JobState.RUNNING]))
                .values(state=JobState.RUNNING, attempts=jobs.c.attempts + 1, started_at=now, updated_at=now)
            )
            number = connection.execute(queued.returning(jobs.c.attempts)).scalar()
            if number is None:
                number = self._rerun_if_abandoned(connection, job_id, now, dead_after_s)
                if number is None:
                    state = connection.execute(select(jobs.c.state).where(jobs.c.id == job_id)).scalar()
                    return AttemptStart(None, running_elsewhere=state == JobState.RUNNING)
            connection.execute(
                attempts.insert().values(
                    job_id=job_id, number=number, worker_host=host, worker_pid=pid, worker_id=worker_id, started_at=now
                )
            )
            return AttemptStart(number)

    def _rerun_if_abandoned(
        self, connection: Connection, job_id: str, now: float, dead_after_s: float
    ) -> Optional[int]:
        """Take over a `running` job whose worker died; the new attempt number, or None."""
        open_attempt = attempts.c.finished_at.is_(None)
        found = connection.execute(
            select(jobs.c.attempts, workers.c.heartbeat_at, workers.c.stopped_at)
            .select_from(
                jobs.outerjoin(attempts, and_(attempts.c.job_id == jobs.c.id, open_attempt)).outerjoin(
                    workers, workers.c.id == attempts.c.worker_id
                )
            )
            .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING)
        ).first()
        if found is None:
            return None
        alive = found.heartbeat_at is not None and found.stopped_at is None and now - found.heartbeat_at < dead_after_s
        if alive:
            return None
        number = connection.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING, jobs.c.attempts == found.attempts)
            .values(attempts=jobs.c.attempts + 1, started_at=now, updated_at=now)
            .returning(jobs.c.attempts)
        ).scalar()
        if number is not None:
            self._close_open_attempts(connection, job_id, Outcome.ABANDONED, now)
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
