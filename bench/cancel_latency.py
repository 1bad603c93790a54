"""Cancel latency: from `engine.cancel` on a running job to the end of its attempt.

    .venv/bin/python -m bench.cancel_latency [--cancels 64] [--processes 2] [--threads 4]
        [--mode distributed|embedded] [--json results.json]

Starts ``engine worker -p P -t T`` with the jobs of `bench.actors_cancel`, fills every worker
thread with a running job (half of them tight pure-Python loops that only a thread interrupt
stops, half cooperative loops with progress and `engine.cancel_requested` checks), cancels them
one by one from this process in a random order, and repeats until `--cancels` jobs have been
canceled. The latency of one cancel is its attempt's ``finished_at`` (written by the worker, on
this host) minus the time just before the `engine.cancel` call: the request in the store, its
push to every worker, the interrupt, and Tracking recording the attempt as `canceled`.

Distributed (the default): RabbitMQ at ``$ENGINE_BENCH_AMQP_URL`` (amqp://guest:guest@127.0.0.1:5672)
in a fresh vhost made with ``rabbitmqctl add_vhost``, and a fresh PostgreSQL database made
through ``$ENGINE_BENCH_PG_ADMIN_URL`` (postgresql://postgres@127.0.0.1:5432/postgres). Embedded:
a SQLite file in a temporary directory. Everything is removed afterwards, even on failure.
Worker settings are the defaults, so a cancel whose push was lost would still land within
``ENGINE_CANCEL_CHECK_INTERVAL_S`` (1 s). Target (issue 4): p95 <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from engine.lifetime import dying_with_this_process

from .services import database, log, vhost

REPO = Path(__file__).resolve().parent.parent
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672"
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_P95_S = 1.0

#: How long a job would run if nobody canceled it.
JOB_SECONDS = 120.0


@contextmanager
def workers(env: dict[str, str], processes: int, threads: int, log_path: Path) -> Iterator[None]:
    """``engine worker`` in a session of its own, stopped (then killed, group and all) after;
    it dies with this process, should this one be killed."""
    with open(log_path, "ab") as output:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "worker", "-p", str(processes), "-t", str(threads)],
            env=env,
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=dying_with_this_process(),
        )
    try:
        yield
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(supervisor.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        supervisor.wait()


# -- the measurement ------------------------------------------------------------------------------


def measure(cancels: int, capacity: int) -> list[dict[str, object]]:
    """Cancel `cancels` running jobs, `capacity` at a time; one record per cancel."""
    import engine
    from engine import CancelOutcome, JobState

    records: list[dict[str, object]] = []
    kinds = ["tight_loop", "cooperative"]
    while len(records) < cancels:
        batch = [engine.submit(kinds[i % 2], JOB_SECONDS) for i in range(min(capacity, cancels - len(records)))]
        _wait(lambda: all(engine.get(job.id).state == JobState.RUNNING for job in batch), 120, "the jobs to run")
        time.sleep(0.2)  # every job well inside its loop
        random.shuffle(batch)
        for job in batch:
            requested_at = time.time()
            answer = engine.cancel(job.id)
            returned_at = time.time()
            if answer.outcome != CancelOutcome.REQUESTED:
                raise RuntimeError(f"job {job.id} was {answer.job.state}, not running, when canceled")
            _wait(lambda: engine.get(job.id).state.finished, 30, f"job {job.id} to stop")
            [attempt] = engine.attempts(job.id)
            if attempt.outcome != "canceled":
                raise RuntimeError(f"job {job.id} ended {attempt.outcome}, not canceled")
            records.append(
                {
                    "job": job.id,
                    "kind": job.actor,
                    "latency_s": attempt.finished_at - requested_at,
                    "call_s": returned_at - requested_at,
                    "worker_pid": attempt.worker_pid,
                }
            )
        log(f"{len(records)} of {cancels} canceled")
    return records


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def summary(records: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    def figures(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
        return {"n": len(ordered), "median_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * p95, "max_ms": 1000 * ordered[-1]}

    groups: dict[str, list[float]] = {"all": [float(r["latency_s"]) for r in records]}
    for record in records:
        groups.setdefault(str(record["kind"]), []).append(float(record["latency_s"]))
    result = {name: figures(values) for name, values in groups.items()}
    result["engine.cancel call"] = figures([float(r["call_s"]) for r in records])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cancel_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--cancels", type=int, default=64, help="running jobs to cancel (default 64)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--mode", choices=["distributed", "embedded"], default="distributed")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)

    tag = f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        directory = Path(tempfile.mkdtemp(prefix="engine-bench-cancel-"))
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        env = {name: value for name, value in os.environ.items() if not name.startswith("ENGINE_")}
        env.update(ENGINE_ACTOR_MODULES="bench.actors_cancel", ENGINE_SHUTDOWN_TIMEOUT_S="5", PYTHONPATH=str(REPO))
        if args.mode == "distributed":
            amqp = os.environ.get("ENGINE_BENCH_AMQP_URL", DEFAULT_AMQP).rstrip("/")
            env["ENGINE_BROKER_URL"] = f"{amqp}/{stack.enter_context(vhost(f'bench-cancel-{tag}'))}"
            admin = os.environ.get("ENGINE_BENCH_PG_ADMIN_URL", DEFAULT_PG_ADMIN)
            env["ENGINE_STORE_URL"] = stack.enter_context(database(admin, f"bench_cancel_{tag.replace('-', '_')}"))
        else:
            env["ENGINE_STORE_URL"] = f"sqlite:///{directory / 'engine.db'}"
        # This process is the one that cancels: it talks to the same store and broker.
        for name in [name for name in os.environ if name.startswith("ENGINE_")]:
            del os.environ[name]
        os.environ.update(env)
        import engine
        import bench.actors_cancel  # noqa: F401  (declares the actors on this process's broker)

        log(f"{args.mode}: engine worker -p {args.processes} -t {args.threads}, log in {directory / 'workers.log'}")
        stack.enter_context(workers(env, args.processes, args.threads, directory / "workers.log"))
        records = measure(args.cancels, args.processes * args.threads)
        stack.callback(engine.get_store().close)

    figures = summary(records)
    print(f"cancel latency, {args.mode}, {args.processes} processes x {args.threads} threads, {len(records)} cancels")
    print(f"{'':<20}{'n':>5}{'median ms':>12}{'p95 ms':>10}{'max ms':>10}")
    for name, row in figures.items():
        print(f"{name:<20}{row['n']:>5}{row['median_ms']:>12.1f}{row['p95_ms']:>10.1f}{row['max_ms']:>10.1f}")
    met = figures["all"]["p95_ms"] <= TARGET_P95_S * 1000
    print(f"target p95 <= {TARGET_P95_S * 1000:.0f} ms: {'met' if met else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"summary": figures, "cancels": records}, indent=2))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
