"""One scheduler process: ``engine scheduler``, or ``python -m scheduler`` under the supervisor.

It imports `engine.actors` (the broker from settings, every actor registered), applies the
engine's built-in schedules and the schedules file, and fires schedules until SIGTERM. Run as
many as you like, on any hosts: they share the store's ledger, and each fire time makes one job.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from dramatiq import Broker
from loguru import logger

from engine.app import get_store
from engine.settings import Settings
from engine.worker import run_engine_process

from .definition import Origin, Schedule
from .file import apply_schedules, read_schedules_file
from .ledger import Ledger
from .service import Scheduler

#: The built-in retention schedule: `purge_jobs` every day at 03:17 UTC (off the hour, when
#: many other cron jobs start), deleting jobs finished more than ``ENGINE_RETENTION_DAYS`` ago.
RETENTION_SCHEDULE = "purge-jobs"
RETENTION_CRON = "17 3 * * *"


def builtin_schedules(settings: Settings) -> list[Schedule]:
    """The engine's own schedules, as the settings ask for them."""
    if not settings.retention_days:
        return []
    return [
        Schedule.define(
            name=RETENTION_SCHEDULE, actor="purge_jobs", cron=RETENTION_CRON,
            kwargs={"older_than_days": settings.retention_days}, overlap=False,
        )  # fmt: skip
    ]


def apply_configured_schedules(ledger: Ledger, settings: Settings, known_actors: list[str]) -> None:
    """The built-in schedules and the schedules file, applied to the store (see `scheduler.file`).

    Raises:
      ConfigError: the schedules file cannot be read or has a bad entry; nothing of it applied.
    """
    from_file = read_schedules_file(settings.schedules_file, known_actors=known_actors) if settings.schedules_file else None
    apply_schedules(ledger, builtin_schedules(settings), origin=Origin.BUILTIN)
    if from_file is not None:
        apply_schedules(ledger, from_file, origin=Origin.FILE)


def main(argv: Optional[list[str]] = None) -> int:
    """Run a scheduler until SIGTERM (or SIGINT when not supervised).

    Returns:
      int: 0 after a stop, `EXIT_CONFIG` when the settings, the actors or the schedules file
      are broken, `EXIT_KILLED` when the supervisor was already gone.
    """
    parser = argparse.ArgumentParser(prog="python -m scheduler", description="Run one scheduler process.")
    parser.add_argument("--parent-pid", type=int, help="the supervisor's pid: exit when it dies")
    args = parser.parse_args(argv)

    def start(settings: Settings, broker: Broker) -> Callable[[], None]:
        store = get_store()
        apply_configured_schedules(Ledger(store), settings, list(broker.get_declared_actors()))
        scheduler = Scheduler(broker, store)
        scheduler.start()

        def stop() -> None:
            logger.info("Stopping the scheduler.")
            scheduler.stop()

        return stop

    return run_engine_process("engine scheduler", start, parent_pid=args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
