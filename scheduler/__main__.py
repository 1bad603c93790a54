"""One scheduler process: ``engine scheduler``, or ``python -m scheduler`` under the supervisor.

It imports `engine.actors` (the broker from settings, every actor registered), applies the
engine's built-in schedules and the schedules file, and fires schedules until SIGTERM. Run as
many as you like, on any hosts: they share the store's ledger, and each fire time makes one job.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from loguru import logger

from engine.app import get_store
from engine.errors import ConfigError
from engine.logging import setup_logging
from engine.settings import Settings, get_settings
from engine.lifetime import die_with_parent
from engine.worker import EXIT_CONFIG, EXIT_KILLED, _config_error, _StopSignals

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
    if args.parent_pid is not None and not die_with_parent(args.parent_pid):
        return EXIT_KILLED
    stop = _StopSignals(supervised=args.parent_pid is not None)
    try:
        settings = get_settings()
        setup_logging(settings)
        broker = importlib.import_module("engine.actors").broker
        store = get_store()
        apply_configured_schedules(Ledger(store), settings, list(broker.get_declared_actors()))
    except ConfigError as error:
        return _config_error(str(error))
    except ImportError as error:
        return _config_error(f"cannot import the actors: {error}")
    scheduler = Scheduler(broker, store)
    scheduler.start()
    stop.wait()
    logger.info("Stopping the scheduler.")
    scheduler.stop()
    broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
