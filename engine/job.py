"""The job model: states, the transitions between them, and the records users read.

A reader sees the whole life of a job here. Every state change in the store is a
compare-and-set from the states listed in `TRANSITIONS`, so a redelivered or duplicate message
can never run a finished job again nor overwrite a newer state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, Optional

from dramatiq import Message


class JobState(StrEnum):
    """Where a job is in its life. `succeeded`, `failed` and `canceled` are final."""

    SCHEDULED = "scheduled"  # delayed, or waiting out a retry backoff
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # retries exhausted, a permanent error, or out of time with no retry left
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})

#: For each state, the states a job may be in just before it. Read as "to <key> from <values>".
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # A retry waits out its backoff as `scheduled`.
    JobState.SCHEDULED: frozenset({JobState.RUNNING}),
    # A delayed message becomes due; a failed or canceled job is retried by hand.
    JobState.QUEUED: frozenset({JobState.SCHEDULED, JobState.FAILED, JobState.CANCELED}),
    # Brokers that keep due times themselves deliver a `scheduled` job directly.
    JobState.RUNNING: frozenset({JobState.QUEUED, JobState.SCHEDULED}),
    JobState.SUCCEEDED: frozenset({JobState.RUNNING}),
    JobState.FAILED: frozenset({JobState.RUNNING}),
    JobState.CANCELED: frozenset({JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING}),
}

#: The narrower moves of a job whose message is sent again by the broker or by Retries: a retry
#: starts its backoff, a delayed message falls due. A finished job never moves this way (only
#: `engine.retry` requeues one), so a stale message cannot revive a canceled job.
REENQUEUE_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.SCHEDULED: frozenset({JobState.RUNNING}),
    JobState.QUEUED: frozenset({JobState.SCHEDULED}),
}


#: The jobs `engine.retry` runs again: a scheduled, queued or running job is still on its way.
RETRYABLE_STATES = frozenset({JobState.FAILED, JobState.CANCELED})


class Outcome(StrEnum):
    """How one attempt ended: in the attempt's row, or in its job's row for the attempt that
    ended the job as `succeeded` (see `engine.store.schema`)."""

    SUCCEEDED = "succeeded"
    WILL_RETRY = "error-will-retry"
    FAILED = "failed"
    TIMED_OUT = "timed-out"
    CANCELED = "canceled"
    ABANDONED = "abandoned"  # its worker died before it could record an end


def _iso(epoch: Optional[float]) -> Optional[str]:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Job:
    """One job as the store knows it. Timestamps are seconds since the epoch (UTC)."""

    id: str
    actor: str
    queue: str
    state: JobState
    args: list[Any]
    kwargs: dict[str, Any]
    priority: int
    idempotency_key: Optional[str]
    attempts: int
    progress_percent: Optional[float]
    progress_message: Optional[str]
    last_error: Optional[str]
    created_at: float
    scheduled_for: Optional[float]
    started_at: Optional[float]
    finished_at: Optional[float]
    schedule: Optional[str] = None  # the cron schedule that created it
    fire_time: Optional[float] = None  # the schedule's fire time it is for (not when it was sent)

    def message(self, options: dict[str, Any]) -> Message:
        """The message that runs this job (its id is the job's), sent with `options`: how the
        job is sent again."""
        return Message(
            queue_name=self.queue,
            actor_name=self.actor,
            args=tuple(self.args),
            kwargs=self.kwargs,
            options=options,
            message_id=self.id,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view, timestamps in ISO 8601."""
        data = asdict(self)
        for name in ("created_at", "scheduled_for", "started_at", "finished_at", "fire_time"):
            data[name] = _iso(data[name])
        data["progress"] = {"percent": data.pop("progress_percent"), "message": data.pop("progress_message")}
        return data


@dataclass(frozen=True)
class Attempt:
    """One execution of a job: who ran it, when, and how it ended."""

    job_id: str
    number: int
    worker_host: str
    worker_pid: int
    started_at: float
    finished_at: Optional[float]
    duration_ms: Optional[float]
    outcome: Optional[Outcome]
    error_type: Optional[str]
    error_message: Optional[str]
    traceback: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view, timestamps in ISO 8601."""
        data = asdict(self)
        data["started_at"] = _iso(self.started_at)
        data["finished_at"] = _iso(self.finished_at)
        return data


@dataclass(frozen=True)
class Worker:
    """One worker process as its heartbeats tell: alive while they keep coming."""

    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    stopped_at: Optional[float]  # a graceful stop, or its death seen by the supervisor
    running_jobs: list[str]  # ids of the jobs it runs now

    def alive(self, *, now: float, dead_after_s: float) -> bool:
        """Whether it runs: not stopped, and heard from within `dead_after_s`."""
        return self.stopped_at is None and now - self.heartbeat_at < dead_after_s
