"""The job store: jobs and their attempts, on SQLite or PostgreSQL through SQLAlchemy Core.

`Store` is its face. Behind it, one module per concern:

- `engine.store.database`: connections and transactions; `engine.store.schema` and
  `engine.store.migrations`: the tables and how an older database is brought up to date.
- `engine.store.records`: what the writes take (a send's job row, an attempt's start and end).
- `engine.store.dialect`: what differs between databases, one implementation of each chosen
  when the store is made: `engine.store.sqlite` and `engine.store.postgres`, which share the
  statement-by-statement writes of `engine.store.attempts`.
- `engine.store.reads`, `engine.store.commands`, `engine.store.locks`: what the store answers,
  what it is told to do, and the locks that let one process at a time do a task.
"""

from .reads import decode_cursor, encode_cursor
from .records import AttemptEnd, AttemptRecord, AttemptRun, AttemptStart, EnqueueRecord, StartRequest
from .store import Store

__all__ = [
    "AttemptEnd",
    "AttemptRecord",
    "AttemptRun",
    "AttemptStart",
    "EnqueueRecord",
    "StartRequest",
    "Store",
    "decode_cursor",
    "encode_cursor",
]
