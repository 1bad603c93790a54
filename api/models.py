"""The requests and responses of the HTTP API: one pydantic model each.

The handlers validate with these models and answer with them, and ``/openapi.json`` is generated
from them (`api.openapi`): the description cannot drift from what the server does.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.client import CancelOutcome
from engine.job import Attempt, Job, JobState, Outcome, Worker
from scheduler.definition import Misfire, Origin
from scheduler.ledger import Fire, FireOutcome

def _utc(epoch: Optional[float]) -> Optional[datetime]:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=timezone.utc)


class _Request(BaseModel):
    """A request: unknown fields are refused, so a misspelt filter is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    pass


# -- errors --------------------------------------------------------------------------------------


class FieldError(_Response):
    field: str = Field(description="where: a body field (`kwargs.n`), a query parameter or a path part")
    message: str


class ErrorDetail(_Response):
    code: str = Field(description="stable, machine-readable: `job_not_found`, `invalid_fields`, ...")
    message: str = Field(description="what went wrong and what to do about it")
    fields: Optional[list[FieldError]] = Field(default=None, description="each invalid field (422)")
    request_id: str = Field(description="the `X-Request-Id` of the request, also in the server's log")


class ErrorResponse(_Response):
    """Every error, with a 4xx or 5xx status."""

    error: ErrorDetail


# -- jobs ----------------------------------------------------------------------------------------


class JobSubmission(_Request):
    """A job to enqueue."""

    actor: str = Field(min_length=1, max_length=200, description="a registered actor (GET /api/actors)")
    args: list[Any] = Field(default_factory=list, description="positional arguments, JSON values")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments, JSON values")
    idempotency_key: Optional[str] = Field(
        default=None, min_length=1, max_length=255, description="the same key again returns the first job (200)"
    )
    delay_ms: Optional[int] = Field(default=None, ge=0, le=366 * 86_400_000, description="wait before it may start")
    priority: Optional[int] = Field(default=None, ge=0, le=10, description="0 (default) to 10; higher first")


class Progress(_Response):
    percent: Optional[float] = Field(description="0 to 100, as the job last reported")
    message: Optional[str]


class JobOut(_Response):
    """A job: its state, progress, timestamps, attempts so far and last error."""

    id: str
    actor: str
    queue: str
    state: JobState
    args: list[Any]
    kwargs: dict[str, Any]
    priority: int
    idempotency_key: Optional[str]
    attempts: int = Field(description="attempts started so far")
    progress: Progress
    last_error: Optional[str]
    created_at: datetime
    scheduled_for: Optional[datetime] = Field(description="when a delayed job or a retry is due")
    started_at: Optional[datetime] = Field(description="the latest attempt's start")
    finished_at: Optional[datetime]
    schedule: Optional[str] = Field(description="the cron schedule that created it")
    fire_time: Optional[datetime] = Field(description="the schedule's fire time it is for (not when it was sent)")

    @classmethod
    def of(cls, job: Job) -> "JobOut":
        return cls(
            id=job.id, actor=job.actor, queue=job.queue, state=job.state, args=job.args, kwargs=job.kwargs,
            priority=job.priority, idempotency_key=job.idempotency_key, attempts=job.attempts,
            progress=Progress(percent=job.progress_percent, message=job.progress_message), last_error=job.last_error,
            created_at=_utc(job.created_at), scheduled_for=_utc(job.scheduled_for), started_at=_utc(job.started_at),
            finished_at=_utc(job.finished_at), schedule=job.schedule, fire_time=_utc(job.fire_time),
        )  # fmt: skip


class _CreationFilter(_Request):
    actor: Optional[str] = Field(default=None, min_length=1, max_length=200)
    schedule: Optional[str] = Field(default=None, min_length=1, max_length=100, description="jobs this schedule created")
    queue: Optional[str] = Field(default=None, min_length=1, max_length=200)
    created_after: Optional[datetime] = Field(default=None, description="ISO 8601; without a zone, UTC")
    created_before: Optional[datetime] = Field(default=None, description="ISO 8601; without a zone, UTC")

    @field_validator("created_after", "created_before", mode="before")
    @classmethod
    def _iso_8601(cls, value: Any) -> Any:
        # pydantic would also take a number, as seconds since the epoch: the description says ISO 8601.
        if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().lstrip("+-").replace(".", "").isdigit()):
            raise ValueError("expected a date and time in ISO 8601, e.g. 2026-01-31T12:00:00Z")
        return value

    @field_validator("created_after", "created_before")
    @classmethod
    def _aware(cls, value: Optional[datetime]) -> Optional[datetime]:
        return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


