"""Enqueue from several processes at once, while the workers run: the embedded engine and huey.

    .venv/bin/python -m bench.senders --variant engine-sqlite|huey [--jobs 20000] [--senders 4]
        [--sender-threads 8] [--processes 2] [--threads 8] [--json results.json] [--keep]

Both keep their queue in one SQLite file, which one writer at a time may change: this measures
how each bears many writers at once. The variant's workers (P x T, as in `bench.throughput`) are
started on a fresh file in a temporary directory and waited for until every process consumes.
Then `--senders` processes of `--sender-threads` threads each send `--jobs` no-op jobs in all:
each process imports its actors and says it is ready, and all are told to go together.

Every error a send raises is counted by its message, never raised ("database is locked": SQLite's
busy timeout ran out before the sender got the write lock). Reported: the send rate (the jobs
sent without error, from the go to the last sender done), the rate until every job sent is
processed, the senders' errors, and the lines of the workers' log that say "database is locked".
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from engine.lifetime import dying_with_this_process

from .bodies import PROBE_DIR_VARIABLE
from .services import log
from .throughput import workdir
from .variant import POLL_S, REPO, STALL_S, Variant, Workers, missing_huey, queue_depth, sqlite_url, wait_until

EMBEDDED = ("engine-sqlite", "huey")

#: What marks a failed write to the SQLite file in the workers' log.
LOCKED = "database is locked"


# -- one sender process ----------------------------------------------------------------------------


def _shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts that differ by one at most."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def send(variant: Variant, jobs: int, threads: int) -> dict[str, Any]:
    """In a sender process: import the actors, say ``ready``, wait for ``go`` on stdin, then send
    `jobs` no-op jobs from `threads` threads; the jobs sent, the errors by message, the times."""
    actors = importlib.import_module(variant.actor_module)
    errors: Counter[str] = Counter()
    sent = [0] * threads
    lock = threading.Lock()

    def sender(index: int, count: int) -> None:
        for _ in range(count):
            try:
                actors.noop.send()
                sent[index] += 1
            except Exception as error:  # counted, whatever it is: the point is how many and which
                with lock:
                    errors[f"{type(error).__name__}: {error}"[:200]] += 1

    pool = [threading.Thread(target=sender, args=(i, count)) for i, count in enumerate(_shares(jobs, threads))]
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.time()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if variant.engine:
        import engine

        engine.flush()  # embedded, each send has committed already; this is for the record
    return {"sent": sum(sent), "errors": dict(errors), "started": started, "ended": time.time()}


# -- the run ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    variant = Variant(args.variant, args.processes, args.threads, directory, store_url=sqlite_url(args.variant, directory))
    env = variant.environment()
    workers = Workers(variant, env)
    senders: list[subprocess.Popen[str]] = []
    depth = None
    try:
        workers.start()
        depth = queue_depth(workers, workers.started_at)
        _wait_consuming(workers, depth)
        log(f"{variant.name}: workers consuming; starting {args.senders} senders x {args.sender_threads} threads")
        for count in _shares(args.jobs, args.senders):
            senders.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.senders", "--variant", variant.name, "--sender", str(count),
                     "--sender-threads", str(args.sender_threads), "--processes", str(args.processes),
                     "--threads", str(args.threads)],
                    env=env, cwd=REPO, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    preexec_fn=dying_with_this_process(),
                )  # fmt: skip
            )
        for process in senders:
            if process.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError(f"a sender exited before it was ready (code {process.wait()})")
        for process in senders:
            process.stdin.write("go\n")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
        reports = []
        for process in senders:
            output, _ = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"a sender failed (code {process.returncode})")
            reports.append(json.loads(output.strip().splitlines()[-1]))
        go = min(report["started"] for report in reports)
        sent = sum(report["sent"] for report in reports)
        sent_s = max(report["ended"] for report in reports) - go
        errors: Counter[str] = Counter()
        for report in reports:
            errors.update(report["errors"])
        wait_until(lambda: depth.sample().remaining == 0, STALL_S * 2, "every job sent to be taken", interval=POLL_S)
        wait_until(depth.all_acked, STALL_S, "every job sent to be processed", interval=POLL_S)
        processed_s = time.time() - go
    finally:
        if depth is not None:
            depth.close()
        for process in senders:
            if process.poll() is None:
                process.kill()
                process.wait()
        workers.stop()
    log_text = workers.log_path.read_text(errors="replace")
    return {
        "variant": variant.name,
        "jobs": args.jobs,
        "senders": args.senders,
        "sender_threads": args.sender_threads,
        "processes": args.processes,
        "threads": args.threads,
        "sent": sent,
        "send_rate": sent / sent_s,
        "send_seconds": sent_s,
        "processed_rate": sent / processed_s,
        "processed_seconds": processed_s,
        "errors": dict(errors),
        "workers_locked_lines": sum(LOCKED in line for line in log_text.splitlines()),
    }


def _wait_consuming(workers: Workers, depth: Any) -> None:
    """Wait until every worker process consumes. Before the workers have made their tables,
    sampling fails: that is only not yet."""

    def consuming() -> bool:
        workers.check()
        try:
            return (depth.sample().consumers or 0) >= workers.variant.processes
        except sqlite3.OperationalError:
            return False

    wait_until(consuming, 120, "every worker process to consume", interval=POLL_S)


def report(r: dict[str, Any]) -> str:
    """The result of `run`, for a person."""
    lines = [
        f"{r['variant']}: {r['senders']} sender processes x {r['sender_threads']} threads, {r['jobs']:,} no-op jobs "
        f"in all; workers {r['processes']} processes x {r['threads']} threads",
        f"  sent {r['sent']:,} in {r['send_seconds']:.2f} s: {r['send_rate']:,.0f} jobs/s; "
        f"all processed {r['processed_seconds']:.2f} s after the go: {r['processed_rate']:,.0f} jobs/s",
        f"  send errors: {sum(r['errors'].values()):,}",
    ]
    lines += [f"    {count:,} x {message}" for message, count in sorted(r["errors"].items(), key=lambda item: -item[1])]
    lines.append(f"  workers' log: {r['workers_locked_lines']:,} lines with {LOCKED!r}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.senders", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=EMBEDDED, required=True)
    parser.add_argument("--jobs", "-n", type=int, default=20_000, help="jobs in all (default 20000)")
    parser.add_argument("--senders", type=int, default=4, help="sender processes (default 4)")
    parser.add_argument("--sender-threads", type=int, default=8, help="threads per sender process (default 8)")
    parser.add_argument("--processes", "-p", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", "-t", type=int, default=8, help="threads per worker process (default 8)")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--keep", action="store_true", help="keep the directory (the workers' log)")
    parser.add_argument("--sender", type=int, metavar="JOBS", help=argparse.SUPPRESS)  # one sender process
    args = parser.parse_args(argv)
    if args.variant == "huey" and (why := missing_huey()):
        parser.error(why)
    if args.sender is not None:
        # The parent's environment: its variant's, the probe directory in the variant's directory.
        variant = Variant(args.variant, args.processes, args.threads, Path(os.environ[PROBE_DIR_VARIABLE]).parent)
        print(json.dumps(send(variant, args.sender, args.sender_threads)), flush=True)
        return 0
    with workdir(args.keep) as directory:
        result = run(args, directory)
    print(report(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
