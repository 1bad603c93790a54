"""The store's connections: the engine its dialect made, transactions that nest, and the
schema brought up to date."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

from sqlalchemy import Connection, text

from . import migrations
from .dialect import Dialect


class Database:
    """Connections to the store's database, on the engine `dialect` makes for `url`.

    Writes made inside `transaction` share one transaction, which is how the embedded broker
    writes a job row and its message atomically.
    """

    def __init__(self, url: str, dialect: Dialect) -> None:
        self.url = url
        #: The writes that differ on this kind of database (see `engine.store.dialect`).
        self.dialect = dialect
        self.engine = dialect.create_engine(url)
        self._current: ContextVar[Optional[Connection]] = ContextVar(f"store-{id(self)}", default=None)

    @property
    def database_file(self) -> Optional[str]:
        """The file that holds the database, which the processes using it share; None for a
        database server (or one in memory)."""
        return self.dialect.database_file(self.engine)

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
        at once (see `engine.store.sqlite`)."""
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
        """Create or migrate the schema; returns the version found (0 for a new database).
        Processes that start at once upgrade one after the other (`Dialect.lock_schema`)."""
        with self.transaction() as connection:
            self.dialect.lock_schema(connection)
            return migrations.upgrade(connection)

    def ping(self) -> None:
        """The readiness check (``GET /readyz``: "store reachable"): one round trip.

        Raises:
          sqlalchemy.exc.OperationalError: the database cannot be reached.
        """
        with self.reading() as connection:
            connection.execute(text("SELECT 1"))
