"""Cron at scale: 1,000 schedules on two schedulers, PostgreSQL and RabbitMQ.

Each schedule fires every `--period` seconds (10 by default), staggered by its number
(``S/10 * * * * *``, S = number % 10), so that 1000 / period fire times come due every second;
``--period 1``: all 1,000 every second, due together. Two ``engine scheduler`` processes share them
(each tries every fire time; the ledger gives each to one), and one ``engine worker`` with
`--worker-processes` processes (2; 0 for none, to measure the schedulers alone) runs the no-op
jobs. After a warm-up, for `--seconds`, it reports:

- lateness from fire time to the job's row (its ``created_at``, written in the claim's
  transaction just before its commit) and to the job's start, p50 / p99 / max;
- the two schedulers' CPU per fire (user + system, both processes, over the fires of the
  window) and their RSS at the end.

Run: ``python -m bench.schedules [--seconds 60]`` (needs the services of README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid

import psutil

from engine.lifetime import dying_with_this_process

from bench.services import database, log, vhost

PG_ADMIN_URL = os.environ.get("ENGINE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SCHEDULES = 1000


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="length of the measured window")
    parser.add_argument("--period", type=int, default=10, choices=[1, 10, 20, 30, 60], help="seconds between a schedule's fires")
    parser.add_argument("--warmup", type=float, default=15, help="seconds before the window")
    parser.add_argument("--worker-processes", type=int, default=2, help="processes of the worker (0: no worker)")
    args = parser.parse_args()
    name = f"bench_schedules_{uuid.uuid4().hex[:8]}"
    with vhost(name) as virtual_host, database(PG_ADMIN_URL, name) as store_url:
        env = {
            "ENGINE_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{virtual_host}",
            "ENGINE_STORE_URL": store_url,
            "ENGINE_ACTOR_MODULES": "bench.actors_engine",
            "ENGINE_RETENTION_DAYS": "0",
            "ENGINE_LOG_LEVEL": "WARNING",
        }
        os.environ.update(env)
        import engine
        import engine.actors  # noqa: F401  (declares the bench's actors here, to check them)

        period = args.period
        log(f"defining {SCHEDULES} schedules, every {period} s, staggered")
        for number in range(SCHEDULES):
            second = number % period
            engine.set_schedule(f"bench-{number:04d}", "noop", f"{second} * * * * *" if period == 60 else f"{second}/{period} * * * * *")

        def start(*command: str) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "engine.cli", *command], env={**os.environ, **env},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=dying_with_this_process(),
            )  # fmt: skip

        workers = [start("worker", "--processes", str(args.worker_processes))] if args.worker_processes else []
        schedulers = [start("scheduler"), start("scheduler")]
        try:
            log(f"warming up for {args.warmup:.0f} s")
            time.sleep(args.warmup)
            measured = [psutil.Process(each.pid) for each in schedulers]
            cpu_before = [sum(each.cpu_times()[:2]) for each in measured]
            window_start = time.time()
            log(f"measuring for {args.seconds:.0f} s")
            time.sleep(args.seconds)
            window_end = time.time()
            cpu_s = sum(sum(each.cpu_times()[:2]) - before for each, before in zip(measured, cpu_before))
            rss_mb = [each.memory_info().rss / 2**20 for each in measured]
            time.sleep(5)  # the window's last jobs start
        finally:
            for process in [*schedulers, *workers]:
                process.terminate()
            for process in [*schedulers, *workers]:
                process.wait(timeout=60)

        store = engine.get_store()
        from sqlalchemy import select

        from engine.store.schema import jobs

        query = select(jobs.c.fire_time, jobs.c.created_at, jobs.c.started_at).where(
            jobs.c.schedule.is_not(None), jobs.c.fire_time >= window_start, jobs.c.fire_time < window_end
        )
        with store.reading() as connection:
            rows = connection.execute(query).all()
        expected = int(window_end - window_start) * SCHEDULES // period
        to_row = [row.created_at - row.fire_time for row in rows]
        to_start = [row.started_at - row.fire_time for row in rows if row.started_at is not None]
        print(f"fires in the window: {len(rows)} (about {expected} due), {len(rows) / args.seconds:.0f} per second")
        for label, values in (("fire -> job row", to_row), ("fire -> job start", to_start)):
            if not values:
                continue
            print(
                f"{label}: p50 {1000 * statistics.median(values):.0f} ms, p99 {1000 * _percentile(values, 0.99):.0f} ms,"
                f" max {1000 * max(values):.0f} ms ({len(values)} jobs)"
            )
        print(f"schedulers' CPU per fire: {1000 * cpu_s / max(len(rows), 1):.2f} ms (both processes, user + system)")
        print(f"schedulers' RSS: {', '.join(f'{each:.0f} MB' for each in rss_mb)}")
        engine.get_broker().close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
