"""One side of the throughput benchmark, measured in a process of its own.

``python -m bench.throughput`` runs this module once per variant, in a fresh interpreter, with
the variant's RabbitMQ vhost, database and temporary directory already created (and removes
them afterwards). A process per variant keeps the sides apart: the engine's settings and its
global broker are built once per process, and the bare side never imports the engine.

Phases, in order (workers are real processes started from the commands users run):

1. enqueue: N ``noop.send()`` on one thread, workers not running: the enqueue rate.
2. no-op processing: start the workers on those N queued messages; the rate from the moment the
   queue starts draining, with every worker process consuming, to the moment all are done.
   RSS of each worker process afterwards (after N jobs).
3. latency: the system idle, probes sent one at a time; each records its start in a file.
4. N more no-op jobs sent to the same, still running, workers; RSS again (after 2N jobs).
5. 1 ms I/O processing: workers stopped, N ``io_1ms`` messages queued, workers started again,
   measured as in 2.

Completion is watched from outside the workers, at the same rate for both sides, without
touching the path being measured: a passive ``queue_declare`` on one AMQP connection (the
ready count, and the number of consumers, to know when every worker process consumes), then
``rabbitmqctl`` once the queue shows empty, to check nothing is left unacknowledged. On the
embedded broker, a count of the rows of the ``messages`` table (ready, and not yet acked). For
huey, a count of the rows of its ``task`` table in its SQLite file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import psutil

from engine.lifetime import dying_with_this_process

from .bodies import HUEY_DB_VARIABLE, HUEY_QUEUE, PROBE_DIR_VARIABLE
from .services import log

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUEUE = "default"

#: Sampling period of the queue while it drains (20 Hz), and while waiting for the first
#: message to go (200 Hz: the workers are booting, nothing is being measured yet).
POLL_S = 0.05
FAST_POLL_S = 0.005

#: A drain that makes no progress for this long has failed.
STALL_S = 90.0

VARIANTS = ("bare", "bare-pinned", "engine-pg", "engine-sqlite", "huey")

#: The variants the engine is compared with, never measured against each other.
BASELINES = ("bare", "bare-pinned", "huey")

#: The variants that need a RabbitMQ vhost.
RABBITMQ_VARIANTS = ("bare", "bare-pinned", "engine-pg")

#: How long after its start a pinned variant's new threads are looked for and pinned.
PIN_WATCH_S = 5.0


# -- the variant --------------------------------------------------------------------------------


@dataclass
class Variant:
    """What differs between the sides: the worker command, its environment, the actors module."""

    name: str
    processes: int
    threads: int
    workdir: Path
    amqp_url: Optional[str] = None
    vhost: Optional[str] = None
    store_url: Optional[str] = None

    @property
    def engine(self) -> bool:
        return self.name.startswith("engine")

    @property
    def pinned_from_outside(self) -> bool:
        """Bare Dramatiq pinned and scheduled as the engine's workers are (`ENGINE_PIN_CPUS`,
        `ENGINE_SCHED_BATCH`), for a like-for-like comparison: Dramatiq itself does neither."""
        return self.name == "bare-pinned"

    @property
    def huey(self) -> bool:
        return self.name == "huey"

    @property
    def supervised(self) -> bool:
        """One supervisor that forks the worker processes (Dramatiq, the engine), or one
        command per worker process (``huey_consumer``, which runs one process of threads)."""
        return not self.huey

    @property
    def stop_signal(self) -> signal.Signals:
        """The signal that stops the workers gracefully: huey's is SIGINT (SIGTERM interrupts
        running tasks), Dramatiq's and the engine's SIGTERM."""
        return signal.SIGINT if self.huey else signal.SIGTERM

    @property
    def actor_module(self) -> str:
        if self.huey:
            return "bench.actors_huey"
        return "bench.actors_engine" if self.engine else "bench.actors_bare"

    @property
    def probe_dir(self) -> Path:
        return self.workdir / "probes"

    @property
    def sqlite_path(self) -> Optional[Path]:
        """The embedded engine's SQLite file, or huey's."""
        if self.store_url and self.store_url.startswith("sqlite:///") and not self.amqp_url:
            return Path(self.store_url[len("sqlite:///") :])
        return None

    def environment(self) -> dict[str, str]:
        """The environment of this process and of the workers: nothing inherited that could
        configure either side (ENGINE_*, dramatiq_*), the variant's URLs, the probe directory."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("ENGINE_", "BENCH_", "dramatiq_", "DRAMATIQ_"))
        }
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env[PROBE_DIR_VARIABLE] = str(self.probe_dir)
        if self.engine:
            env["ENGINE_STORE_URL"] = self.store_url or ""
            env["ENGINE_ACTOR_MODULES"] = self.actor_module
            env["ENGINE_SHUTDOWN_TIMEOUT_S"] = "30"  # only how long a stop may take; nothing runs then
            if self.amqp_url:
                env["ENGINE_BROKER_URL"] = self.amqp_url
        elif self.huey:
            env[HUEY_DB_VARIABLE] = str(self.sqlite_path)
        else:
            env["BENCH_AMQP_URL"] = self.amqp_url or ""
        return env

    def worker_commands(self) -> list[list[str]]:
        """The commands that start the workers: one supervisor, or one per worker process."""
        p, t = str(self.processes), str(self.threads)
        if self.engine:
            return [[str(BIN / "engine"), "worker", "-p", p, "-t", t]]
        if self.huey:
            # -q: huey logs two lines per task at its default level, Dramatiq and the engine
            # none per job; polling (-d, -m, -b) keeps huey's defaults.
            consumer = [str(BIN / "huey_consumer"), f"{self.actor_module}.huey", "-w", t, "-k", "thread", "-q"]
            return [consumer] * self.processes
        return [[str(BIN / "dramatiq"), self.actor_module, "--processes", p, "--threads", t]]


