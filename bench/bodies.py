"""The job bodies every side of the throughput benchmark runs, byte for byte the same.

`bench.actors_bare` declares them on a plain Dramatiq RabbitMQ broker, `bench.actors_engine`
with `engine.actor`, `bench.actors_huey` as huey tasks; only the queue and its machinery differ.
"""

from __future__ import annotations

import os
import time

#: Where `probe` records its start times: one file per worker process, in this directory.
PROBE_DIR_VARIABLE = "BENCH_PROBE_DIR"

#: Where `bench.actors_huey` finds its SQLite file, and its queue's name there (the ``queue``
#: column of huey's ``task`` table). Here, not in `bench.variant`: huey's consumers import
#: nothing of the benchmark but their actors and these bodies.
HUEY_DB_VARIABLE = "BENCH_HUEY_DB"
HUEY_QUEUE = "bench"


def noop() -> None:
    """Nothing: the job measures the machinery around it."""


def io_1ms() -> None:
    """1 ms of blocking I/O (a sleep releases the GIL, as a socket read would)."""
    time.sleep(0.001)


def probe(key: str) -> None:
    """Record when this job started, for the sender to compute enqueue-to-start latency.

    One line ``key,start`` appended to a file of this worker process: a tiny O_APPEND write, the
    same on both sides, taken after the start time is read.
    """
    started = time.time()
    path = os.path.join(os.environ[PROBE_DIR_VARIABLE], f"{os.getpid()}.log")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{key},{started!r}\n".encode())
    finally:
        os.close(fd)
