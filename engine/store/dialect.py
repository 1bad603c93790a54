"""What a store does differently on each database, declared once: `Dialect`.

A store picks its dialect once, from its URL, when it is made (as Oban's Engine behaviour
has Basic for PostgreSQL and Lite for SQLite): `engine.store.sqlite.SQLite` for the embedded
mode, `engine.store.postgres.PostgreSQL` for the distributed one. A dialect makes the store's
engines and runs the writes on the hot path: the job rows of sends and the starts and ends of
attempts, which the store's writer (`engine.writer.GroupCommit`) hands it a batch at a time.
The reads and the commands are SQLAlchemy Core that both databases run alike.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from sqlalchemy import Connection, Engine

from ..writer import Apply
from .locks import Locks
from .records import AttemptEnd, AttemptRecord, AttemptStart, EnqueueRecord, StartRequest


class Dialect(Protocol):
    """The writes of one kind of database.

    Each write takes a batch and an open transaction (`Apply`) and returns one result per
    record, in order. The writer may commit the writes in `one_statement` without a
    transaction around them, when a batch holds writes of that one kind.
    """

    #: The dialect's INSERT construct, whose ON CONFLICT clauses the store's upserts take.
    insert: Callable[[Any], Any]

    #: The writes that take one statement per batch (see `GroupCommit`'s ``one_statement``).
    one_statement: frozenset[Apply[Any, Any]]

    def create_engine(self, url: str) -> Engine:
        """The engine of the store's connections, each set up for the store."""
        ...

    def create_writer_engine(self, url: str, engine: Engine) -> Engine:
        """Where the writer thread and the locks get their connections: `engine` itself, or
        an engine whose sessions suit them."""
        ...

    def database_file(self, engine: Engine) -> Optional[str]:
        """The file that holds the database, None for a database server."""
        ...

    def lock_schema(self, connection: Connection) -> None:
        """Hold off other processes' upgrades until `connection`'s transaction ends."""
        ...

    def locks(self, writer_engine: Engine) -> Locks:
        """The named locks of `Store.hold_lock`."""
        ...

    def record_enqueues(self, connection: Connection, records: list[EnqueueRecord]) -> list[None]:
        """Create the job rows of messages being enqueued, or move existing ones.

        A message is enqueued again when a retry waits out its backoff, when a delayed message
        becomes due, and when a failed job is retried by hand: the row then moves to `scheduled`
        or `queued` if its current state allows it (`engine.job.REENQUEUE_TRANSITIONS`).

        Raises:
          DuplicateJob: another job holds the idempotency key of the batch's one row.
          IntegrityError: the same, in a batch of several (the writer then tries each alone).
        """
        ...

    def record_attempts(self, connection: Connection, records: list[AttemptRecord]) -> list[Optional[AttemptStart]]:
        """Starts and ends of attempts: how the store's writer commits those of all the worker
        threads of a process together. A start may come back undecided
        (`AttemptStart.undecided`), for `start_attempts` to decide.

        Returns:
          one `AttemptStart` per `StartRequest`, None per `AttemptEnd`, in order.
        """
        ...

    def start_attempts(self, connection: Connection, requests: list[StartRequest]) -> list[AttemptStart]:
        """Decide each start: run the job now, leave it to the live worker that runs it, or
        skip it (see `engine.store.attempts.AttemptWrites.start_attempts`)."""
        ...

    def finish_attempts(self, connection: Connection, ends: list[AttemptEnd]) -> list[None]:
        """Record how attempts ended and end their jobs (see
        `engine.store.attempts.AttemptWrites.finish_attempts`)."""
        ...