def sqlite_url(name: str, directory: Path) -> str:
    """The SQLite file of an embedded variant in its directory: the engine's store and broker, or huey's."""
    return f"sqlite:///{directory / ('huey.db' if name == 'huey' else 'engine.db')}"


def missing_huey() -> Optional[str]:
    """Why the huey variant cannot run here, if it cannot: huey is an optional dependency."""
    try:
        import huey  # noqa: F401
    except ImportError:
        return "the huey variant needs huey (>= 2.5): pip install -e '.[bench]'"
    return None


# -- worker processes ---------------------------------------------------------------------------


class Workers:
    """The worker tree: ``dramatiq ...`` or ``engine worker ...`` and the processes it starts,
    or the ``huey_consumer`` processes, one per worker process."""

    def __init__(self, variant: Variant, env: dict[str, str]) -> None:
        self.variant = variant
        self.env = env
        self.log_path = variant.workdir / "workers.log"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.started_at = 0.0  # time.time() of the start

    def start(self) -> None:
        commands = self.variant.worker_commands()
        command = commands[0]
        shown = " ".join(Path(command[0]).name if i == 0 else c for i, c in enumerate(command))
        log(f"{self.variant.name}: starting {shown}" + (f" (x {len(commands)})" if len(commands) > 1 else ""))
        with open(self.log_path, "ab") as out:
            out.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(command)} (x {len(commands)})\n".encode())
            out.flush()
            self.started_at = time.time()
            # Same process group as this driver: the orchestrator kills the whole group on error.
            # Bound to this driver too, for when the driver alone is killed.
            for command in commands:
                self.processes.append(
                    subprocess.Popen(
                        command,
                        env=self.env,
                        cwd=REPO,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        preexec_fn=dying_with_this_process(),
                    )
                )
        if self.variant.pinned_from_outside:
            threading.Thread(target=self._pin_while_booting, daemon=True).start()

    def _pin_while_booting(self) -> None:
        """Pin worker process i, every thread of it, to CPU i (round-robin), as the engine's
        supervisor does, and put it under SCHED_BATCH, as the engine's BatchScheduling does;
        threads started later inherit both from those set."""
        cpus = sorted(os.sched_getaffinity(0))
        deadline = time.monotonic() + PIN_WATCH_S
        while time.monotonic() < deadline:
            for index, child in enumerate(sorted(self.children(), key=lambda child: child.pid)):
                for thread in _threads(child):
                    with suppress(OSError):
                        os.sched_setaffinity(thread, {cpus[index % len(cpus)]})
                        os.sched_setscheduler(thread, os.SCHED_BATCH, os.sched_param(0))
            time.sleep(0.005)

    def check(self) -> None:
        """Raise if the supervisor, or a worker process started on its own, has exited."""
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"the workers exited with code {process.returncode}:\\n{self.log_tail()}")

    def children(self) -> list[psutil.Process]:
        """The worker processes: direct children of the supervisor, not the supervisor; or the
        processes started, when each is a worker process."""
        found = []
        for process in self.processes:
            try:
                found += psutil.Process(process.pid).children() if self.variant.supervised else [psutil.Process(process.pid)]
            except psutil.NoSuchProcess:
                pass
        return found

    def rss_mb(self) -> dict[int, float]:
        rss = {}
        for child in self.children():
            try:
                rss[child.pid] = child.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                pass
        return rss

    def stop(self, timeout: float = 60.0) -> None:
        """Signal the supervisor (it stops its workers), or each worker process, to stop
        gracefully, then kill whatever is left."""
        tree = self.children()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(self.variant.stop_signal)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{self.variant.name}: workers did not stop within {timeout:.0f} s; killing them")
                break
        self.kill(tree)

    def kill(self, tree: Optional[list[psutil.Process]] = None) -> None:
        tree = (tree or []) + self.children()
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for child in tree:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        for process in self.processes:
            process.wait()
        psutil.wait_procs(tree, timeout=10)
        self.processes = []

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# -- watching the queue -------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # time.monotonic()
    ready: int  # messages waiting for a consumer
    unfinished: Optional[int]  # messages not yet acknowledged (ready + held), when known cheaply
    consumers: Optional[int]  # worker processes consuming, when known

    @property
    def remaining(self) -> int:
        return self.unfinished if self.unfinished is not None else self.ready


