"""`Store`, the face of the job store: its reads and commands, and the writes of Tracking and
the brokers, named for what they record, which the store's writer commits in batches."""

from __future__ import annotations

import time
from typing import Any, Optional

from sqlalchemy.engine import make_url

from ..errors import ConfigError, JobNotFound
from ..job import Outcome
from ..writer import GroupCommit, Pending
from .commands import Commands
from .dialect import Dialect
from .postgres import PostgreSQL
from .reads import latest_attempt, run_of
from .records import AttemptEnd, AttemptStart, EnqueueRecord, StartRequest
from .sqlite import SQLite

#: The dialect of each database a store runs on, by the backend its URL names.
_DIALECTS: dict[str, type[Dialect]] = {"sqlite": SQLite, "postgresql": PostgreSQL}


class Store(Commands):
    """Jobs and attempts in a SQL database.

    Every state change is a compare-and-set on the states `engine.job.TRANSITIONS` allows
    before it (`engine.store.states`). Writes made inside `transaction()` share one transaction.
    The writes of a worker's jobs go through the store's writer (`writer`), which commits
    those of a process's threads together.

    Parameters:
      url(str): a SQLAlchemy URL: ``sqlite:///engine.db`` or ``postgresql+psycopg://...``.

    Raises:
      ConfigError: the URL names a database other than SQLite or PostgreSQL.
    """

    def __init__(self, url: str) -> None:
        backend = make_url(url).get_backend_name()
        if backend not in _DIALECTS:
            raise ConfigError(f"ENGINE_STORE_URL: the store runs on SQLite or PostgreSQL, not {backend!r}")
        super().__init__(url, _DIALECTS[backend]())
        self._writer_engine = self.dialect.create_writer_engine(url, self.engine)
        self._locks = self.dialect.locks(self._writer_engine)
        #: Commits the writes of this process's worker threads together (see `engine.writer`):
        #: flush it to wait for them, close it on shutdown.
        self.writer = GroupCommit(
            lambda: self._writer_engine.connect().execution_options(write=True),
            one_statement=self.dialect.one_statement,
        )

    def hold_lock(self, name: str) -> bool:
        """Whether this process holds the store-wide lock `name`, taken now if it was free, so
        that one process at a time does what it guards. The lock is held on a connection of its
        own until `close`; a process that dies frees it with its connection. On SQLite, which
        one host uses, always True."""
        return self._locks.hold(name)

    def close(self) -> None:
        self._locks.close()
        self.writer.close()
        self._writer_engine.dispose()
        self.engine.dispose()

    # -- the writer's operations: committed with the next batch ---------------------------------

    def enqueue_later(self, row: dict[str, Any], *, delayed: bool, wait_out_outage: bool = False) -> Pending[None]:
        """Hand the job row of a message being enqueued to the writer, to be committed with the
        rows of the process's other sends (see `record_enqueue`). Returns at once.

        Parameters:
          row: the job's columns (`EnqueueRecord.row`).
          delayed(bool): the message is due later: the job is `scheduled`, not `queued`.
          wait_out_outage(bool): retry while the database is unreachable (for a sender that
            does not wait for the row), instead of failing with the outage's error.

        Returns:
          Pending: done once the row is committed; its error is `DuplicateJob` when another
          job holds the row's idempotency key.
        """
        return self.writer.submit(
            self.dialect.record_enqueues, EnqueueRecord(row, delayed), wait_out_outage=wait_out_outage
        )

    def start(self, request: StartRequest, *, next_writes: int = 0) -> AttemptStart:
        """Record a delivered job's start with the writer's next batch, and return what was
        decided: run it now (with its attempt's number), leave it to the live worker that runs
        it, or skip it. Waits out a database outage.

        Parameters:
          next_writes(int): how many writes the caller will hand in soon after this start is
            committed (a worker thread: its job's end, and its next job's start). The batch
            after this one waits for them, briefly (see `engine.writer`).
        """
        start = self.writer.write(self.dialect.record_attempts, request, next_writes=next_writes)
        if start.undecided:  # not queued, or ended in the same batch: decided on its own
            start = self.writer.write(self.dialect.start_attempts, request)
        return start

    def end(self, end: AttemptEnd) -> Pending[None]:
        """Hand how an attempt ended to the writer, to be recorded with the next batch (and the
        job ended, when `end.state` says how). Returns at once; done once committed. Waits out
        a database outage."""
        return self.writer.submit(self.dialect.record_attempts, end)

    # -- writes in the caller's transaction, or one of their own --------------------------------

    def record_enqueue(self, row: dict[str, Any], *, delayed: bool) -> None:
        """Create the job row of a message being enqueued, or move an existing one, in the
        current transaction or a new one (see `Dialect.record_enqueues`).

        Raises:
          DuplicateJob: another job holds the row's idempotency key.
        """
        with self.transaction() as connection:
            self.dialect.record_enqueues(connection, [EnqueueRecord(row, delayed)])

    def start_attempt(
        self, job_id: str, *, host: str, pid: int, worker_id: Optional[str], dead_after_s: float
    ) -> AttemptStart:
        """Move the job to `running` with its attempt's worker, in one transaction (see
        `Dialect.start_attempts`)."""
        request = StartRequest(job_id, host, pid, worker_id, dead_after_s, time.time())
        with self.transaction() as connection:
            [start] = self.dialect.start_attempts(connection, [request])
        return start

    def finish_attempt(self, job_id: str, number: int, outcome: Outcome, **fields: Any) -> None:
        """Record how attempt `number`, the job's latest, ended and, when a `state` is given,
        end the job there, in a transaction of its own (see `Dialect.finish_attempts`; `fields`
        as `AttemptEnd.of`, without `run`: it is read from the store).

        Raises:
          JobNotFound
        """
        with self.transaction() as connection:
            found = latest_attempt(connection, job_id)
            if found is None:
                raise JobNotFound(job_id)
            end = AttemptEnd.of(job_id, number, outcome, run=run_of(found), **fields)
            self.dialect.finish_attempts(connection, [end])
