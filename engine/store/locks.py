"""Named locks across the processes of one store: one process at a time does what a lock
guards (looking for jobs whose message was never sent, say), and another takes over when
it dies."""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError


class Locks(Protocol):
    """The locks a process holds, by name."""

    def hold(self, name: str) -> bool:
        """Whether this process holds the lock `name`, taken now if it was free."""
        ...

    def close(self) -> None:
        """Release every lock held."""
        ...


class SessionLocks:
    """PostgreSQL's advisory locks, each held by a session of its own (a connection of
    `engine`), so that a process that dies frees its locks with its connections."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._held: dict[str, Connection] = {}  # each lock on its connection

    def hold(self, name: str) -> bool:
        held = self._held.get(name)
        if held is not None:
            try:
                held.exec_driver_sql("SELECT 1")
                held.rollback()
                return True
            except DBAPIError:  # the connection broke, and the lock went with it
                del self._held[name]
                held.invalidate()
                held.close()
        connection = self.engine.connect()
        try:
            taken = connection.execute(text("SELECT pg_try_advisory_lock(hashtext(:name))"), {"name": name}).scalar()
            connection.rollback()  # the lock is the session's: no transaction is left open
        except BaseException:
            connection.close()
            raise
        if taken:
            self._held[name] = connection
        else:
            connection.close()
        return bool(taken)

    def close(self) -> None:
        for connection in self._held.values():
            connection.close()
        self._held.clear()


class OneHost:
    """The locks of a store on one host (an SQLite file): every process holds every lock."""

    def hold(self, name: str) -> bool:
        return True

    def close(self) -> None:
        pass