class RabbitDepth:
    """The ready count and consumer count of a queue, by passive declares on one connection,
    and ``rabbitmqctl`` for the unacknowledged ones (slow: only once the queue shows empty)."""

    def __init__(self, url: str, vhost: str) -> None:
        import pika

        self.vhost = vhost
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()

    def sample(self) -> Sample:
        ok = self.channel.queue_declare(queue=QUEUE, passive=True)
        return Sample(time.monotonic(), ok.method.message_count, None, ok.method.consumer_count)

    def all_acked(self) -> bool:
        """Nothing ready nor unacknowledged in any queue of the vhost, per ``rabbitmqctl``."""
        output = subprocess.run(
            ["rabbitmqctl", "list_queues", "-p", self.vhost, "name", "messages", "--quiet", "--no-table-headers"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        counts = {}
        for line in output.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
        if QUEUE not in counts:
            raise RuntimeError(f"rabbitmqctl did not list queue {QUEUE!r}: {output!r}")
        return counts[QUEUE] == 0

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:
            pass


class SQLiteDepth:
    """The embedded broker's queue, counted in its SQLite file: ready rows (due, not leased),
    unfinished rows (not acked: acking deletes the row), and worker processes registered by the
    engine's heartbeat since the workers were started."""

    def __init__(self, path: Path, workers_started_at: float = 0.0) -> None:
        self.connection = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        self.workers_started_at = workers_started_at

    def sample(self) -> Sample:
        now = time.time()
        total, ready = self.connection.execute(
            "SELECT count(*), coalesce(sum(eta <= ? AND (leased_until IS NULL OR leased_until < ?)), 0) "
            "FROM messages WHERE queue = ? AND dead_at IS NULL",
            (now, now, QUEUE),
        ).fetchone()
        consumers = self.connection.execute(
            "SELECT count(*) FROM workers WHERE stopped_at IS NULL AND heartbeat_at >= ?", (self.workers_started_at,)
        ).fetchone()[0]
        return Sample(time.monotonic(), ready, total, consumers)

    def all_acked(self) -> bool:
        return self.sample().unfinished == 0

    def close(self) -> None:
        self.connection.close()


class HueyDepth:
    """huey's queue, counted in its SQLite file: the rows of its ``task`` table. huey has no
    acknowledgement: a worker thread deletes the row as it takes the task, so the count is of
    tasks not yet taken, and an empty table leaves at most one running task per worker thread.
    Worker processes consuming: those whose worker threads have all started (huey registers
    its consumers nowhere), seen from outside as main + scheduler + threads."""

    def __init__(self, path: Path, workers: Workers) -> None:
        self.connection = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        self.workers = workers

    def sample(self) -> Sample:
        (ready,) = self.connection.execute("SELECT count(*) FROM task WHERE queue = ?", (HUEY_QUEUE,)).fetchone()
        want = self.workers.variant.threads + 2
        consumers = sum(1 for process in self.workers.children() if len(_threads(process)) >= want)
        return Sample(time.monotonic(), ready, ready, consumers)

    def all_acked(self) -> bool:
        return self.sample().ready == 0

    def close(self) -> None:
        self.connection.close()


def queue_depth(workers: Workers, workers_started_at: float = 0.0) -> Any:
    """The watcher of the variant's queue (`Sample`s, ``all_acked``, ``close``); the
    processes consuming are counted among those started since `workers_started_at`."""
    variant = workers.variant
    if variant.huey:
        assert variant.sqlite_path is not None
        return HueyDepth(variant.sqlite_path, workers)
    if variant.sqlite_path is not None:
        return SQLiteDepth(variant.sqlite_path, workers_started_at)
    assert variant.amqp_url and variant.vhost
    return RabbitDepth(variant.amqp_url, variant.vhost)


class CpuMeter:
    """CPU time (user + system) spent while the queue drains, by who spent it: the worker
    processes, this variant's PostgreSQL backends (their title names the database), the
    RabbitMQ node (shared: it includes other users of it), and the whole machine, to tell how
    busy the machine was with other work."""

    def __init__(self, workers: "Workers", pg_database: Optional[str], rabbitmq: bool) -> None:
        self.workers = workers
        self.pg_database = pg_database
        self.rabbitmq = rabbitmq

    def snapshot(self) -> dict[str, float]:
        cpu = {"workers": 0.0, "postgres": 0.0, "rabbitmq": 0.0}
        for child in self.workers.children():
            cpu["workers"] += _cpu(child)
        for process in psutil.process_iter(["name", "cmdline"]):
            name, cmdline = process.info["name"] or "", " ".join(process.info["cmdline"] or [])
            if self.pg_database and name.startswith("postgres") and f" {self.pg_database} " in cmdline:
                cpu["postgres"] += _cpu(process)
            elif self.rabbitmq and name == "beam.smp" and "rabbit boot" in cmdline:
                cpu["rabbitmq"] += _cpu(process)
        times = psutil.cpu_times()
        cpu["machine"] = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        cpu["wall"] = time.monotonic()
        return cpu

    @staticmethod
    def per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, float]:
        """Milliseconds of CPU per job for each party, and how many cores the machine kept busy."""
        wall = max(after["wall"] - before["wall"], 1e-9)
        report = {f"{key}_ms_per_job": round((after[key] - before[key]) * 1000 / jobs, 3)
                  for key in ("workers", "postgres", "rabbitmq")}  # fmt: skip
        report["machine_busy_cores"] = round((after["machine"] - before["machine"]) / wall, 2)
        report["workers_cores"] = round((after["workers"] - before["workers"]) / wall, 2)
        return report


def _threads(process: psutil.Process) -> list[int]:
    try:
        return [thread.id for thread in process.threads()]
    except psutil.NoSuchProcess:
        return []


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
        return times.user + times.system
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0


@dataclass
class Drain:
    """How N queued messages were worked off."""

    jobs: int
    rate: float  # jobs per second, all worker processes consuming
    seconds: float
    first_drop_after_start_s: float  # worker boot: from the start command to the first message taken
    all_consuming_after_drop_s: float  # from the first message taken to every process consuming
    measured_jobs: int  # jobs the rate is computed over (all but those done before every process consumed)
    end_confirmed_late: bool  # rabbitmqctl still saw unacked messages when the queue showed empty
    samples: int
    cpu: dict[str, float]  # see CpuMeter.per_job: from the first message taken to the queue empty


def watch_drain(
    depth: Any, n: int, processes: int, workers: Workers, meter: CpuMeter, *, boot_timeout: float = 120.0
) -> Drain:
    """Watch `n` queued messages drain; see `Drain`.

    Timing starts at the later of: the first drop of the ready count (located within 5 ms by
    fast polling while the workers boot), and the first sample showing every worker process
    consuming; it then counts the messages still ready. It ends when the queue is empty,
    interpolated between the last two samples at the measured rate, and is confirmed (ready +
    unacked = 0) after the fact.
    """
    started = time.monotonic()
    previous = depth.sample()
    if previous.ready < n:
        raise RuntimeError(f"expected {n} ready messages before the workers start, found {previous.ready}")
    # Booting: nothing is processed yet, so polling fast costs the measurement nothing.
    while True:
        workers.check()
        if time.monotonic() - started > boot_timeout:
            raise RuntimeError(f"no message taken within {boot_timeout:.0f} s of starting the workers:\n{workers.log_tail()}")
        time.sleep(FAST_POLL_S)
        current = depth.sample()
        if current.ready < n:
            break
        previous = current
    first_drop = (previous.t + current.t) / 2
    cpu_before = meter.snapshot()
    samples = [current]
    # Draining: 20 Hz.
    tick = current.t
    last_progress = (current.remaining, current.t)
    while samples[-1].remaining > 0:
        tick += POLL_S
        time.sleep(max(0.0, tick - time.monotonic()))
        sample = depth.sample()
        samples.append(sample)
        if sample.remaining != last_progress[0]:
            last_progress = (sample.remaining, sample.t)
        elif sample.t - last_progress[1] > STALL_S:
            workers.check()
            raise RuntimeError(f"no progress for {STALL_S:.0f} s at {sample.remaining} messages left:\n{workers.log_tail()}")
    cpu_after = meter.snapshot()
    # Start: every process consuming (when the broker tells), not before the first drop.
    t_start, at_start = first_drop, n
    if samples[0].consumers is not None and samples[0].consumers < processes:
        gate = next((s for s in samples if s.consumers is not None and s.consumers >= processes), None)
        if gate is not None and gate.remaining > 0:
            t_start, at_start = gate.t, gate.remaining
        else:
            log("warning: not every worker process was consuming before the queue emptied; timing from the first drop")
    # End: between the last non-empty sample and the first empty one, at the rate seen so far.
    empty = samples[-1]
    t_end = empty.t
    if len(samples) >= 2:
        last = samples[-2]
        if last.t > t_start and at_start > last.remaining:
            rate_so_far = (at_start - last.remaining) / (last.t - t_start)
            t_end = min(empty.t, last.t + last.remaining / rate_so_far)
    # Confirm: nothing unacknowledged either (the ready count does not see messages held by workers).
    late = False
    if not depth.all_acked():
        late = True
        deadline = time.monotonic() + STALL_S
        while not depth.all_acked():
            if time.monotonic() > deadline:
                raise RuntimeError(f"messages still unacknowledged {STALL_S:.0f} s after the queue emptied")
            time.sleep(POLL_S)
        t_end = time.monotonic()
    seconds = max(t_end - t_start, 1e-9)
    return Drain(
        jobs=n,
        rate=at_start / seconds,
        seconds=seconds,
        first_drop_after_start_s=first_drop - started,
        all_consuming_after_drop_s=max(0.0, t_start - first_drop),
        measured_jobs=at_start,
        end_confirmed_late=late,
        samples=len(samples),
        cpu=CpuMeter.per_job(cpu_before, cpu_after, n),
    )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Results:
    variant: str
    messages: int
    processes: int
    threads: int
    enqueue_rate: float = 0.0  # actor.send() per second, one thread, workers down
    enqueue_until_queued_rate: float = 0.0  # N / time until all N were counted in the queue
    send_ms_p50: float = 0.0  # one actor.send() of a probe, on an idle system
    noop: Optional[dict[str, Any]] = None
    io_1ms: Optional[dict[str, Any]] = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_probes: int = 0
    rss_mb_after_n: dict[str, float] = field(default_factory=dict)
    rss_mb_after_2n: dict[str, float] = field(default_factory=dict)
    enqueue_while_processing_rate: float = 0.0
    store_succeeded: Optional[int] = None
    phase_seconds: dict[str, float] = field(default_factory=dict)


class Run:
    def __init__(self, variant: Variant, messages: int, probes: int, probe_interval_ms: float) -> None:
        self.variant = variant
        self.n = messages
        self.probes = probes
        self.probe_interval = probe_interval_ms / 1000
        self.results = Results(variant.name, messages, variant.processes, variant.threads)
        self.env = variant.environment()
        os.environ.clear()
        os.environ.update(self.env)  # before the actors module reads the settings
        variant.probe_dir.mkdir(parents=True, exist_ok=True)
        import importlib

        self.actors = importlib.import_module(variant.actor_module)
        self.workers = Workers(variant, self.env)

    @property
    def pg_database(self) -> Optional[str]:
        url = self.variant.store_url or ""
        return url.rsplit("/", 1)[-1].split("?")[0] if url.startswith("postgres") else None

    def depth(self, workers_started_at: float = 0.0) -> Any:
        return queue_depth(self.workers, workers_started_at)

    def phase(self, name: str, started: float) -> None:
        self.results.phase_seconds[name] = round(time.monotonic() - started, 2)

    def run(self) -> Results:
        try:
            self._run()
        finally:
            self.workers.kill()
        return self.results

    def _run(self) -> None:
        r, name = self.results, self.variant.name
        # 1. Enqueue, workers down.
        t = time.monotonic()
        r.enqueue_rate, r.enqueue_until_queued_rate = self.enqueue(self.actors.noop, self.n)
        log(f"{name}: enqueue {r.enqueue_rate:,.0f}/s ({r.enqueue_until_queued_rate:,.0f}/s until all were queued)")
        self.phase("enqueue", t)
        # 2. No-op processing from a full queue.
        t = time.monotonic()
        r.noop = asdict(self.process_queued())
        log(f"{name}: no-op {r.noop['rate']:,.0f} jobs/s over {r.noop['seconds']:.2f} s")
        time.sleep(1.0)  # let the last acks and any post-job writes settle before reading memory
        r.rss_mb_after_n = {str(pid): round(mb, 1) for pid, mb in self.workers.rss_mb().items()}
        log(f"{name}: RSS after {self.n:,} jobs: {r.rss_mb_after_n}")
        self.phase("noop", t)
        # 3. Latency on an idle system.
        t = time.monotonic()
        time.sleep(1.0)
        r.latency_ms, r.latency_probes, r.send_ms_p50 = self.latency()
        log(f"{name}: latency p50 {r.latency_ms['p50']:.2f} ms, p99 {r.latency_ms['p99']:.2f} ms")
        self.phase("latency", t)
        # 4. N more no-op jobs on the same workers, for memory growth with uptime.
        t = time.monotonic()
        r.enqueue_while_processing_rate = self.enqueue_into_running(self.actors.noop, self.n)
        time.sleep(1.0)
        r.rss_mb_after_2n = {str(pid): round(mb, 1) for pid, mb in self.workers.rss_mb().items()}
        log(f"{name}: RSS after {2 * self.n:,} jobs: {r.rss_mb_after_2n}")
        self.phase("noop-2", t)
        self.workers.stop()
        # 5. 1 ms I/O processing from a full queue.
        t = time.monotonic()
        self.enqueue(self.actors.io_1ms, self.n)
        r.io_1ms = asdict(self.process_queued())
        log(f"{name}: 1 ms I/O {r.io_1ms['rate']:,.0f} jobs/s over {r.io_1ms['seconds']:.2f} s")
        self.workers.stop()
        self.phase("io_1ms", t)
        if self.variant.engine:
            from engine.job import JobState
            from engine.store import Store

            store = Store(self.env["ENGINE_STORE_URL"])
            try:
                r.store_succeeded = store.count_by_state()[JobState.SUCCEEDED]
            finally:
                store.close()
            expected = 3 * self.n + r.latency_probes
            if r.store_succeeded != expected:
                log(f"{name}: WARNING: the store has {r.store_succeeded} succeeded jobs, expected {expected}")

    def enqueue(self, actor: Any, n: int) -> tuple[float, float]:
        """`n` sends on this thread; the rate of the loop (for the engine, until the last job is
        recorded and confirmed: ``engine.flush``), and of the loop plus the wait until the
        broker counts them all (bare Dramatiq publishes without confirms)."""
        depth = self.depth()
        try:
            before = depth.sample().ready if self._queue_exists(depth) else 0
            started = time.perf_counter()
            for _ in range(n):
                actor.send()
            self.flush()
            sent = time.perf_counter()
            wait_until(lambda: depth.sample().ready >= before + n, 120, f"{n} messages in the queue", interval=0.01)
            queued = time.perf_counter()
        finally:
            depth.close()
        return n / (sent - started), n / (queued - started)

    def _queue_exists(self, depth: Any) -> bool:
        try:
            depth.sample()
            return True
        except Exception:
            # RabbitMQ closes the channel after a failed passive declare: use a fresh one.
            if isinstance(depth, RabbitDepth):
                depth.channel = depth.connection.channel()
            return False

    def process_queued(self) -> Drain:
        self.workers.start()
        depth = self.depth(workers_started_at=self.workers.started_at)
        try:
            meter = CpuMeter(self.workers, self.pg_database, rabbitmq=self.variant.amqp_url is not None)
            return watch_drain(depth, self.n, self.variant.processes, self.workers, meter)
        finally:
            depth.close()

    def latency(self) -> tuple[dict[str, float], int, float]:
        """Probes sent one at a time, `probe_interval` apart, on an idle system."""
        for stale in self.variant.probe_dir.glob("*.log"):
            stale.unlink()
        sent_at: dict[str, float] = {}
        send_ms = []
        tick = time.monotonic()
        for i in range(self.probes):
            key = f"probe-{i}"
            before = time.time()
            self.actors.probe.send(key)
            send_ms.append((time.time() - before) * 1000)
            sent_at[key] = before
            tick += self.probe_interval
            time.sleep(max(0.0, tick - time.monotonic()))
        started_at: dict[str, float] = {}

        def all_started() -> bool:
            for path in self.variant.probe_dir.glob("*.log"):
                for line in path.read_text().splitlines():
                    key, _, value = line.partition(",")
                    started_at[key] = float(value)
            return len(started_at) >= len(sent_at)

        wait_until(all_started, 60, "every probe to start")
        latencies = sorted((started_at[key] - sent_at[key]) * 1000 for key in sent_at)
        return (
            {
                "p50": round(percentile(latencies, 50), 3),
                "p99": round(percentile(latencies, 99), 3),
                "max": round(latencies[-1], 3),
                "mean": round(statistics.fmean(latencies), 3),
            },
            len(latencies),
            round(statistics.median(send_ms), 3),
        )

    def flush(self) -> None:
        """Wait until the engine's sends are recorded and in the broker (it sends in batches,
        from a thread of its own); bare Dramatiq's are written to the socket already."""
        if self.variant.engine:
            import engine

            engine.flush()

    def enqueue_into_running(self, actor: Any, n: int) -> float:
        """`n` sends while the workers run; returns the send rate; waits until all are done."""
        started = time.perf_counter()
        for _ in range(n):
            actor.send()
        self.flush()
        rate = n / (time.perf_counter() - started)
        time.sleep(0.5)
        depth = self.depth()
        try:
            wait_until(lambda: depth.sample().remaining == 0, STALL_S * 2, "the second batch to drain", interval=POLL_S)
            wait_until(depth.all_acked, STALL_S, "the second batch to be acknowledged", interval=POLL_S)
        finally:
            depth.close()
        return rate


def percentile(ordered: list[float], p: float) -> float:
    """The p-th percentile of sorted values, by linear interpolation (numpy's default)."""
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.variant", description="One side of bench.throughput.")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--amqp-url")
    parser.add_argument("--vhost")
    parser.add_argument("--store-url")
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--probe-interval-ms", type=float, default=20.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    variant = Variant(
        args.variant, args.processes, args.threads, args.workdir, args.amqp_url, args.vhost, args.store_url
    )
    results = Run(variant, args.messages, args.probes, args.probe_interval_ms).run()
    args.out.write_text(json.dumps(asdict(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
