"""The HTTP API as the jobs table grows: a job by id, and a page of failed jobs, at 10,000 jobs
and at 1,000,000 in PostgreSQL.

    .venv/bin/python -m bench.api [--small 10000] [--large 1000000] [--seconds 5] [--rounds 3]
        [--clients 8]

Two fresh PostgreSQL databases (created and dropped here), their schema made by
`engine.store.Store.upgrade` so that the real indexes are used, one holding `small` jobs and the
other `large` (a tenth of them failed), inserted with ``INSERT ... SELECT`` over
generate_series, then VACUUM ANALYZE. An ``engine api`` process serves each. The load comes from
`clients` threads of this process on loopback, each on a keep-alive connection, for `seconds`
per measurement: ``GET /api/jobs/{id}`` over random ids, and ``GET
/api/jobs?status=failed&limit=50`` following `next_cursor` through the pages (back to the first
after the 20th). The two sizes are measured alternately in `rounds` rounds, so that whatever
else the machine does weighs on both alike. Target (issue 19): at 1,000,000 jobs, the median
latency and the rate are within 1.5 x of those at 10,000.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from typing import Callable
from urllib.parse import quote

from sqlalchemy import text

from .lookup import DEFAULT_PG_ADMIN
from .services import database, log, vhost
from .variant import percentile

RATIO = 1.5
CHUNK = 200_000

_INSERT = """
    INSERT INTO jobs (id, actor, queue, state, args, kwargs, options, priority, attempts, created_at,
                      started_at, finished_at, updated_at, last_error)
    SELECT md5('bench-api-' || g)::uuid::text, CASE WHEN g % 3 = 0 THEN 'import_csv' ELSE 'noop' END, 'default',
           CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END, '[1, "a"]', '{}', '{"max_retries": 3}', 0, 1,
           :t0 + g * 0.001, :t0 + g * 0.001 + 0.002, :t0 + g * 0.001 + 0.003, :t0 + g * 0.001 + 0.003,
           CASE WHEN g % 10 = 0 THEN 'ValueError: row 12 is malformed' END
    FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS g
"""


def fill(url: str, count: int) -> None:
    from engine.store import Store

    store = Store(url.replace("postgresql://", "postgresql+psycopg://"))
    store.upgrade()
    t0 = time.time() - 86_400 * 30
    for start in range(1, count + 1, CHUNK):
        with store.transaction() as connection:
            connection.execute(text(_INSERT), {"lo": start, "hi": min(start + CHUNK - 1, count), "t0": t0})
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE jobs"))
    store.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_api(store_url: str, broker_url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "ENGINE_STORE_URL": store_url, "ENGINE_BROKER_URL": broker_url, "ENGINE_API_PORT": str(port),
           "ENGINE_LOG_LEVEL": "WARNING", "ENGINE_ACTOR_MODULES": ""}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "api"], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the API did not start")


def load(port: int, next_path: Callable[[dict], str], seconds: float, clients: int) -> list[float]:
    """Latencies (ms) of `clients` threads asking `next_path(state)` for `seconds`."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        state: dict = {}
        mine = []
        while time.monotonic() < stop:
            started = time.perf_counter()
            connection.request("GET", next_path(state))
            response = connection.getresponse()
            body = response.read()
            mine.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise RuntimeError(f"{response.status}: {body[:200]!r}")
            state["last"] = body
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def by_id(count: int) -> Callable[[dict], str]:
    import hashlib

    def next_path(state: dict) -> str:
        n = random.randint(1, count)
        return "/api/jobs/" + str(uuid.UUID(hashlib.md5(f"bench-api-{n}".encode()).hexdigest()))

    return next_path


def failed_pages(state: dict) -> str:
    cursor = None
    if "last" in state and state.get("pages", 0) < 20:
        cursor = json.loads(state["last"])["next_cursor"]
    state["pages"] = state.get("pages", 0) + 1 if cursor else 1
    return "/api/jobs?status=failed&limit=50" + (f"&cursor={quote(cursor)}" if cursor else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pg-admin", default=DEFAULT_PG_ADMIN)
    args = parser.parse_args()
    sizes = {"small": args.small, "large": args.large}
    tag = uuid.uuid4().hex[:6]
    with ExitStack() as stack:
        broker_url = f"amqp://guest:guest@127.0.0.1:5672/{stack.enter_context(vhost(f'bench-api-{tag}'))}"
        ports = {}
        for name, count in sizes.items():
            url = stack.enter_context(database(args.pg_admin, f"bench_api_{name}_{tag}"))
            log(f"inserting {count:,} jobs")
            started = time.monotonic()
            fill(url, count)
            log(f"{count:,} jobs in {time.monotonic() - started:.1f} s")
            process, ports[name] = start_api(url, broker_url)
            stack.callback(lambda p=process: (os.killpg(p.pid, signal.SIGTERM), p.wait(timeout=30)))
        endpoints = {"GET /api/jobs/{id}": lambda name: by_id(sizes[name]),
                     "GET /api/jobs?status=failed&limit=50": lambda name: failed_pages}  # fmt: skip
        results: dict[tuple[str, str], list[float]] = {}
        for endpoint, path_of in endpoints.items():
            for name in sizes:  # warm
                load(ports[name], path_of(name), 1.0, args.clients)
            for round_number in range(args.rounds):
                for name in sizes if round_number % 2 == 0 else reversed(list(sizes)):
                    results.setdefault((endpoint, name), []).extend(load(ports[name], path_of(name), args.seconds, args.clients))
        print(f"{'endpoint':40} {'jobs':>10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for endpoint in endpoints:
            rows = {}
            for name in sizes:
                latencies = sorted(results[(endpoint, name)])
                rate = len(latencies) / (args.seconds * args.rounds)
                rows[name] = (rate, percentile(latencies, 50), percentile(latencies, 99))
                print(f"{endpoint:40} {sizes[name]:>10,} {rate:>8.0f} {rows[name][1]:>8.2f} {rows[name][2]:>8.2f}")
            p50_ratio = rows["large"][1] / rows["small"][1]
            rate_ratio = rows["small"][0] / rows["large"][0]
            verdict = "ok" if max(p50_ratio, rate_ratio) <= RATIO else f"ABOVE {RATIO}"
            print(f"{'':40} ratio large/small: p50 {p50_ratio:.2f} x, rate {rate_ratio:.2f} x ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
