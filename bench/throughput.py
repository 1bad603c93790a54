"""Throughput, latency and memory: the engine with full tracking against bare Dramatiq and huey, in one run.

    .venv/bin/python -m bench.throughput [--messages 20000] [--processes 2] [--threads 8]
        [--variants bare,engine-pg,engine-sqlite] [--rounds 1] [--lookup] [--json results.json]

For each variant, on the same RabbitMQ and with the same worker configuration (P processes x T
threads): the enqueue rate through ``actor.send()``, the processing rate of no-op jobs and of
1 ms I/O jobs, the enqueue-to-start latency (p50, p99) on an idle system, and the RSS of each
worker process after N and after 2N jobs. Then a table, the ratios engine / bare with the
targets of issue 5 marked met or missed, and engine / huey. See bench/README.md for what each
figure means.

With ``--rounds R``, the variants run R times, interleaved (every variant once per round), and
the table shows each rate and latency as its median over the rounds, so that a slow spell of
a shared machine during one variant's turn does not decide a ratio; the ratio of each round is
listed too.

Variants:
  bare           ``dramatiq bench.actors_bare -p P -t T``: Dramatiq's own RabbitMQ broker and
                 default middleware.
  bare-pinned    the same, each worker process pinned to one CPU and put under SCHED_BATCH from
                 outside, as the engine's are (``ENGINE_PIN_CPUS=auto``, ``ENGINE_SCHED_BATCH``):
                 the like-for-like baseline.
  engine-pg      ``engine worker -p P -t T``: RabbitMQ broker, PostgreSQL store, full tracking.
  engine-sqlite  ``engine worker -p P -t T``, embedded: SQLite store and SQLite broker, no RabbitMQ.
  huey           P x ``huey_consumer bench.actors_huey.huey -w T -k thread -q``: huey's SqliteHuey
                 on one SQLite file, no RabbitMQ (huey is optional: ``pip install -e '.[bench]'``).

Each variant runs in a process of its own (`bench.variant`) with a fresh RabbitMQ vhost, a fresh
PostgreSQL database or SQLite file in a temporary directory, all removed afterwards, even when
something fails. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from typing import Any, Iterator, Optional

import psutil

from engine.lifetime import dying_with_this_process

from .services import database, log, vhost
from .variant import BASELINES, RABBITMQ_VARIANTS, REPO, VARIANTS, missing_huey, sqlite_url

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672"
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

# Targets of issue 5.
PROCESSING_RATIO, PROCESSING_STRETCH = 0.5, 0.7
ENQUEUE_RATIO = 0.5
LATENCY_P50_MS, LATENCY_P99_MS = 10.0, 50.0
RSS_MAX_MB, RSS_GROWTH = 80.0, 0.10


# -- resources ------------------------------------------------------------------------------------


@contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


# -- running a variant ---------------------------------------------------------------------------


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    tag = f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        directory = stack.enter_context(workdir(args.keep))
        command = [
            sys.executable, "-m", "bench.variant", "--variant", name,
            "--messages", str(args.messages), "--processes", str(args.processes), "--threads", str(args.threads),
            "--workdir", str(directory), "--probes", str(args.probes),
            "--probe-interval-ms", str(args.probe_interval_ms), "--out", str(directory / "results.json"),
        ]  # fmt: skip
        if name in RABBITMQ_VARIANTS:
            host = stack.enter_context(vhost(f"bench-{name}-{tag}"))
            command += ["--amqp-url", f"{args.amqp_url}/{host}", "--vhost", host]
        if name == "engine-pg":
            command += ["--store-url", stack.enter_context(database(args.pg_admin_url, f"bench_{tag.replace('-', '_')}"))]
        if name in ("engine-sqlite", "huey"):
            command += ["--store-url", sqlite_url(name, directory)]
        log(f"{name}: running in {directory}")
        # A session of its own: its workers share its process group, which is killed whatever
        # happens here; and it dies with this process, should this one be killed.
        driver = subprocess.Popen(
            command,
            cwd=REPO,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            preexec_fn=dying_with_this_process(),
        )
        try:
            code = driver.wait()
        finally:
            _kill_group(driver)
        if code != 0:
            tail = _tail(directory / "workers.log")
            raise RuntimeError(f"variant {name} failed (exit {code}); last lines of its workers' log:\n{tail}")
        return json.loads((directory / "results.json").read_text())
    raise AssertionError("unreachable")


def _kill_group(driver: subprocess.Popen[bytes]) -> None:
    """Kill the driver's process group: the driver, its workers and theirs."""
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    driver.wait()
    # Wait for the members to be gone, so that no worker holds the vhost or database we drop next.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        members = [p for p in psutil.process_iter(["pid"]) if _pgid(p.info["pid"]) == driver.pid]
        if not members:
            return
        time.sleep(0.1)


