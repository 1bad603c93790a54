"""The Python API of cron schedules: define, list, pause, run and preview them.

Schedules live in the store, so a change made here, in any process on any host, reaches every
running scheduler within a second or two (``engine scheduler``, or the one of ``engine run``),
without a restart. What the schedulers do with them is described in `scheduler.service`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from dramatiq.errors import ActorNotFound

from scheduler.definition import InvalidSchedule, Misfire, Origin, Schedule, ScheduleNotFound
from scheduler.ledger import Fire, FireOutcome, Ledger, StoredSchedule

from .app import get_broker, get_store
from .client import _read_own_sends
from .errors import UnknownActor
from .job import Job

__all__ = [
    "set_schedule",
    "get_schedule",
    "list_schedules",
    "delete_schedule",
    "pause_schedule",
    "resume_schedule",
    "run_schedule",
    "preview_schedule",
    "schedule_fires",
    "ScheduleInfo",
    "Schedule",
    "Fire",
    "FireOutcome",
    "Misfire",
    "Origin",
    "InvalidSchedule",
    "ScheduleNotFound",
]


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as users read it: its definition, who owns it, its latest fire and its next.

    Attributes:
      schedule(Schedule): the definition.
      origin(Origin): `api`, `file` or `builtin`.
      created_at, updated_at(float): seconds since the epoch.
      last_fire(Fire): the ledger's latest row for it (enqueued, missed or skipped), or None.
      next_fire_time(datetime): when it fires next, in its zone; None when paused.
    """

    schedule: Schedule
    origin: Origin
    created_at: float
    updated_at: float
    last_fire: Optional[Fire]
    next_fire_time: Optional[datetime]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view, times in ISO 8601."""
        return {
            **self.schedule.model_dump(mode="json"),
            "origin": self.origin.value,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "last_fire": self.last_fire.to_dict() if self.last_fire else None,
            "next_fire_time": self.next_fire_time.isoformat() if self.next_fire_time else None,
        }


def set_schedule(name: str, actor: str, cron: str, **fields: Any) -> ScheduleInfo:
    """Create a schedule, or replace the one of that name (it then belongs to the API).

    Parameters:
      name(str): its id: ``[a-z0-9_.-]``, up to 100 characters.
      actor(str): a registered actor.
      cron(str): 5 fields (minute hour day month weekday; 0 and 7 are Sunday), or 6 with
        seconds first.
      **fields: `args` (list), `kwargs` (dict), `timezone` (IANA name, default UTC),
        `enabled`, `misfire` (``once`` or ``skip``), `misfire_grace_s`, `overlap`, `queue`,
        `priority` (see `Schedule`).

    Returns:
      ScheduleInfo: the schedule as stored, with its next fire time.

    Raises:
      InvalidSchedule: naming the field at fault; nothing was stored.
    """
    schedule = Schedule.define(name=name, actor=actor, cron=cron, known_actors=get_broker().get_declared_actors(), **fields)
    return _info(_ledger().save(schedule, origin=Origin.API))


def get_schedule(name: str) -> ScheduleInfo:
    """Raises: ScheduleNotFound."""
    ledger = _ledger()
    return _info(ledger.get(name), ledger.fires(name, limit=1))


def list_schedules() -> list[ScheduleInfo]:
    """Every schedule, by name, each with its latest and next fire."""
    ledger = _ledger()
    last = ledger.last_fires()
    return [_info(each, [last[each.schedule.name]] if each.schedule.name in last else []) for each in ledger.list()]


def delete_schedule(name: str) -> None:
    """Delete a schedule and its fire ledger; the jobs it created stay. A schedule of the
    schedules file comes back at the next start unless it is removed from the file.

    Raises: ScheduleNotFound."""
    _ledger().delete(name)


def pause_schedule(name: str) -> ScheduleInfo:
    """Stop firing the schedule until it is resumed. Raises: ScheduleNotFound."""
    return _info(_ledger().set_enabled(name, False))


def resume_schedule(name: str) -> ScheduleInfo:
    """Fire the schedule again from its next fire time; the fire times of the pause are not
    missed, nor caught up. Raises: ScheduleNotFound."""
    return _info(_ledger().set_enabled(name, True))


def run_schedule(name: str) -> Job:
    """Create the schedule's job now, outside its cron times (paused or not). The job has the
    schedule's name and no fire time; the fire ledger, which is of cron times, does not list it.

    Raises:
      ScheduleNotFound; UnknownActor if this process does not know the schedule's actor.
    """
    from scheduler.service import record_jobs, schedule_message, send_recorded  # it imports the engine

    schedule = _ledger().get(name).schedule
    broker, store = get_broker(), get_store()
    try:
        message = schedule_message(broker, schedule)
    except ActorNotFound:
        raise UnknownActor(schedule.actor, list(broker.get_declared_actors())) from None
    with store.transaction() as connection:
        record_jobs(broker, connection, [(message, name, None)])
    send_recorded(broker, [message])
    _read_own_sends(message.message_id)
    return store.get(message.message_id)


def preview_schedule(name: str, count: int = 5) -> list[datetime]:
    """The schedule's next `count` fire times, in its time zone (DST as the trigger defines:
    a time in a spring-forward gap fires an hour later by the clock, one in a fall-back repeat
    fires in both). Raises: ScheduleNotFound."""
    return _local(_ledger().get(name).schedule, count)


def schedule_fires(name: str, limit: int = 20) -> list[Fire]:
    """The schedule's fire ledger, newest first: enqueued (with the job's id), missed and
    skipped fire times. Raises: ScheduleNotFound."""
    ledger = _ledger()
    ledger.get(name)
    return ledger.fires(name, limit=limit)


def _ledger() -> Ledger:
    return Ledger(get_store())


def _local(schedule: Schedule, count: int) -> list[datetime]:
    """Fire times shown in the schedule's zone with the offset in force then (APScheduler
    returns a gap time with the offset before the gap)."""
    zone = schedule.trigger().timezone
    return [each.astimezone(timezone.utc).astimezone(zone) for each in schedule.next_fire_times(count)]


def _info(stored: StoredSchedule, fires: Optional[list[Fire]] = None) -> ScheduleInfo:
    upcoming = _local(stored.schedule, 1) if stored.schedule.enabled else []
    return ScheduleInfo(
        schedule=stored.schedule, origin=stored.origin, created_at=stored.created_at, updated_at=stored.updated_at,
        last_fire=fires[0] if fires else None, next_fire_time=upcoming[0] if upcoming else None,
    )  # fmt: skip


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds")
