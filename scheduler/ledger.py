"""Schedules and their fire ledger in the engine's store: the one source of truth.

- `schedules`: the definitions, each with its `Origin`. Every change bumps `schedule_versions`
  in the same transaction, which every scheduler polls (`Ledger.version`), so a change made on
  any host reaches all of them within a poll.
- `schedule_fires`: one row per schedule and fire time, unique. Fires claim their rows in the
  transaction that records their jobs (`Ledger.claim_many`, one statement for the fires due
  together), so whichever scheduler inserts first creates the job, and the others find the
  row and create nothing. Missed and skipped fire
  times get rows too: the ledger is what users read as the schedule's history.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Iterable, NamedTuple, Optional

from sqlalchemy import Connection, bindparam, delete, func, select, text, update

from engine.job import FINISHED_STATES
from engine.store import Store
from engine.store.schema import jobs, schedule_fires, schedule_versions, schedules

from .definition import Origin, Schedule, ScheduleNotFound

#: The ledger keeps at most this many missed fire times of one outage, the latest; the log
#: line of the outage says how many more there were.
MAX_MISSED_RECORDED = 1000


#: `Ledger.claim_many` on PostgreSQL: the claims in one JSON parameter, inserted in their order,
#: one statement text for every batch size (a multi-row VALUES binds six parameters a claim).
_CLAIMS_PG = text(
    """