def _pgid(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- report ----------------------------------------------------------------------------------------


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _max(values: dict[str, float]) -> float:
    return max(values.values()) if values else float("nan")


def _growth(result: dict[str, Any]) -> float:
    """Growth of the largest worker RSS from N to 2N jobs (the same processes)."""
    after_n, after_2n = result["rss_mb_after_n"], result["rss_mb_after_2n"]
    common = [pid for pid in after_n if pid in after_2n]
    if not common:
        return float("nan")
    return max(after_2n[pid] / after_n[pid] - 1 for pid in common)


def _count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def table(results: dict[str, dict[str, Any]], n: int) -> str:
    headers = (
        "variant", "enqueue/s", "no-op jobs/s", "1ms-I/O jobs/s", "p50 ms", "p99 ms",
        f"RSS MB @{_count(n)}", f"RSS MB @{_count(2 * n)}", "RSS growth",
    )  # fmt: skip
    rows = [headers]
    for name, r in results.items():
        rows.append(
            (
                name,
                f"{r['enqueue_rate']:,.0f}",
                f"{r['noop']['rate']:,.0f}",
                f"{r['io_1ms']['rate']:,.0f}",
                f"{r['latency_ms']['p50']:.1f}",
                f"{r['latency_ms']['p99']:.1f}",
                f"{_max(r['rss_mb_after_n']):.1f}",
                f"{_max(r['rss_mb_after_2n']):.1f}",
                f"{_growth(r) * 100:+.1f}%",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def ratios(results: dict[str, dict[str, Any]], n: int) -> str:
    lines = []
    bare, pinned, huey = results.get("bare"), results.get("bare-pinned"), results.get("huey")
    for name, r in results.items():
        if name in BASELINES:
            continue
        lines.append(f"{name} / bare:" if bare is not None else f"{name}:")
        if bare is not None:
            for label, key in (("no-op processing", "noop"), ("1 ms I/O processing", "io_1ms")):
                ratio = r[key]["rate"] / bare[key]["rate"]
                stretch = f", stretch {PROCESSING_STRETCH}: {_mark(ratio >= PROCESSING_STRETCH)}"
                lines.append(f"  {label:<22} {ratio:5.2f} x   target >= {PROCESSING_RATIO}: {_mark(ratio >= PROCESSING_RATIO)}{stretch}")
            ratio = r["enqueue_rate"] / bare["enqueue_rate"]
            lines.append(f"  {'enqueue (actor.send)':<22} {ratio:5.2f} x   target >= {ENQUEUE_RATIO}: {_mark(ratio >= ENQUEUE_RATIO)}")
        else:
            lines.append("  (no bare run: the targets need --variants to include bare)")
        if pinned is not None:
            noop, io = (r[key]["rate"] / pinned[key]["rate"] for key in ("noop", "io_1ms"))
            lines.append(f"  {'against bare-pinned':<22} no-op {noop:.2f} x, 1 ms I/O {io:.2f} x (both pinned)")
        if huey is not None:
            noop, io = (r[key]["rate"] / huey[key]["rate"] for key in ("noop", "io_1ms"))
            enqueue = r["enqueue_rate"] / huey["enqueue_rate"]
            lines.append(f"  {'against huey':<22} no-op {noop:.2f} x, 1 ms I/O {io:.2f} x, enqueue {enqueue:.2f} x")
        p50, p99 = r["latency_ms"]["p50"], r["latency_ms"]["p99"]
        lines.append(
            f"  {'latency':<22} p50 {p50:.1f} ms (<= {LATENCY_P50_MS:.0f}: {_mark(p50 <= LATENCY_P50_MS)}), "
            f"p99 {p99:.1f} ms (<= {LATENCY_P99_MS:.0f}: {_mark(p99 <= LATENCY_P99_MS)})"
        )
        rss, growth = _max(r["rss_mb_after_n"]), _growth(r)
        lines.append(
            f"  {'worker RSS':<22} {rss:.1f} MB after {n:,} jobs (<= {RSS_MAX_MB:.0f}: {_mark(rss <= RSS_MAX_MB)}), "
            f"{growth * 100:+.1f}% after {2 * n:,} (within {RSS_GROWTH * 100:.0f}%: {_mark(abs(growth) <= RSS_GROWTH)})"
        )
    return "\n".join(lines)


#: The figures of a result that `median_result` takes the median of, as (key, sub-key) paths.
MEDIAN_FIGURES = (("enqueue_rate", None), ("noop", "rate"), ("io_1ms", "rate"), ("latency_ms", "p50"), ("latency_ms", "p99"))


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's result over several rounds: the round with the median no-op rate (for the
    details and memory), with each of `MEDIAN_FIGURES` replaced by its median over the rounds."""
    by_rate = sorted(runs, key=lambda run: run["noop"]["rate"])
    result = json.loads(json.dumps(by_rate[(len(by_rate) - 1) // 2]))
    for key, sub in MEDIAN_FIGURES:
        value = statistics.median(run[key] if sub is None else run[key][sub] for run in runs)
        if sub is None:
            result[key] = value
        else:
            result[key][sub] = value
    return result


def ratios_by_round(rounds: dict[str, list[dict[str, Any]]]) -> str:
    """The processing ratios of each round, engine / each baseline, to show their spread."""
    lines = []
    for name, runs in rounds.items():
        if name in BASELINES:
            continue
        for base in BASELINES:
            if base not in rounds:
                continue
            cells = [
                f"{run['noop']['rate'] / other['noop']['rate']:.2f} / {run['io_1ms']['rate'] / other['io_1ms']['rate']:.2f}"
                for run, other in zip(runs, rounds[base])
            ]
            lines.append(f"{name} / {base}, each round (no-op / 1 ms I/O): {', '.join(cells)}")
    return "\n".join(lines)


def details(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, r in results.items():
        noop, io = r["noop"], r["io_1ms"]
        lines.append(
            f"{name}: enqueue until all queued {r['enqueue_until_queued_rate']:,.0f}/s; "
            f"send while processing {r['enqueue_while_processing_rate']:,.0f}/s; "
            f"one send on an idle system {r['send_ms_p50']:.2f} ms (p50); "
            f"latency max {r['latency_ms']['max']:.1f} ms over {r['latency_probes']} probes"
        )
        for label, d in (("no-op", noop), ("1ms-I/O", io)):
            lines.append(
                f"  {label}: {d['measured_jobs']:,} jobs in {d['seconds']:.2f} s; first message taken "
                f"{d['first_drop_after_start_s']:.2f} s after the start command, every process consuming "
                f"{d['all_consuming_after_drop_s']:.2f} s later"
                + ("; end confirmed late by rabbitmqctl" if d["end_confirmed_late"] else "")
            )
            cpu = d["cpu"]
            parts = [f"workers {cpu['workers_ms_per_job']:.2f} ms"]
            if name == "engine-pg":
                parts.append(f"PostgreSQL {cpu['postgres_ms_per_job']:.2f} ms")
            if name in RABBITMQ_VARIANTS:
                parts.append(f"RabbitMQ node {cpu['rabbitmq_ms_per_job']:.2f} ms")
            lines.append(
                f"    CPU per job: {', '.join(parts)}; machine busy {cpu['machine_busy_cores']:.2f} of "
                f"{os.cpu_count()} cores, of which workers {cpu['workers_cores']:.2f}"
            )
        rss_n = ", ".join(f"{mb:.1f}" for mb in r["rss_mb_after_n"].values())
        rss_2n = ", ".join(f"{mb:.1f}" for mb in r["rss_mb_after_2n"].values())
        lines.append(f"  RSS per worker process (MB): [{rss_n}] after N, [{rss_2n}] after 2N")
        if r.get("store_succeeded") is not None:
            lines.append(f"  store: {r['store_succeeded']:,} jobs succeeded")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"Linux {platform.release()}, Python {platform.python_version()}; load average before the run: {load}"
    )


# -- main ------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", "-n", type=int, default=20_000, help="jobs per measurement (default 20000)")
    parser.add_argument("--processes", "-p", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", "-t", type=int, default=8, help="threads per worker process (default 8)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--probes", type=int, default=300, help="latency probes (default 300)")
    parser.add_argument("--probe-interval-ms", type=float, default=20.0, help="between probes (default 20)")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP, help=f"RabbitMQ, without vhost (default {DEFAULT_AMQP})")
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN, help=f"to create databases (default {DEFAULT_PG_ADMIN})")
    parser.add_argument("--rounds", type=int, default=1, help="run the variants this many times, interleaved; report medians (default 1)")
    parser.add_argument("--lookup", action="store_true", help="also run bench.lookup (store lookups at 10k and 1M jobs)")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep each variant's directory (worker logs)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.messages < 100:
        parser.error("--messages must be at least 100")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if "huey" in names and (why := missing_huey()):
        parser.error(why)

    # SIGTERM unwinds like Ctrl-C, so that workers, vhosts and databases are cleaned up.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
    about = machine()
    log(f"machine: {about}")
    started = time.monotonic()
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for number in range(args.rounds):
        if args.rounds > 1:
            log(f"round {number + 1} of {args.rounds}")
        for name in names:
            rounds[name].append(run_variant(name, args))
    results = {name: median_result(runs) for name, runs in rounds.items()}

    print(f"\nmachine: {about}")
    print(
        f"workers: {args.processes} processes x {args.threads} threads; {args.messages:,} jobs per measurement; "
        f"{args.probes} latency probes {args.probe_interval_ms:g} ms apart; total {time.monotonic() - started:.0f} s\n"
    )
    print(table(results, args.messages))
    print()
    print(ratios(results, args.messages))
    if args.rounds > 1:
        print()
        print(ratios_by_round(rounds))
    print()
    print(details(results), flush=True)
    if args.json:
        record = {"machine": about, "args": {**vars(args), "json": str(args.json)}, "results": results, "rounds": rounds}
        args.json.write_text(json.dumps(record, indent=2, default=str))
    if args.lookup:
        from . import lookup

        lookups = lookup.run_all(pg_admin_url=args.pg_admin_url)
        print()
        print(lookup.report(lookups))
        if args.json:
            record["lookup"] = lookups
            args.json.write_text(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
