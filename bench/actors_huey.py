"""huey 3.x on SQLite: the reference side for the embedded engine.

``huey_consumer bench.actors_huey.huey -w T -k thread -q``, once per worker process, every one on
the SQLite file named by ``BENCH_HUEY_DB`` (huey's consumer runs one process of threads; several
consumers share one SqliteHuey file, as huey's own ``-k process`` does, since a task is taken by
deleting its row in an exclusive transaction). A `huey.SqliteHuey` with huey's defaults (WAL,
5 s busy timeout) and the same job bodies as `bench.actors_bare` and `bench.actors_engine`.
Needs huey, an optional dependency: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from huey import SqliteHuey

from . import bodies
from .bodies import HUEY_DB_VARIABLE, HUEY_QUEUE

huey = SqliteHuey(HUEY_QUEUE, filename=os.environ[HUEY_DB_VARIABLE])


class Sendable:
    """A huey task sent as a Dramatiq actor is, ``task.send(*args)``: calling a huey task enqueues it."""

    def __init__(self, body: Callable[..., None]) -> None:
        self.task = huey.task()(body)

    def send(self, *args: Any) -> None:
        self.task(*args)


noop = Sendable(bodies.noop)
io_1ms = Sendable(bodies.io_1ms)
probe = Sendable(bodies.probe)
