"""The Python API: submit jobs and read them back.

These functions are what the CLI and the HTTP API call too, so a job submitted any way is
tracked and read the same way. ``actor.send()`` needs none of this: Tracking records it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Optional, Union

from dramatiq.errors import ActorNotFound

from .app import MAX_PRIORITY, get_broker, get_store
from .errors import DuplicateJob, EngineError, ResultNotReady, UnknownActor
from .job import Attempt, Job, JobState
from .middleware.cancellation import Cancellation
from .tracked_broker import TrackedBroker, sending_now


@dataclass(frozen=True)
class Page:
    """One page of `jobs()`: pass `next_cursor` back to get the next (None on the last page)."""

    jobs: list[Job]
    next_cursor: Optional[str]


def submit(
    actor_name: str,
    *args: Any,
    idempotency_key: Optional[str] = None,
    delay: Union[float, timedelta, None] = None,
    priority: Optional[int] = None,
    **kwargs: Any,
) -> Job:
    """Enqueue a job for the actor named `actor_name`.

    Parameters:
      actor_name(str): a registered actor.
      *args, **kwargs: the actor's arguments; they must be JSON-serializable.
      idempotency_key(str): a second submit with the same key returns the first job and
        enqueues nothing.
      delay(float|timedelta): seconds to wait before the job may start.
      priority(int): 0 (default) to 10; higher runs first among queued jobs.

    Returns:
      Job: the job as recorded (state `queued`, or `scheduled` when delayed).

    Raises:
      UnknownActor, InvalidArguments (they do not fit the actor), ArgumentsNotSerializable,
      EngineError (bad delay or priority), TrackingError (the store is unreachable; nothing
      was enqueued).
    """
    job, _ = submit_call(actor_name, args, kwargs, idempotency_key=idempotency_key, delay=delay, priority=priority)
    return job


def submit_call(
    actor_name: str,
    args: Union[list[Any], tuple[Any, ...]],
    kwargs: dict[str, Any],
    *,
    idempotency_key: Optional[str] = None,
    delay: Union[float, timedelta, None] = None,
    priority: Optional[int] = None,
) -> tuple[Job, bool]:
    """`submit` with the actor's arguments apart from the options, so that an actor may have a
    parameter named `priority` or `delay` (the HTTP API submits this way).

    Returns:
      (Job, bool): the job, and whether it is new (False: the idempotency key's first job).

    Raises:
      As `submit`.
    """
    broker, store = get_broker(), get_store()
    try:
        actor = broker.get_actor(actor_name)
    except ActorNotFound:
        raise UnknownActor(actor_name, list(broker.get_declared_actors())) from None
    if idempotency_key is not None:
        existing = store.find_by_idempotency_key(idempotency_key)
        if existing is not None:
            return existing, False
    options: dict[str, Any] = {"delay": _delay_ms(delay)}
    if idempotency_key is not None:
        options["idempotency_key"] = idempotency_key
    if priority is not None:
        if not 0 <= priority <= MAX_PRIORITY:
            raise EngineError(f"priority must be between 0 and {MAX_PRIORITY}, got {priority}")
        options["broker_priority"] = priority
    try:
        with sending_now():  # the job returned is one RabbitMQ has
            message = actor.send_with_options(args=tuple(args), kwargs=kwargs, **options)
    except DuplicateJob:  # another process submitted the same key between our lookup and insert
        return store.find_by_idempotency_key(idempotency_key), False  # type: ignore[arg-type, return-value]
    return store.get(message.message_id), True


def get(job_id: str) -> Job:
    """The job with this id. Raises: JobNotFound."""
    _read_own_sends(job_id)
    return get_store().get(job_id)


def result(job_id: str) -> Any:
    """The job's return value once it has succeeded.

    Raises:
      JobNotFound: no such job.
      ResultNotReady: the job has not succeeded (yet, or ever); `.state` says which.
    """
    _read_own_sends(job_id)
    state, encoded = get_store().get_result(job_id)
    if state != JobState.SUCCEEDED:
        raise ResultNotReady(job_id, state)
    return None if encoded is None else json.loads(encoded)


def attempts(job_id: str) -> list[Attempt]:
    """The job's audit trail, one entry per execution. Raises: JobNotFound."""
    _read_own_sends(job_id)
    return get_store().list_attempts(job_id)


def jobs(
    *,
    status: Union[JobState, str, None] = None,
    actor: Optional[str] = None,
    schedule: Optional[str] = None,
    limit: int = 50,
    cursor: Optional[str] = None,
) -> Page:
    """Jobs newest first, filtered by state, actor and the schedule that created them, a page
    at a time.

    Raises:
      EngineError: an unknown status, a limit outside 1..1000 or a malformed cursor.
    """
    if not 1 <= limit <= 1000:
        raise EngineError(f"limit must be between 1 and 1000, got {limit}")
    try:
        state = JobState(status) if status is not None else None
    except ValueError:
        raise EngineError(f"unknown status {status!r}; one of: {', '.join(JobState)}") from None
    _read_own_sends()
    page, next_cursor = get_store().list_jobs(
        state=state, actor=actor, schedule=schedule, limit=limit, cursor=cursor
    )
    return Page(page, next_cursor)


def retry(job_id: str) -> Job:
    """Requeue a failed or canceled job as a new attempt (its attempt history is kept).

    Raises:
      JobNotFound, InvalidJobState: the job is not failed or canceled.
    """
    store = get_store()
    job = store.requeue(job_id)
    with sending_now():
        get_broker().enqueue(job.message(store.message_options(job_id)))
    return store.get(job_id)


class CancelOutcome(StrEnum):
    """What `cancel` did."""

    CANCELED = "canceled"  # the job is canceled: it never started, or it was stopped already
    REQUESTED = "cancel-requested"  # it is running: its worker is interrupting it now
    ALREADY_FINISHED = "already-finished"  # it had succeeded or failed: nothing was changed


@dataclass(frozen=True)
class CancelResult:
    """The answer of `cancel`: the job as it is after the request, and what was done."""

    job: Job
    outcome: CancelOutcome


def cancel(job_id: str) -> CancelResult:
    """Cancel a job: a waiting one never starts, a running one is stopped within a second.

    A `scheduled` or `queued` job is `canceled` at once; whichever worker receives its message
    later skips it. A `running` job is interrupted by the worker process that runs it, on any
    host: `JobCanceled` is raised in its thread, wherever its code is, and the attempt is
    recorded as `canceled` (never retried). Code blocked in C or in a system call (a long
    ``time.sleep``, a socket read) stops when it returns to Python. The request is kept in the
    store, so a worker that missed it still stops the job within ``ENGINE_CANCEL_CHECK_INTERVAL_S``.

    Cancelling is idempotent: a job canceled already answers `canceled` again, a running one
    `cancel-requested` again; a job that succeeded or failed is left as it is
    (`already-finished`). A canceled job can be run again with `retry`.

    Parameters:
      job_id(str): the job to cancel.

    Returns:
      CancelResult: the job after the request and the `CancelOutcome`: `canceled`,
      `cancel-requested` (running: wait for its state to become `canceled`) or
      `already-finished`.

    Raises:
      JobNotFound: no job has this id.
    """
    _read_own_sends(job_id)
    job = get_store().request_cancel(job_id)
    if job.state == JobState.RUNNING:
        for middleware in get_broker().middleware:
            if isinstance(middleware, Cancellation):
                middleware.broadcast(job_id)
        return CancelResult(job, CancelOutcome.REQUESTED)
    if job.state == JobState.CANCELED:
        return CancelResult(job, CancelOutcome.CANCELED)
    return CancelResult(job, CancelOutcome.ALREADY_FINISHED)


def queue_depths() -> dict[str, dict[str, int]]:
    """How many messages each queue holds, by kind, from the broker.

    Returns:
      {queue: {"ready": n, "delayed": n, "dead": n, ...}}: ready to run, waiting for their due
      time, dead-lettered. The embedded broker adds "running" (delivered and not yet settled);
      RabbitMQ does not count delivered messages it has not had acknowledged.

    Raises:
      dramatiq.errors.BrokerConnectionError: the broker cannot be reached.
    """
    _read_own_sends()
    return get_broker().queue_depths()  # type: ignore[attr-defined]


def flush(timeout: Optional[float] = None) -> None:
    """Wait until every job this process sent with ``actor.send()`` is recorded and in RabbitMQ.

    Outside a worker, ``actor.send()`` returns as soon as the job is handed to a sender thread,
    which records it and hands it to RabbitMQ within milliseconds, in batches (`submit` waits
    instead). A process that exits flushes first. Embedded, every send is done when it returns.

    Parameters:
      timeout(float): seconds to wait at most.

    Raises:
      JobsNotSent: RabbitMQ did not take some of them, however long it was tried; each is
        `failed`, and `retry` sends it again. Each is reported once.
      TimeoutError: some are still being sent after `timeout` seconds.
    """
    broker = get_broker()
    if isinstance(broker, TrackedBroker):
        broker.wait_sent(timeout)


def _read_own_sends(job_id: Optional[str] = None) -> None:
    """Let a read see this process's own sends that are still on their way (see `flush`)."""
    broker = get_broker()
    if isinstance(broker, TrackedBroker):
        broker.settle_sends(job_id)


def _delay_ms(delay: Union[float, timedelta, None]) -> Optional[int]:
    if delay is None:
        return None
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
    if not isinstance(seconds, (int, float)) or seconds < 0:
        raise EngineError(f"delay must be a non-negative number of seconds or a timedelta, got {delay!r}")
    return int(seconds * 1000) or None