class JobQuery(_CreationFilter):
    """Filters and paging of GET /api/jobs."""

    status: Optional[JobState] = None
    limit: int = Field(default=50, ge=1, le=1000)
    cursor: Optional[str] = Field(
        default=None, max_length=500, pattern=r"^[A-Za-z0-9_=-]+$", description="`next_cursor` of the previous page"
    )


class JobPage(_Response):
    """Jobs newest first; pass `next_cursor` as `cursor` for the next page (null on the last)."""

    jobs: list[JobOut]
    next_cursor: Optional[str]


class JobResult(_Response):
    job_id: str
    result: Any = Field(description="the actor's return value, as JSON")


class AttemptOut(_Response):
    """One execution of a job."""

    number: int
    worker_host: str
    worker_pid: int
    started_at: datetime
    finished_at: Optional[datetime]
    duration_ms: Optional[float]
    outcome: Optional[Outcome] = Field(description="null while it runs")
    error_type: Optional[str]
    error_message: Optional[str]
    traceback: Optional[str]

    @classmethod
    def of(cls, attempt: Attempt) -> "AttemptOut":
        return cls(
            number=attempt.number, worker_host=attempt.worker_host, worker_pid=attempt.worker_pid,
            started_at=_utc(attempt.started_at), finished_at=_utc(attempt.finished_at),
            duration_ms=attempt.duration_ms, outcome=attempt.outcome, error_type=attempt.error_type,
            error_message=attempt.error_message, traceback=attempt.traceback,
        )  # fmt: skip


class AttemptList(_Response):
    """The audit trail, oldest attempt first."""

    job_id: str
    attempts: list[AttemptOut]


class CancelOut(_Response):
    outcome: CancelOutcome = Field(description="canceled, cancel-requested (running: its worker stops it) or already-finished")
    job: JobOut


class BulkRetry(_CreationFilter):
    """Which failed (or canceled) jobs to retry, newest first, at most `limit` of them."""

    status: Literal["failed", "canceled"] = "failed"
    limit: int = Field(default=100, ge=1, le=1000)


class RetryFailure(_Response):
    job_id: str
    message: str


class BulkRetryOut(_Response):
    retried: list[str] = Field(description="ids of the jobs requeued")
    failures: list[RetryFailure] = Field(description="jobs that matched but could not be requeued")
    more: bool = Field(description="more jobs match than `limit`: send the request again for them")


# -- actors, queues, workers ---------------------------------------------------------------------


class ActorOut(_Response):
    name: str
    queue: str
    priority: int
    max_retries: int
    min_backoff_ms: int
    max_backoff_ms: int
    time_limit_ms: int


class ActorList(_Response):
    actors: list[ActorOut]


class QueueOut(_Response):
    name: str
    ready: int = Field(description="waiting to run")
    delayed: int = Field(description="waiting for their due time (delays and retry backoffs)")
    dead: int = Field(description="dead-lettered")
    running: Optional[int] = Field(default=None, description="delivered and not settled (embedded broker only)")


class QueueList(_Response):
    queues: list[QueueOut]


class WorkerOut(_Response):
    id: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_s: float
    stopped_at: Optional[datetime]
    alive: bool = Field(description="not stopped, and heard from within ENGINE_WORKER_DEAD_AFTER_S")
    running_jobs: list[str]

    @classmethod
    def of(cls, worker: Worker, *, now: float, dead_after_s: float) -> "WorkerOut":
        return cls(
            id=worker.id, host=worker.host, pid=worker.pid, started_at=_utc(worker.started_at),
            heartbeat_at=_utc(worker.heartbeat_at), heartbeat_age_s=round(max(0.0, now - worker.heartbeat_at), 3),
            stopped_at=_utc(worker.stopped_at), alive=worker.alive(now=now, dead_after_s=dead_after_s),
            running_jobs=worker.running_jobs,
        )  # fmt: skip


class WorkerList(_Response):
    """Worker processes heard from in the last hour, live or dead, newest start first."""

    workers: list[WorkerOut]