INSERT INTO schedule_fires (schedule, fire_time, outcome, job_id, recorded_at, scheduler)
SELECT schedule, fire_time, outcome, job_id, :recorded_at, :scheduler
FROM json_to_recordset(CAST(:claims AS json)) AS claim(schedule text, fire_time float8, outcome text, job_id text)
ORDER BY schedule, fire_time
ON CONFLICT (schedule, fire_time) DO NOTHING
RETURNING schedule, fire_time
"""
)


class FireOutcome(StrEnum):
    """What became of one fire time, as its ledger row says."""

    ENQUEUED = "enqueued"  # its job was created
    MISSED = "missed"  # no scheduler fired it in time (see `Misfire`)
    SKIPPED_OVERLAP = "skipped-overlap"  # overlap = false and the previous fire's job was unfinished


@dataclass(frozen=True)
class StoredSchedule:
    """A schedule as the store holds it, with who owns it and when it last changed."""

    schedule: Schedule
    origin: Origin
    created_at: float
    updated_at: float
    active_since: float  # fire times before this are not due (see `engine.store.schema`)


class Claim(NamedTuple):
    """A ledger row a scheduler is about to insert (see `Ledger.claim_many`)."""

    schedule: str
    fire_time: float
    outcome: FireOutcome
    job_id: Optional[str] = None


class FireCount(NamedTuple):
    """How many fire times of one schedule have one outcome in the ledger, and the latest."""

    count: int
    latest: float


class FireCounts(NamedTuple):
    """The ledger's rows after a row, counted (`Ledger.count_fires`).

    Attributes:
      settled_id: the id up to which the rows are settled: no row of a lower id will appear.
      settled, recent: the counts up to `settled_id`, and after it, by (schedule, outcome).
    """

    settled_id: int
    settled: dict[tuple[str, FireOutcome], FireCount]
    recent: dict[tuple[str, FireOutcome], FireCount]


@dataclass(frozen=True)
class Fire:
    """One row of the fire ledger."""

    schedule: str
    fire_time: float
    outcome: FireOutcome
    job_id: Optional[str]
    recorded_at: float
    scheduler: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule, "fire_time": _iso(self.fire_time), "outcome": self.outcome.value,
            "job_id": self.job_id, "recorded_at": _iso(self.recorded_at), "scheduler": self.scheduler,
        }  # fmt: skip


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds")


def _this_scheduler() -> str:
    """Who records a fire, for the ledger's `scheduler` column."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Ledger:
    """Schedules and fires on the store's connections and transactions.

    Parameters:
      store(Store): the engine's store (its schema upgraded).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._insert = store.dialect.insert  # the dialect's INSERT, with ON CONFLICT

    # -- definitions -----------------------------------------------------------------------------

    def save(self, schedule: Schedule, *, origin: Origin) -> StoredSchedule:
        """Create or replace a schedule. A change of its timing (cron, zone) or a resume starts
        it afresh: fire times before the change are not due, so they are not missed either."""
        now = time.time()
        row = _row(schedule)
        with self.store.transaction() as connection:
            before = self._find(connection, schedule.name, for_update=True)
            if before is None:
                created = connection.execute(
                    self._insert(schedules)
                    .values(**row, origin=origin, created_at=now, updated_at=now, active_since=now)
                    .on_conflict_do_nothing(index_elements=["name"])
                    .returning(schedules.c.name)
                ).first()
                if created is None:  # another process created it since (two schedulers starting)
                    before = self._find(connection, schedule.name, for_update=True)
            if before is not None:
                old = before.schedule
                retimed = (old.cron, old.timezone) != (schedule.cron, schedule.timezone)
                resumed = schedule.enabled and not old.enabled
                active_since = now if retimed or resumed else before.active_since
                connection.execute(
                    update(schedules)
                    .where(schedules.c.name == schedule.name)
                    .values(**row, origin=origin, updated_at=now, active_since=active_since)
                )
            _bump(connection)
            return self._find(connection, schedule.name)  # type: ignore[return-value]

    def set_enabled(self, name: str, enabled: bool) -> StoredSchedule:
        """Pause or resume. Raises: ScheduleNotFound."""
        found = self.get(name)
        return self.save(found.schedule.model_copy(update={"enabled": enabled}), origin=found.origin)

    def delete(self, name: str) -> None:
        """Delete a schedule and its ledger; its jobs stay. Raises: ScheduleNotFound."""
        with self.store.transaction() as connection:
            deleted = connection.execute(delete(schedules).where(schedules.c.name == name)).rowcount
            if not deleted:
                raise ScheduleNotFound(name)
            connection.execute(delete(schedule_fires).where(schedule_fires.c.schedule == name))
            _bump(connection)

    def get(self, name: str) -> StoredSchedule:
        """Raises: ScheduleNotFound."""
        with self.store.reading() as connection:
            found = self._find(connection, name)
        if found is None:
            raise ScheduleNotFound(name)
        return found

    def list(self, *, origin: Optional[Origin] = None) -> list[StoredSchedule]:
        """Every schedule, by name."""
        query = select(schedules).order_by(schedules.c.name)
        if origin is not None:
            query = query.where(schedules.c.origin == origin)
        with self.store.reading() as connection:
            return [_stored(row) for row in connection.execute(query)]

    def version(self) -> int:
        """The change counter: it moves with every change of any schedule."""
        with self.store.reading() as connection:
            return connection.execute(select(schedule_versions.c.version)).scalar_one()

    @staticmethod
    def _find(connection: Connection, name: str, *, for_update: bool = False) -> Optional[StoredSchedule]:
        query = select(schedules).where(schedules.c.name == name)
        row = connection.execute(query.with_for_update() if for_update else query).first()
        return _stored(row) if row is not None else None

    # -- fires -----------------------------------------------------------------------------------

    def claim(self, connection: Connection, name: str, fire_time: float, outcome: FireOutcome, job_id: Optional[str] = None) -> bool:
        """Insert the ledger row of one fire time (see `claim_many`); False when another
        scheduler has it already."""
        return bool(self.claim_many(connection, [Claim(name, fire_time, outcome, job_id)]))

    def claim_many(self, connection: Connection, claims: list[Claim]) -> set[tuple[str, float]]:
        """Insert the ledger rows of fire times in `connection`'s transaction, in one statement.

        Returns:
          the (schedule, fire time) of the rows inserted; the others were claimed by another
          scheduler already. A claim of a row another transaction inserted and has not
          committed yet waits for it (PostgreSQL decides a unique key so), which is why
          schedulers claim in one order, by schedule and fire time: they never deadlock.
        """
        if not claims:
            return set()
        ordered = sorted(claims, key=_claim_order)
        now, scheduler = time.time(), _this_scheduler()
        if connection.dialect.name == "postgresql":
            parameters = {"claims": json.dumps([claim._asdict() for claim in ordered]), "recorded_at": now, "scheduler": scheduler}
            return {tuple(row) for row in connection.execute(_CLAIMS_PG, parameters)}  # type: ignore[misc]
        rows = [{**claim._asdict(), "recorded_at": now, "scheduler": scheduler} for claim in ordered]
        statement = self._insert(schedule_fires).on_conflict_do_nothing(index_elements=["schedule", "fire_time"])
        inserted = connection.execute(statement.returning(schedule_fires.c.schedule, schedule_fires.c.fire_time), rows)
        return {(row.schedule, row.fire_time) for row in inserted}

    def record_missed(self, fires: Iterable[tuple[str, float]]) -> int:
        """Record (schedule, fire time) pairs as missed, but those claimed already; returns how
        many were new."""
        claims = [Claim(name, fire_time, FireOutcome.MISSED) for name, fire_time in fires]
        with self.store.transaction() as connection:
            return len(self.claim_many(connection, claims))

    @staticmethod
    def tag_jobs(connection: Connection, tags: list[tuple[str, str, Optional[float]]]) -> None:
        """Write (job id, schedule, fire time) into the rows of jobs recorded in this transaction."""
        if tags:
            connection.execute(
                update(jobs)
                .where(jobs.c.id == bindparam("job_id"))
                .values(schedule=bindparam("tag_schedule"), fire_time=bindparam("tag_fire_time")),
                [{"job_id": job_id, "tag_schedule": name, "tag_fire_time": fire_time} for job_id, name, fire_time in tags],
            )

    @staticmethod
    def previous_job_unfinished(connection: Connection, name: str) -> bool:
        """Whether the job of the schedule's latest enqueued fire has not finished yet."""
        latest = (
            select(schedule_fires.c.job_id)
            .where(schedule_fires.c.schedule == name, schedule_fires.c.outcome == FireOutcome.ENQUEUED)
            .order_by(schedule_fires.c.fire_time.desc())
            .limit(1)
            .scalar_subquery()
        )
        state = connection.execute(select(jobs.c.state).where(jobs.c.id == latest)).scalar()
        return state is not None and state not in {state.value for state in FINISHED_STATES}

    def last_fire_times(self) -> dict[str, float]:
        """Each schedule's latest fire time in the ledger, whatever its outcome."""
        query = select(schedule_fires.c.schedule, func.max(schedule_fires.c.fire_time)).group_by(schedule_fires.c.schedule)
        with self.store.reading() as connection:
            return dict(connection.execute(query).all())

    def count_fires(self, *, after_id: int, settled_before: float) -> FireCounts:
        """The ledger's rows after row `after_id`, counted by schedule and outcome, with the
        latest fire time of each: what `engine.metrics.cluster` adds up scrape after scrape,
        reading only the rows added since. Two queries on a range of the primary key.

        Rows are settled up to the latest recorded before `settled_before`: a transaction
        that could still commit a row of a lower id (ids are taken at insert, not at commit)
        would have been open since, far longer than a claim's. The rows after it are recent:
        counted again next time.
        """
        newer = schedule_fires.c.id > after_id
        latest_settled = select(func.max(schedule_fires.c.id)).where(newer, schedule_fires.c.recorded_at < settled_before)
        with self.store.reading() as connection:
            settled_id = connection.execute(latest_settled).scalar() or after_id
            settled = (schedule_fires.c.id <= settled_id).label("settled")
            query = (
                select(settled, schedule_fires.c.schedule, schedule_fires.c.outcome, func.count(), func.max(schedule_fires.c.fire_time))
                .where(newer)
                .group_by(settled, schedule_fires.c.schedule, schedule_fires.c.outcome)
            )
            rows = connection.execute(query).all()
        counts: dict[bool, dict[tuple[str, FireOutcome], FireCount]] = {True: {}, False: {}}
        for is_settled, name, outcome, count, latest in rows:
            counts[bool(is_settled)][name, FireOutcome(outcome)] = FireCount(count, latest)
        return FireCounts(settled_id, counts[True], counts[False])

    def fires(self, name: str, *, limit: int = 20) -> list[Fire]:
        """The schedule's latest fires, newest first."""
        query = (
            select(schedule_fires)
            .where(schedule_fires.c.schedule == name)
            .order_by(schedule_fires.c.fire_time.desc())
            .limit(limit)
        )
        with self.store.reading() as connection:
            return [_fire(row) for row in connection.execute(query)]

    def last_fires(self) -> dict[str, Fire]:
        """Each schedule's latest fire."""
        latest = (
            select(schedule_fires.c.schedule, func.max(schedule_fires.c.fire_time).label("fire_time"))
            .group_by(schedule_fires.c.schedule)
            .subquery()
        )
        query = select(schedule_fires).join(
            latest, (latest.c.schedule == schedule_fires.c.schedule) & (latest.c.fire_time == schedule_fires.c.fire_time)
        )
        with self.store.reading() as connection:
            return {row.schedule: _fire(row) for row in connection.execute(query)}

    def purge_fires(self, *, older_than: float) -> int:
        """Delete ledger rows of fire times before `older_than`, but each schedule's latest
        (the start from which schedulers count missed fires). Returns how many went."""
        newest = (
            select(schedule_fires.c.schedule, func.max(schedule_fires.c.fire_time).label("fire_time"))
            .group_by(schedule_fires.c.schedule)
            .subquery()
        )
        old = (
            select(schedule_fires.c.id)
            .join(newest, newest.c.schedule == schedule_fires.c.schedule)
            .where(schedule_fires.c.fire_time < older_than, schedule_fires.c.fire_time < newest.c.fire_time)
        )
        with self.store.transaction() as connection:
            return connection.execute(delete(schedule_fires).where(schedule_fires.c.id.in_(old.scalar_subquery()))).rowcount


def _claim_order(claim: Claim) -> tuple[str, float]:
    return claim.schedule, claim.fire_time


def _bump(connection: Connection) -> None:
    connection.execute(update(schedule_versions).values(version=schedule_versions.c.version + 1))


def _row(schedule: Schedule) -> dict[str, Any]:
    data = schedule.model_dump(mode="json")
    return {**data, "args": json.dumps(data["args"]), "kwargs": json.dumps(data["kwargs"])}


def _stored(row: Any) -> StoredSchedule:
    fields = {name: getattr(row, name) for name in Schedule.model_fields}
    fields.update(args=json.loads(row.args), kwargs=json.loads(row.kwargs))
    return StoredSchedule(
        # Its actor was checked when it was saved, by a process that knew it.
        schedule=Schedule(**fields),
        origin=Origin(row.origin),
        created_at=row.created_at,
        updated_at=row.updated_at,
        active_since=row.active_since,
    )


def _fire(row: Any) -> Fire:
    return Fire(row.schedule, row.fire_time, FireOutcome(row.outcome), row.job_id, row.recorded_at, row.scheduler)
