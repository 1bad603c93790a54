"""One worker process: ``python -m engine.worker [--threads 8] [--queues a,b]``.

It boots like a process of ``dramatiq engine.actors``: it imports `engine.actors` (which builds
the broker from settings and registers every actor), starts a Dramatiq `Worker`, and runs jobs
until SIGTERM. Then in-flight jobs get up to ``ENGINE_SHUTDOWN_TIMEOUT_S`` to finish, and the
messages it had prefetched go back to their queue. A second SIGTERM exits at once.

`engine.supervisor` starts these processes with ``--parent-pid``, which binds the worker's life
to the supervisor's: the kernel kills it if the supervisor dies, even by SIGKILL, and SIGINT is
left to the supervisor, which turns a Ctrl-C into a SIGTERM to each worker.

The scheduler and the API processes start and stop the same way, through `run_engine_process`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import signal
import socket
import sys
from typing import Callable, Optional

from dramatiq import Broker, Worker
from loguru import logger

from .errors import ConfigError
from .lifetime import die_with_parent
from .logging import setup_logging
from .redaction import mask
from .settings import Settings, get_settings

#: Exit code of a worker that cannot start as configured: a malformed setting, or an actor
#: module that does not import. Starting it again would fail the same way.
EXIT_CONFIG = 2

#: Exit code after a second SIGTERM (jobs still running were abandoned), or when the
#: supervisor that started the process was gone before the process could bind to it.
EXIT_KILLED = 1

__all__ = ["EXIT_CONFIG", "EXIT_KILLED", "StopSignals", "config_error", "main", "run_engine_process"]


def main(argv: Optional[list[str]] = None) -> int:
    """Run a worker process until SIGTERM (or SIGINT when not supervised).

    Parameters:
      argv(list[str]): the command-line arguments; ``sys.argv[1:]`` when None.

    Returns:
      int: 0 after a graceful stop, `EXIT_CONFIG` when the settings or the actors are broken,
      `EXIT_KILLED` when the supervisor was already gone.
    """
    args = _parse_args(argv)

    def start(settings: Settings, broker: Broker) -> Callable[[], None]:
        broker.emit_after("process_boot")
        worker = Worker(broker, queues=args.queues, worker_threads=args.threads or settings.worker_threads)
        # One message per thread, not Dramatiq's two: a short job must not wait behind a long one in a
        # busy process. The RabbitMQ consumer holds twice as many more, handed to a thread as soon as it
        # is free and back to RabbitMQ if none is free soon (see `_HoldingConsumer`).
        worker.queue_prefetch = settings.prefetch or worker.worker_threads
        worker.start()
        logger.info("Worker process is ready for action.")

        def stop() -> None:
            logger.info("Stopping: running jobs have {} s to finish.", settings.shutdown_timeout_s)
            worker.stop(timeout=int(settings.shutdown_timeout_s * 1000))

        return stop

    return run_engine_process("engine worker", start, parent_pid=args.parent_pid, cpu=args.cpu)


def run_engine_process(
    name: str,
    start: Callable[[Settings, Broker], Callable[[], None]],
    *,
    parent_pid: Optional[int] = None,
    cpu: Optional[int] = None,
) -> int:
    """Run one process of the engine (a worker, a scheduler, the API) until SIGTERM.

    The start-up every such process shares: bind to the supervisor's life (``--parent-pid``),
    take over SIGTERM (and SIGINT unless supervised, see `StopSignals`), read the settings, set up
    logging and import `engine.actors`. Then `start` starts the process's own work and returns
    how to stop it, which is called after the first stop signal; the broker is closed last.

    Parameters:
      name(str): the command, as the first word of a configuration error (``engine worker``).
      start: called with the settings and the broker; returns the function that stops what it
        started. It may raise `ConfigError` for a configuration that cannot work.
      parent_pid(int): the supervisor's pid, when started by one: the process dies with it.
      cpu(int): the CPU to run on, when pinned (see `engine.supervisor.cpus_to_pin`).

    Returns:
      int: 0 after a stop, `EXIT_CONFIG` when the settings, the actors or what `start` reads
      are broken, `EXIT_KILLED` when the supervisor was already gone.
    """
    if parent_pid is not None and not die_with_parent(parent_pid):
        return EXIT_KILLED
    if cpu is not None:
        _pin_to(cpu)
    signals = StopSignals(supervised=parent_pid is not None)
    try:
        settings = get_settings()
        setup_logging(settings)
        broker = importlib.import_module("engine.actors").broker
        stop = start(settings, broker)
    except ConfigError as error:
        return config_error(name, str(error))
    except ImportError as error:
        return config_error(name, f"cannot import the actors: {error}")
    signals.wait()
    stop()
    broker.close()
    return 0


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.worker", description="Run one worker process.")
    parser.add_argument("--threads", type=int, help="worker threads (default: ENGINE_WORKER_THREADS)")
    parser.add_argument("--queues", type=_names, help="comma-separated queues (default: all)")
    parser.add_argument("--parent-pid", type=int, help="the supervisor's pid: exit when it dies")
    parser.add_argument("--cpu", type=int, help="the CPU to run on (see engine.supervisor.cpus_to_pin)")
    return parser.parse_args(argv)


def _names(value: str) -> list[str]:
    return [name for name in value.split(",") if name]


def _pin_to(cpu: int) -> None:
    """Run this process on `cpu` alone: called before any thread starts, so each inherits it."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as error:  # the CPU was taken away since the supervisor looked (a cpuset change)
        logger.warning("Could not pin the worker to CPU {} ({}); it runs unpinned.", cpu, error.strerror)


def config_error(name: str, message: str) -> int:
    """Print `message` on one line after `name`, with no traceback and its secrets masked, for
    the supervisor or the user to read; returns `EXIT_CONFIG`."""
    lines = [line.strip() for line in mask(message).splitlines() if line.strip()]
    print(f"{name}: {' '.join(lines)}", file=sys.stderr, flush=True)
    return EXIT_CONFIG


class StopSignals:
    """SIGTERM, and SIGINT unless supervised: the first is waited for, a second exits at once.

    A supervised worker ignores SIGINT: a Ctrl-C reaches the whole process group, and the
    supervisor turns it into one SIGTERM per worker, which must not count as a second signal.

    Parameters:
      supervised(bool): True when started by `engine.supervisor`.
    """

    def __init__(self, *, supervised: bool) -> None:
        self.received = False
        # A wake-up fd rather than an Event: an Event set from a signal handler can deadlock
        # on its own lock, and a handler that returns does not interrupt a blocking wait.
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, signal.SIG_IGN if supervised else self._handle)

    def wait(self) -> None:
        """Block until a stop signal has been received (return at once if one came already)."""
        while not self.received:
            select.select([self._reader], [], [])
            self._reader.recv(4096)

    def _handle(self, _signum: int, _frame: object) -> None:
        if self.received:
            os.write(sys.stderr.fileno(), b"engine: second stop signal, exiting now\n")
            os._exit(EXIT_KILLED)
        self.received = True


if __name__ == "__main__":
    sys.exit(main())