class StateCounts(_Response):
    scheduled: int
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int


class Overview(_Response):
    """The engine at a glance."""

    jobs: StateCounts = Field(description="every job in the store, by state")
    last_hour: StateCounts = Field(description="the jobs created in the last hour, by the state they are in now")
    queues: Optional[list[QueueOut]] = Field(description="null when the broker cannot be reached")
    workers_alive: int


# -- schedules ----------------------------------------------------------------------------------


class _ScheduleFields(_Request):
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    timezone: str = Field(default="UTC", description="IANA zone in which the cron fields are read")
    enabled: bool = True
    misfire: Misfire = Field(default=Misfire.ONCE, description="a fire later than misfire_grace_s: one catch-up job, or none")
    misfire_grace_s: float = Field(default=300.0, ge=0)
    overlap: bool = Field(default=True, description="false: a fire while the previous fire's job runs is skipped")
    queue: Optional[str] = Field(default=None, min_length=1, max_length=200)
    priority: Optional[int] = Field(default=None, ge=0, le=10)


class ScheduleIn(_ScheduleFields):
    """A new cron schedule."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[a-z0-9_.-]+$", description="its id")
    actor: str = Field(min_length=1, max_length=200)
    cron: str = Field(min_length=1, max_length=200, description="5 fields, or 6 with seconds first")


class ScheduleChange(_Request):
    """The fields to change; `enabled` alone pauses or resumes it."""

    actor: Optional[str] = Field(default=None, min_length=1, max_length=200)
    cron: Optional[str] = Field(default=None, min_length=1, max_length=200)
    args: Optional[list[Any]] = None
    kwargs: Optional[dict[str, Any]] = None
    timezone: Optional[str] = None
    enabled: Optional[bool] = None
    misfire: Optional[Misfire] = None
    misfire_grace_s: Optional[float] = Field(default=None, ge=0)
    overlap: Optional[bool] = None
    queue: Optional[str] = Field(default=None, min_length=1, max_length=200)
    priority: Optional[int] = Field(default=None, ge=0, le=10)


class FireOut(_Response):
    """One row of a schedule's fire ledger."""

    fire_time: datetime
    outcome: FireOutcome
    job_id: Optional[str]
    recorded_at: datetime
    scheduler: str

    @classmethod
    def of(cls, fire: Fire) -> "FireOut":
        return cls(fire_time=_utc(fire.fire_time), outcome=fire.outcome, job_id=fire.job_id,
                   recorded_at=_utc(fire.recorded_at), scheduler=fire.scheduler)  # fmt: skip


class ScheduleOut(_ScheduleFields):
    """A schedule, who owns it, its latest fire and its next."""

    model_config = ConfigDict(extra="ignore")
    name: str
    actor: str
    cron: str
    origin: Origin
    created_at: datetime
    updated_at: datetime
    last_fire: Optional[FireOut]
    next_fire_time: Optional[datetime] = Field(description="in its zone; null while paused")

    @classmethod
    def of(cls, info: Any) -> "ScheduleOut":
        return cls(
            **info.schedule.model_dump(), origin=info.origin, created_at=_utc(info.created_at),
            updated_at=_utc(info.updated_at), last_fire=FireOut.of(info.last_fire) if info.last_fire else None,
            next_fire_time=info.next_fire_time,
        )  # fmt: skip


class ScheduleList(_Response):
    schedules: list[ScheduleOut]


class FireQuery(_Request):
    limit: int = Field(default=20, ge=1, le=1000)


class FireList(_Response):
    """The fire ledger, newest first: enqueued (with the job's id), missed and skipped fire times."""

    schedule: str
    fires: list[FireOut]


class PreviewQuery(_Request):
    count: int = Field(default=5, ge=1, le=100)


class Preview(_Response):
    """The next fire times, in the schedule's zone."""

    schedule: str
    fire_times: list[datetime]


# -- health and the description ------------------------------------------------------------------


class Health(_Response):
    status: Literal["ok"] = "ok"


class Readiness(_Response):
    status: Literal["ready"] = "ready"
    store: Literal["ok"] = "ok"
    broker: Literal["ok"] = "ok"


class OpenApiDocument(_Response):
    """This API's OpenAPI 3.1 description."""

    model_config = ConfigDict(extra="allow")
    openapi: str

