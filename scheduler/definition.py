"""A schedule's definition, checked when it is defined, never at fire time.

`Schedule` is what users write (in the TOML file, through `engine.add_schedule`, the CLI or the
HTTP API); `Schedule.trigger` is APScheduler's `CronTrigger` for it. Every check names the field
it failed on (`InvalidSchedule.field`), so a bad definition is refused with its reason and
never reaches the store, where it could disturb the other schedules.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, Iterable, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.errors import EngineError

#: A schedule's name: its id in the store, the CLI and the HTTP API.
NAME_PATTERN = re.compile(r"^[a-z0-9_.-]{1,100}$")

#: Standard cron numbers its weekdays from Sunday (0 or 7); APScheduler 3 from Monday (0). A
#: numeric day-of-week field is rewritten with names, so `0 3 * * 1` runs on Mondays as in cron.
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


class InvalidSchedule(EngineError, ValueError):
    """A schedule definition was refused; nothing was stored.

    Attributes:
      name(str): the schedule's name, as given.
      field(str): the field at fault (`name`, `actor`, `cron`, `timezone`, `args`, ...).
      reason(str): what is wrong with it.
    """

    def __init__(self, name: Any, field: str, reason: str) -> None:
        super().__init__(f"schedule {name!r}: {field}: {reason}")
        self.name = name
        self.field = field
        self.reason = reason


class ScheduleNotFound(EngineError, LookupError):
    """No schedule has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no schedule named {name!r}")
        self.name = name


class Misfire(StrEnum):
    """What a fire missed for longer than `misfire_grace_s` (all schedulers were down) becomes."""

    ONCE = "once"  # one catch-up job, for the latest missed fire time
    SKIP = "skip"  # no job; the ledger records the missed fire times either way


class Origin(StrEnum):
    """Who owns a schedule, which says what may delete it."""

    API = "api"  # the Python API, the CLI, the HTTP API: kept until deleted the same way
    FILE = "file"  # ENGINE_SCHEDULES_FILE: deleted when it is no longer in the file
    BUILTIN = "builtin"  # the engine's own (retention), from settings


class Schedule(BaseModel):
    """A cron schedule: which actor to send, with what, and when.

    Attributes:
      name(str): unique, ``[a-z0-9_.-]``, up to 100 characters.
      actor(str): a registered actor.
      cron(str): 5 fields (minute hour day month weekday), or 6 with seconds first.
      args(list), kwargs(dict): the actor's arguments, JSON values.
      timezone(str): an IANA zone, in which the cron fields are read.
      enabled(bool): False: paused, no fire is due.
      misfire(Misfire): `once` or `skip`, for fires later than `misfire_grace_s`.
      misfire_grace_s(float): how late a fire may still run as a normal fire.
      overlap(bool): False: a fire while the previous fire's job is unfinished is skipped.
      queue(str), priority(int): override the actor's queue, and a priority 0..10.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    actor: str
    cron: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    timezone: str = "UTC"
    enabled: bool = True
    misfire: Misfire = Misfire.ONCE
    misfire_grace_s: float = Field(default=300.0, ge=0)
    overlap: bool = True
    queue: Optional[str] = Field(default=None, min_length=1, max_length=200)
    priority: Optional[int] = Field(default=None, ge=0, le=10)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError("must be 1 to 100 characters of a-z, 0-9, '_', '.' and '-'")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}: use an IANA name such as 'Europe/Berlin' or 'UTC'") from None
        return value

    @field_validator("args", "kwargs")
    @classmethod
    def _json(cls, value: Any) -> Any:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"must be JSON values: {error}") from None
        return value

    @classmethod
    def define(cls, *, known_actors: Optional[Iterable[str]] = None, **fields: Any) -> "Schedule":
        """A checked schedule from its fields.

        Parameters:
          known_actors: the registered actors, when the actor is to be checked.
          **fields: the attributes of `Schedule`.

        Raises:
          InvalidSchedule: naming the first field at fault.
        """
        name = fields.get("name")
        try:
            schedule = cls(**fields)
        except ValidationError as error:
            problem = error.errors()[0]
            field = ".".join(str(part) for part in problem["loc"]) or "schedule"
            reason = problem["msg"].removeprefix("Value error, ")
            if problem["type"] == "extra_forbidden":
                reason = f"unknown field; known fields: {', '.join(cls.model_fields)}"
            raise InvalidSchedule(name, field, reason) from None
        try:
            schedule.trigger()
        except ValueError as error:
            raise InvalidSchedule(name, "cron", f"{schedule.cron!r} is not a cron expression: {error}") from None
        if known_actors is not None:
            known = sorted(known_actors)
            if schedule.actor not in known:
                raise InvalidSchedule(name, "actor", f"unknown actor {schedule.actor!r}; known actors: {', '.join(known) or 'none'}")
        return schedule

    def trigger(self) -> CronTrigger:
        """APScheduler's trigger for `cron` in `timezone`. Raises: ValueError."""
        fields = self.cron.split()
        if len(fields) == 5:
            fields = ["0", *fields]
        if len(fields) != 6:
            raise ValueError(f"expected 5 fields (minute hour day month weekday), or 6 with seconds first; got {len(fields)}")
        second, minute, hour, day, month, weekday = fields
        return CronTrigger(
            second=second, minute=minute, hour=hour, day=day, month=month,
            day_of_week=_cron_weekdays(weekday), timezone=ZoneInfo(self.timezone),
        )  # fmt: skip

    def next_fire_times(self, count: int, *, after: Optional[datetime] = None) -> list[datetime]:
        """The next `count` fire times after `after` (default: now), in the schedule's zone:
        what the preview shows, DST gaps and repeats as the trigger defines them."""
        return list(fire_times(self.trigger(), after or datetime.now(timezone.utc), limit=count))


def fire_times(trigger: CronTrigger, after: datetime, *, until: Optional[datetime] = None, limit: int) -> Iterable[datetime]:
    """The trigger's fire times strictly after `after`, up to `until` (inclusive), `limit` at most."""
    previous = after.astimezone(trigger.timezone)
    for _ in range(limit):
        # With `now` equal to the previous fire time, the trigger looks strictly after it.
        upcoming = trigger.get_next_fire_time(previous, previous)
        if upcoming is None or (until is not None and upcoming > until):
            return
        yield upcoming
        previous = upcoming


def _cron_weekdays(field: str) -> str:
    """A cron day-of-week field with its numbers (0 or 7 Sunday) as names, for APScheduler."""
    if not re.fullmatch(r"[0-9*,/-]+", field) or field == "*":
        return field  # names (mon-fri), `*`, or something the trigger will refuse with its reason
    days: set[int] = set()
    for part in field.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            first, last = 0, 6
        else:
            first_text, _, last_text = base.partition("-")
            first = int(first_text) if first_text else -1
            last = int(last_text) if last_text else (6 if step and first >= 0 else first)
        if not (0 <= first <= 7 and 0 <= last <= 7 and first <= last) or (step and int(step or 0) < 1):
            raise ValueError(f"day of week {part!r}: expected numbers 0-7 (0 and 7 are Sunday) or names")
        days.update(day % 7 for day in range(first, last + 1, int(step) if step else 1))
    return ",".join(_WEEKDAYS[day] for day in sorted(days))
