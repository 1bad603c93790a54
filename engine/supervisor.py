"""The supervisor: runs worker processes, restarts those that die, and stops them all on SIGTERM.

``engine run`` gives it more kinds of process to run beside the workers (`ProcessKind`): a
scheduler and the API, restarted and stopped like workers.

Each worker is a fresh interpreter (``python -m engine.worker``), never a fork of this process,
so no database or broker connection is shared across processes. Workers read their settings
from the environment, as this process does with `engine.settings.get_settings`.

A worker that dies (crash, SIGKILL, out of memory) is replaced while the others keep running.
One that dies soon after it started is crashing: its replacement waits, twice as long after
each such death, so a broken deployment does not spin. A worker that exits with
`engine.worker.EXIT_CONFIG` has printed why it cannot start, and starting it again would not
help: the supervisor stops the others and returns that code.

The supervisor also records a worker's death in the store as soon as it reaps it, so that jobs
the worker was running are taken over at once instead of after its heartbeat goes stale.

With ``ENGINE_METRICS_PORT`` set, it serves the metrics of its processes, summed, and the count
of its restarts, from a thread of its own (`engine.metrics.host.HostMetrics`).

Workers are bound to the supervisor: on Linux the kernel kills them when it dies, even by
SIGKILL. The binding is to the thread that started them, so `Supervisor.run` must stay in the
main thread for as long as its workers live (signal handlers need the main thread anyway).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from .metrics.host import HostMetrics
from .settings import Settings
from .store import Store
from .worker import EXIT_CONFIG

#: A worker that dies sooner than this after its start is crashing, and its restart is delayed.
#: One that stayed up longer is restarted at once, and its slot's delay starts over.
HEALTHY_UPTIME_S = 5.0

#: The first delay before restarting a crashing worker; it doubles with each crash, up to the max.
MIN_RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0


def cpus_to_pin(mode: str, processes: int) -> Optional[list[int]]:
    """The CPUs that worker processes are pinned to, one each, round-robin (``ENGINE_PIN_CPUS``);
    None to leave them to the kernel's scheduler.

    A worker's threads take turns under one GIL, and hand each job on from thread to thread
    (consumer, worker, store writer). Kept on one core, they no longer move between cores nor
    wake each other across them: on the benchmark's 2-core VM, +20-30 % jobs per second
    (+13-25 % for bare Dramatiq, pinned the same way). "auto" pins when there are at least as many processes as CPUs this
    process may use, so that pinning leaves no CPU without a worker; with fewer, a process
    whose jobs run C code in parallel threads (Pillow, numpy) may use several.
    """
    if mode == "off" or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "auto" and processes < len(cpus):
        return None
    return cpus


@dataclass(frozen=True)
class ProcessKind:
    """A kind of process `engine run` supervises beside the workers: each is started with
    ``--parent-pid`` and restarted like a dead worker.

    Attributes:
      name(str): what the logs call it (``scheduler``, ``api``).
      command(list[str]): how it is started.
      pass_fds(tuple[int, ...]): file descriptors it inherits (the API's listening socket).
    """

    name: str
    command: list[str]
    pass_fds: tuple[int, ...] = ()


#: One scheduler process.
SCHEDULER = ProcessKind("scheduler", [sys.executable, "-m", "scheduler"])


def api_process(listener: socket.socket) -> ProcessKind:
    """The API process, answering on `listener`: bound once by the supervisor's caller, so that
    a restarted API keeps its port and connections made meanwhile wait in the backlog."""
    fd = listener.fileno()
    return ProcessKind("api", [sys.executable, "-m", "api", "--socket-fd", str(fd)], pass_fds=(fd,))


def run_workers(
    settings: Settings,
    *,
    processes: int,
    threads: int,
    queues: Optional[list[str]] = None,
    others: Sequence[ProcessKind] = (),
) -> int:
    """Run worker processes until SIGTERM or SIGINT; see `Supervisor`.

    Must be called from the main thread. It blocks until the workers have stopped.

    Parameters:
      settings(Settings): the supervisor's settings (``shutdown_timeout_s``); the workers read
        theirs from the same environment.
      processes(int): how many worker processes to keep running.
      threads(int): worker threads per process.
      queues(list[str]): the queues to consume; all declared queues when None.
      others: more processes to supervise, such as `SCHEDULER` and `api_process`.

    Returns:
      int: 0 after a stop by signal, `EXIT_CONFIG` when a worker could not start as configured.
    """
    return Supervisor(settings, processes=processes, threads=threads, queues=queues, others=others).run()


@dataclass
class Slot:
    """The place of one supervised process: the process in it now, and when to start the next.

    Attributes:
      index(int): the slot's number among those of its kind, as logged.
      kind(str): ``worker``, or another kind's name (`ProcessKind`).
      command(list[str]): how its process is started (``--parent-pid`` is added).
      pass_fds(tuple[int, ...]): file descriptors its process inherits.
      process(Popen): the worker running in it; None while waiting for a restart.
      started_at(float): when `process` was started (monotonic).
      start_at(float): when to start the next worker (monotonic); None while one runs.
      restart_delay(float): the delay applied after the last crash; 0 after a healthy run.
    """

    index: int
    kind: str
    command: list[str]
    pass_fds: tuple[int, ...] = ()
    process: Optional[subprocess.Popen[bytes]] = None
    started_at: float = 0.0
    start_at: Optional[float] = 0.0
    restart_delay: float = 0.0


class Supervisor:
    """Keeps `processes` worker processes, and the `others`, running until it is stopped.

    Parameters:
      settings(Settings): gives ``shutdown_timeout_s``, how long stopping workers may take
        before they are killed.
      processes(int): how many worker processes to keep running.
      threads(int): worker threads per process.
      queues(list[str]): the queues to consume; all declared queues when None.
      others: more processes, such as `SCHEDULER`, supervised the same way.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        processes: int,
        threads: int,
        queues: Optional[list[str]] = None,
        others: Sequence[ProcessKind] = (),
    ) -> None:
        if processes < 1 or threads < 1:
            raise ValueError(f"processes and threads must be at least 1, got {processes} and {threads}")
        self.settings = settings
        command = [sys.executable, "-m", "engine.worker", "--threads", str(threads)]
        if queues:
            command += ["--queues", ",".join(queues)]
        self.slots = [Slot(index, "worker", command) for index in range(processes)]
        self.slots += [Slot(0, other.name, other.command, other.pass_fds) for other in others]
        self.cpus = cpus_to_pin(settings.pin_cpus, processes)
        self.store = Store(settings.store_url)
        self.host = socket.gethostname()
        self.exit_code = 0
        self.stop_requests = 0
        self.metrics: Optional[HostMetrics] = None
        self._wakeup, self._wakeup_writer = socket.socketpair()
        self._wakeup_writer.setblocking(False)

    def run(self) -> int:
        """Start the workers and supervise them until `stop` is called or SIGTERM or SIGINT comes.

        Must be called from the main thread, which it blocks until the workers have stopped.

        Returns:
          int: 0 after a requested stop, `EXIT_CONFIG` when a worker could not start as configured.
        """
        # Once here, rather than raced by every worker's first connection to a new store.
        self.store.upgrade()
        if self.settings.metrics_port is not None:
            self.metrics = HostMetrics(self.settings)
        with self._signal_handlers():
            try:
                while not self.stop_requests and not self.exit_code:
                    self._start_due()
                    self._sleep(self._time_to_next_start())
                    self._reap()
                self._stop_workers()
            finally:
                self._kill_workers()
                self.store.close()
                if self.metrics is not None:
                    self.metrics.close()
        return self.exit_code

    def stop(self) -> None:
        """Stop the workers gracefully; a second call makes them exit at once. Thread-safe."""
        self.stop_requests += 1
        self._wake()

    # -- starting ------------------------------------------------------------------------------

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.start_at is not None and slot.start_at <= now:
                self._start(slot)

    def _start(self, slot: Slot) -> None:
        command = [*slot.command, "--parent-pid", str(os.getpid())]
        if self.cpus and slot.kind == "worker":
            command += ["--cpu", str(self.cpus[slot.index % len(self.cpus)])]
        restarted = slot.started_at > 0
        env = self.metrics.child_env() if self.metrics is not None else None
        slot.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, pass_fds=slot.pass_fds, env=env)
        if restarted and self.metrics is not None:
            self.metrics.process_restarted()
        slot.started_at, slot.start_at = time.monotonic(), None
        verb = "Restarted" if restarted else "Started"
        logger.info("{} {} {} (pid {}).", verb, slot.kind, slot.index, slot.process.pid)

    def _time_to_next_start(self) -> Optional[float]:
        pending = [slot.start_at for slot in self.slots if slot.start_at is not None]
        return max(0.0, min(pending) - time.monotonic()) if pending else None

    # -- deaths --------------------------------------------------------------------------------

    def _reap(self) -> None:
        """Take note of the workers that have exited, and schedule their restarts."""
        for slot, process in self._running():
            code = process.poll()
            if code is None:
                continue
            uptime = time.monotonic() - slot.started_at
            level = "INFO" if self.stop_requests and code == 0 else "WARNING"
            how = _describe_exit(code)
            logger.log(level, "{} {} (pid {}) {} after {:.1f} s.", slot.kind.capitalize(), slot.index, process.pid, how, uptime)
            slot.process = None
            self._record_death(process.pid)
            if self.metrics is not None:
                self.metrics.process_died(process.pid)
            if code == EXIT_CONFIG:
                logger.error("{} {} cannot start as configured; stopping the others.", slot.kind.capitalize(), slot.index)
                self.exit_code = EXIT_CONFIG
            elif not self.stop_requests and not self.exit_code:
                self._schedule_restart(slot, uptime)

    def _record_death(self, pid: int) -> None:
        try:
            self.store.mark_workers_stopped(host=self.host, pid=pid)
        except SQLAlchemyError as error:
            # Its heartbeat will go stale instead: its jobs are taken over a little later.
            logger.warning("Could not record the end of worker pid {}: {}", pid, error)

    def _schedule_restart(self, slot: Slot, uptime: float) -> None:
        if uptime >= HEALTHY_UPTIME_S:
            slot.restart_delay = 0.0
        else:
            slot.restart_delay = min(max(2 * slot.restart_delay, MIN_RESTART_DELAY_S), MAX_RESTART_DELAY_S)
            logger.warning(
                "{} {} crashed {:.1f} s after it started; restarting it in {:.1f} s.",
                slot.kind.capitalize(),
                slot.index,
                uptime,
                slot.restart_delay,
            )
        slot.start_at = time.monotonic() + slot.restart_delay

    # -- stopping ------------------------------------------------------------------------------

    def _stop_workers(self) -> None:
        """SIGTERM every worker, again on each new stop request; wait up to the shutdown timeout."""
        logger.info("Stopping the workers; they have {} s to finish their jobs.", self.settings.shutdown_timeout_s)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        signalled = -1
        while self._running() and time.monotonic() < deadline:
            if signalled < self.stop_requests:
                if signalled >= 0:
                    logger.warning("Stop requested again: workers exit now, abandoning running jobs.")
                self._terminate_workers()
                signalled = self.stop_requests
            self._sleep(deadline - time.monotonic())
            self._reap()

    def _kill_workers(self) -> None:
        """SIGKILL the workers still running, and wait for them."""
        for slot, process in self._running():
            logger.warning("{} {} (pid {}) is still running; killing it.", slot.kind.capitalize(), slot.index, process.pid)
            process.kill()
            process.wait()
        self._reap()

    def _terminate_workers(self) -> None:
        for _slot, process in self._running():
            process.terminate()

    def _running(self) -> list[tuple[Slot, subprocess.Popen[bytes]]]:
        return [(slot, slot.process) for slot in self.slots if slot.process is not None]

    # -- waiting -------------------------------------------------------------------------------

    @contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """Wake `_sleep` on SIGCHLD, SIGTERM and SIGINT; restore the previous handlers after."""
        previous_fd = signal.set_wakeup_fd(self._wakeup_writer.fileno(), warn_on_full_buffer=False)
        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)}
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)  # the wake-up byte is what counts
        signal.siginterrupt(signal.SIGCHLD, False)  # other threads' system calls resume after it
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous_fd)

    def _on_stop_signal(self, _signum: int, _frame: object) -> None:
        self.stop()  # no logging here: loguru's lock may be held by the code this interrupts

    def _sleep(self, timeout: Optional[float]) -> None:
        """Sleep until a signal or `stop` wakes us, or `timeout` seconds (None: no limit)."""
        if select.select([self._wakeup], [], [], None if timeout is None else max(0.0, timeout))[0]:
            self._wakeup.recv(4096)

    def _wake(self) -> None:
        try:
            self._wakeup_writer.send(b"\0")
        except BlockingIOError:
            pass  # full of wake-ups already


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
