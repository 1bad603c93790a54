"""The schedules file (``ENGINE_SCHEDULES_FILE``): TOML, one table per schedule, applied at start.

Applying it makes the store hold exactly the file's schedules among those of origin `file`:
each is created or updated, and a file schedule no longer in the file is deleted. Schedules
made through the API are left alone, unless the file defines one of the same name, which the
file then owns. A file with any bad entry is refused whole, with every bad entry named: the
scheduler does not start on half a file, where a nightly job would silently be missing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Iterable

from loguru import logger

from engine.errors import ConfigError

from .definition import InvalidSchedule, Origin, Schedule
from .ledger import Ledger


def read_schedules_file(path: Path, *, known_actors: Iterable[str]) -> list[Schedule]:
    """The schedules of a TOML file (``[schedules.NAME]`` tables), each checked.

    Raises:
      ConfigError: the file cannot be read, is not TOML, or has bad entries (all are named).
    """
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"ENGINE_SCHEDULES_FILE {path}: {error}") from None
    tables = document.get("schedules", {})
    unknown = sorted(set(document) - {"schedules"})
    if not isinstance(tables, dict) or unknown:
        raise ConfigError(f"ENGINE_SCHEDULES_FILE {path}: expected only [schedules.NAME] tables, found {unknown or ['schedules = ...']}")
    known = list(known_actors)
    schedules, problems = [], []
    for name, fields in tables.items():
        try:
            if not isinstance(fields, dict):
                raise InvalidSchedule(name, "schedule", "expected a table of fields")
            schedules.append(Schedule.define(name=name, known_actors=known, **fields))
        except InvalidSchedule as error:
            problems.append(str(error))
    if problems:
        raise ConfigError(
            f"ENGINE_SCHEDULES_FILE {path}: {len(problems)} bad schedule(s), nothing applied:\n  " + "\n  ".join(problems)
        )
    return schedules


def apply_schedules(ledger: Ledger, schedules: list[Schedule], *, origin: Origin) -> None:
    """Make the store's schedules of `origin` exactly `schedules`: save those that differ,
    delete those that are gone. Unchanged ones are not written, so that schedulers starting
    together do not wake each other for nothing."""
    stored = {each.schedule.name: each for each in ledger.list()}
    for schedule in schedules:
        before = stored.get(schedule.name)
        if before is None or before.schedule != schedule or before.origin != origin:
            ledger.save(schedule, origin=origin)
            logger.info("Schedule {} ({}) {} from {}.", schedule.name, schedule.cron, "updated" if before else "created", origin)
    wanted = {schedule.name for schedule in schedules}
    for name, each in stored.items():
        if each.origin == origin and name not in wanted:
            ledger.delete(name)
            logger.info("Schedule {} deleted: it is no longer defined by {}.", name, origin)
