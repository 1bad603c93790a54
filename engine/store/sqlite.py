"""The store on SQLite: the embedded mode's database, one file that the processes of one host
share (with the embedded broker's messages).

Every connection runs in WAL mode with full syncs, and a transaction that writes takes the
write lock when it begins (``BEGIN IMMEDIATE``): writers then queue on the busy timeout
instead of failing. The writer's batches run one statement per kind of write
(`AttemptWrites`), under that lock.
"""

from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects import sqlite

from ..job import REENQUEUE_TRANSITIONS
from .attempts import AttemptWrites
from .locks import Locks, OneHost
from .records import AttemptEnd, AttemptRecord, AttemptStart, EnqueueRecord, StartRequest, duplicate_keys_named
from .schema import jobs
from .states import transition

# rowcount is not reliable for ON CONFLICT with every driver: RETURNING says which went in.
_INSERT_NEW_JOBS = sqlite.insert(jobs).on_conflict_do_nothing(index_elements=["id"]).returning(jobs.c.id)


class SQLite(AttemptWrites):
    """The `engine.store.dialect.Dialect` of SQLite, through the standard library's sqlite3."""

    insert = staticmethod(sqlite.insert)

    def __init__(self) -> None:
        super().__init__(sqlite.insert)
        self.one_statement: frozenset[Any] = frozenset()

    def create_engine(self, url: str) -> Engine:
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

    def create_writer_engine(self, url: str, engine: Engine) -> Engine:
        """`engine` itself, whose hooks take the write lock."""
        return engine

    def database_file(self, engine: Engine) -> Optional[str]:
        database = engine.url.database
        return database if database and database != ":memory:" else None

    def lock_schema(self, connection: Connection) -> None:
        """Nothing more: the transaction holds the write lock since it began."""

    def locks(self, writer_engine: Engine) -> Locks:
        return OneHost()

    def record_enqueues(self, connection: Connection, records: list[EnqueueRecord]) -> list[None]:
        """The new rows in one INSERT; each existing one moved by a compare-and-set."""
        rows = [{**record.row, "state": record.state} for record in records]
        with duplicate_keys_named(records):
            values = [{**row, "attempts": 0, "updated_at": row["created_at"]} for row in rows]
            inserted = set(connection.execute(_INSERT_NEW_JOBS, values).scalars())
        for record in records:
            if record.row["id"] not in inserted:
                transition(
                    connection,
                    record.row["id"],
                    record.state,
                    from_states=REENQUEUE_TRANSITIONS[record.state],
                    scheduled_for=record.row["scheduled_for"],
                )
        return [None] * len(records)

    def record_attempts(self, connection: Connection, records: list[AttemptRecord]) -> list[Optional[AttemptStart]]:
        """The starts, then the ends, one statement per kind (`start_attempts`, `finish_attempts`)."""
        starts = [record for record in records if isinstance(record, StartRequest)]
        ends = [record for record in records if isinstance(record, AttemptEnd)]
        started = iter(self.start_attempts(connection, starts))
        self.finish_attempts(connection, ends)
        return [next(started) if isinstance(record, StartRequest) else None for record in records]
