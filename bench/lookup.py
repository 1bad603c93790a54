"""Store lookups as the jobs table grows: ``Store.get(id)`` at 10,000 jobs and at 1,000,000.

    .venv/bin/python -m bench.lookup [--small 10000] [--large 1000000] [--lookups 2000]
        [--backends postgresql,sqlite]

(or ``python -m bench.throughput --lookup``, which runs it after the throughput table).

For each backend, two stores side by side: fresh PostgreSQL databases (created and dropped
here) or SQLite files (in a temporary directory), their schema made by `engine.store.Store.upgrade`
so that the real indexes are used, one holding `small` finished jobs and the other `large`,
inserted in bulk (``INSERT ... SELECT`` over generate_series, or a recursive CTE on SQLite), then
brought to the state autovacuum would leave them in (VACUUM ANALYZE; ANALYZE on SQLite). Then
the latency of `Store.get` (what ``engine.get`` calls) over `lookups` random ids of each store,
warm (one untimed pass over the ids first), the two stores measured alternately in `rounds`
rounds so that whatever else the machine does weighs on both alike. Target (issue 5): the
median at 1,000,000 jobs is at most 1.5 x the median at 10,000.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import text

from .services import log
from .variant import percentile

LOOKUP_RATIO = 1.5
BACKENDS = ("postgresql", "sqlite")
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
CHUNK = 200_000

_COLUMNS = "id, actor, queue, state, args, kwargs, options, priority, attempts, created_at, started_at, finished_at, updated_at, result"

#: A finished no-op job per row, ids shaped like Dramatiq's message ids (random UUIDs).
_INSERT = {
    "postgresql": f"""
        INSERT INTO jobs ({_COLUMNS})
        SELECT md5('bench-job-' || g)::uuid::text, 'noop', 'default', 'succeeded', '[]', '{{}}',
               '{{"max_retries": 3}}', 0, 1, :t0 + g * 0.001, :t0 + g * 0.001 + 0.002,
               :t0 + g * 0.001 + 0.003, :t0 + g * 0.001 + 0.003, 'null'
        FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS g
    """,
    "sqlite": f"""
        WITH RECURSIVE g(x) AS (SELECT :lo UNION ALL SELECT x + 1 FROM g WHERE x < :hi)
        INSERT INTO jobs ({_COLUMNS})
        SELECT lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-' || hex(randomblob(2)) || '-' ||
                     hex(randomblob(2)) || '-' || hex(randomblob(6))),
               'noop', 'default', 'succeeded', '[]', '{{}}', '{{"max_retries": 3}}', 0, 1,
               :t0 + x * 0.001, :t0 + x * 0.001 + 0.002, :t0 + x * 0.001 + 0.003, :t0 + x * 0.001 + 0.003, 'null'
        FROM g
    """,
}


def grow(store: Any, backend: str, lo: int, hi: int) -> float:
    """Insert job rows numbered lo..hi, in chunks; returns the seconds it took."""
    started = time.monotonic()
    t0 = time.time() - 86_400
    for start in range(lo, hi + 1, CHUNK):
        end = min(start + CHUNK - 1, hi)
        with store.transaction() as connection:
            connection.execute(text(_INSERT[backend]), {"lo": start, "hi": end, "t0": t0})
        if hi - lo >= CHUNK:
            log(f"lookup {backend}: {end:,} rows")
    # The state autovacuum brings a table to after a bulk of inserts: visibility map, hint
    # bits and planner statistics (PostgreSQL); planner statistics (SQLite).
    if backend == "postgresql":
        with store.engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE jobs")
    else:
        with store.transaction() as connection:
            connection.execute(text("ANALYZE jobs"))
    return time.monotonic() - started


def sample_ids(store: Any, k: int) -> list[str]:
    with store.reading() as connection:
        return list(connection.execute(text("SELECT id FROM jobs ORDER BY random() LIMIT :k"), {"k": k}).scalars())


def timed_gets(store: Any, ids: list[str]) -> list[float]:
    timings = []
    for job_id in ids:
        started = time.perf_counter()
        store.get(job_id)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def summary(timings: list[float]) -> dict[str, float]:
    timings = sorted(timings)
    return {
        "lookups": len(timings),
        "p50_ms": round(percentile(timings, 50), 4),
        "p99_ms": round(percentile(timings, 99), 4),
        "mean_ms": round(statistics.fmean(timings), 4),
    }


def run_backend(backend: str, urls: tuple[str, str], small: int, large: int, lookups: int, rounds: int) -> dict[str, Any]:
    """Two stores side by side, `small` and `large` jobs, measured alternately in `rounds`
    rounds so that the rest of the machine weighs on both alike."""
    from engine.store import Store

    stores = (Store(urls[0]), Store(urls[1]))
    try:
        for store, rows in zip(stores, (small, large)):
            store.upgrade()
            seconds = grow(store, backend, 1, rows)
            log(f"lookup {backend}: {rows:,} jobs inserted in {seconds:.1f} s")
        ids = [sample_ids(store, lookups) for store in stores]
        for store, some in zip(stores, ids):  # warm: the rows, the index pages, the pool, the statement cache
            timed_gets(store, some)
        timings: tuple[list[float], list[float]] = ([], [])
        per_round = max(1, lookups // rounds)
        for index in range(rounds):
            for store, some, collected in zip(stores, ids, timings):
                chunk = some[index * per_round : (index + 1) * per_round]
                random.shuffle(chunk)
                collected.extend(timed_gets(store, chunk))
    finally:
        for store in stores:
            store.close()
    at_small, at_large = summary(timings[0]), summary(timings[1])
    log(f"lookup {backend}: p50 {at_small['p50_ms']:.3f} ms at {small:,} jobs, {at_large['p50_ms']:.3f} ms at {large:,}")
    return {
        "backend": backend,
        "small_rows": small,
        "large_rows": large,
        "small": at_small,
        "large": at_large,
        "ratio_p50": round(at_large["p50_ms"] / at_small["p50_ms"], 3),
        "ratio_p99": round(at_large["p99_ms"] / at_small["p99_ms"], 3),
    }


def run_all(
    *,
    backends: tuple[str, ...] = BACKENDS,
    small: int = 10_000,
    large: int = 1_000_000,
    lookups: int = 2_000,
    rounds: int = 10,
    pg_admin_url: str = DEFAULT_PG_ADMIN,
) -> list[dict[str, Any]]:
    from .services import database

    results = []
    for backend in backends:
        tag = uuid.uuid4().hex[:8]
        if backend == "postgresql":
            with database(pg_admin_url, f"bench_lookup_{tag}_small") as small_url, database(
                pg_admin_url, f"bench_lookup_{tag}_large"
            ) as large_url:
                results.append(run_backend(backend, (small_url, large_url), small, large, lookups, rounds))
        else:
            directory = Path(tempfile.mkdtemp(prefix="engine-bench-lookup-"))
            try:
                urls = (f"sqlite:///{directory / 'small.db'}", f"sqlite:///{directory / 'large.db'}")
                results.append(run_backend(backend, urls, small, large, lookups, rounds))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    return results


def report(results: list[dict[str, Any]]) -> str:
    if not results:
        return ""
    lookups = results[0]["small"]["lookups"]
    lines = [
        f"store lookups: Store.get(id), what engine.get calls; {lookups:,} random ids per store, warm, "
        "the two stores measured alternately",
        f"{'backend':<11} {'jobs':>10} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for r in results:
        for rows, m in ((r["small_rows"], r["small"]), (r["large_rows"], r["large"])):
            lines.append(f"{r['backend']:<11} {rows:>10,} {m['p50_ms']:>8.3f} {m['p99_ms']:>8.3f}")
        met = "met" if r["ratio_p50"] <= LOOKUP_RATIO else "MISSED"
        lines.append(
            f"{'':<11} ratio {r['large_rows']:,} / {r['small_rows']:,}: p50 {r['ratio_p50']:.2f} x "
            f"(target <= {LOOKUP_RATIO}: {met}), p99 {r['ratio_p99']:.2f} x"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lookup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000, help="jobs in the first measurement (default 10000)")
    parser.add_argument("--large", type=int, default=1_000_000, help="jobs in the second (default 1000000)")
    parser.add_argument("--lookups", type=int, default=2_000, help="random lookups per measurement (default 2000)")
    parser.add_argument("--rounds", type=int, default=10, help="alternations between the two stores (default 10)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN, help=f"to create the database (default {DEFAULT_PG_ADMIN})")
    args = parser.parse_args(argv)
    backends = tuple(name.strip() for name in args.backends.split(",") if name.strip())
    if not backends or any(name not in BACKENDS for name in backends):
        parser.error(f"--backends: choose from {', '.join(BACKENDS)}")
    if not 0 < args.small < args.large:
        parser.error("--small must be positive and below --large")
    results = run_all(
        backends=backends,
        small=args.small,
        large=args.large,
        lookups=args.lookups,
        rounds=args.rounds,
        pg_admin_url=args.pg_admin_url,
    )
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
