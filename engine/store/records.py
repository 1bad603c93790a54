"""The records the store's writes take: a send's job row, an attempt's start and its end.

They are plain tuples: a worker makes two or three of them per job, and the writer hands a
batch of them to one statement (`engine.store.dialect.Dialect`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Optional, Union

from sqlalchemy.exc import IntegrityError

from ..errors import DuplicateJob
from ..job import JobState, Outcome


class AttemptStart(NamedTuple):
    """What `Dialect.start_attempts` decided for one delivery.

    Attributes:
      number(int): the new attempt's number when the job is to run now, else None.
      running_elsewhere(bool): the job is running under a live worker: look again later, as
        that worker may still die before it ends.
      cancel_requested(bool): the job is to run, but its cancel was requested already.
      undecided(bool): the writer's one statement on PostgreSQL (`Dialect.record_attempts`)
        found the job not queued, or ending in the same batch: `Dialect.start_attempts` decides.
      started_at(float): the start's time as the job's row has it, for the attempt's row.
      took_over(bool): the job was running under a dead worker: this start closed that
        attempt as `abandoned` (counted by `engine.metrics.process`).
    """

    number: Optional[int]
    running_elsewhere: bool = False
    cancel_requested: bool = False
    undecided: bool = False
    started_at: Optional[float] = None  # when the job runs now: the start as committed
    took_over: bool = False


class StartRequest(NamedTuple):
    """A delivered job to start, and the worker process that is to run it.

    `requested_at` (``time.time()`` when the worker asked), kept as the attempt's
    ``start_token``, tells the start apart from any other of the job: a batch tried again after
    its connection failed may find its own start committed by the first try, and must not take
    it for another worker's (see `AttemptWrites.start_attempts`).
    """

    job_id: str
    host: str
    pid: int
    worker_id: Optional[str]
    dead_after_s: float
    requested_at: float

    def run(self, started_at: float) -> "AttemptRun":
        """The attempt this request started at `started_at`."""
        return AttemptRun(self.host, self.pid, self.worker_id, started_at, self.requested_at)


class AttemptRun(NamedTuple):
    """Who ran an attempt, and from when: kept by its worker while it runs, and written into
    the attempt's row, with how it ended, in one insert."""

    host: str
    pid: int
    worker_id: Optional[str]
    started_at: float
    start_token: Optional[float]


class AttemptEnd(NamedTuple):
    """How an attempt ended, to be recorded by `Dialect.finish_attempts`, with who ran it (the
    fields of `AttemptRun`). When `state` is None, the job's state was moved already (a retry
    set it to `scheduled`)."""

    job_id: str
    number: int
    outcome: Outcome
    state: Optional[JobState]
    result: Optional[str]
    last_error: Optional[str]
    error_type: Optional[str]
    error_message: Optional[str]
    traceback: Optional[str]
    progress_percent: Optional[float]
    progress_message: Optional[str]
    host: str
    pid: int
    worker_id: Optional[str]
    started_at: float
    start_token: Optional[float]

    @classmethod
    def of(
        cls,
        job_id: str,
        number: int,
        outcome: Outcome,
        *,
        run: AttemptRun,
        state: Optional[JobState] = None,
        result: Optional[str] = None,
        error: Optional[BaseException] = None,
        traceback: Optional[str] = None,
        progress: Optional[tuple[float, Optional[str]]] = None,
    ) -> "AttemptEnd":
        percent, message = progress or (None, None)
        if error is None:
            return cls(job_id, number, outcome, state, result, None, None, None, traceback, percent, message, *run)
        # PostgreSQL text holds no NUL, and an exception's message may.
        error_type, error_message = type(error).__name__, str(error).replace("\0", "\ufffd")
        last_error = f"{error_type}: {error_message}"
        return cls(
            job_id, number, outcome, state, result, last_error, error_type, error_message, traceback, percent, message, *run
        )

    def parameters(self, now: float) -> dict[str, Any]:
        """For `_END_JOB`, executed with many ends at once."""
        return {"now": now, **{f"b_{name}": value for name, value in zip(self._fields, self)}}

    def attempt_row(self, now: float) -> dict[str, Any]:
        """The attempt's row, ended at `now`."""
        return {
            "job_id": self.job_id,
            "number": self.number,
            "worker_host": self.host,
            "worker_pid": self.pid,
            "worker_id": self.worker_id,
            "started_at": self.started_at,
            "start_token": self.start_token,
            "finished_at": now,
            "duration_ms": (now - self.started_at) * 1000,
            "outcome": self.outcome,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "traceback": self.traceback,
        }


class EnqueueRecord(NamedTuple):
    """The job row of a message being enqueued (see `Dialect.record_enqueues`)."""

    row: dict[str, Any]
    delayed: bool

    @property
    def state(self) -> JobState:
        return JobState.SCHEDULED if self.delayed else JobState.QUEUED


#: A write of Tracking's: the start or the end of an attempt.
AttemptRecord = Union[StartRequest, AttemptEnd]


@contextmanager
def duplicate_keys_named(records: list[EnqueueRecord]) -> Iterator[None]:
    """Raise a batch of one whose idempotency key another job holds as `DuplicateJob`.

    Raises:
      DuplicateJob: the batch's one row collides.
      IntegrityError: a batch of several collides (the writer then tries each alone).
    """
    try:
        yield
    except IntegrityError:
        if len(records) > 1:
            raise
        raise DuplicateJob(records[0].row["idempotency_key"]) from None
