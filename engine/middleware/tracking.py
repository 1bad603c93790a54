"""Tracking: every job and every attempt recorded in the store.

The path of a job through this middleware:

- ``before_enqueue``: the job row is written before the message leaves, whoever sent it
  (``actor.send()``, ``engine.submit``, a retry, a delayed message becoming due). On the
  embedded broker this runs inside the broker's transaction, so the row and the message are
  committed together. If the row cannot be written, the enqueue is aborted.
- ``before_process_message``: compare-and-set to `running` and an attempt row (committed with
  the starts and ends of the process's other threads: `engine.writer`); a message whose
  job is finished or canceled is skipped (acked without running). A message whose job is
  already `running` under a live worker (a redelivery) is skipped too, and a re-check of it is
  scheduled: should that worker die before the job ends, the re-check runs it again.
- ``after_process_message``: the attempt's outcome and the job's end state, written before the
  message is acknowledged. It runs after Retries has decided (this middleware sits before
  Retries in the list, and Dramatiq calls ``after_*`` hooks in reverse), so a failed message is
  known to be final or to have been re-enqueued.

At each of these points Tracking hands what it decided (a job sent, an attempt started, taken
over from a dead worker, or ended with its outcome) to `engine.metrics.process`, one call each.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from dramatiq import Broker, Message, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.middleware import SkipMessage, TimeLimitExceeded
from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from ..errors import ArgumentsNotSerializable, JobCanceled, ResultNotSerializable, ResultTooLarge, TrackingError
from ..job import JobState, Outcome
from ..metrics import process as metrics
from ..store import AttemptEnd, AttemptRun, EnqueueRecord, StartRequest, Store
from ..tracked_broker import TrackedBroker, row_writes_collected
from ..writer import Pending
from .heartbeat import Heartbeat

#: Marks a message sent only to look at a running job again later: it records no new job.
RECHECK_OPTION = "engine_recheck"

#: Message options that describe one delivery, not the job: not kept for a later requeue.
_TRANSIENT_OPTIONS = frozenset({"eta", "retries", "traceback", "requeue_timestamp", RECHECK_OPTION, metrics.DUE_OPTION})

#: How long a stopping worker waits for its last store writes while the database is down.
SHUTDOWN_FLUSH_S = 10.0

#: The writes a worker thread hands in soon after its job's start is committed, when the job
#: is short: the job's end, and the start of the next (see `GroupCommit.submit`).
WRITES_AFTER_A_START = 2

#: Progress is written at most this often per job by default (``ENGINE_PROGRESS_INTERVAL_S``);
#: the last value always lands at the end.
DEFAULT_PROGRESS_INTERVAL_S = 0.5


@dataclass
class RunningAttempt:
    """The attempt running in this thread: what `engine.progress` reports against."""

    job_id: str
    number: int
    store: Store
    run: AttemptRun  # written with its end
    progress_interval_s: float
    cancel_requested: bool = False  # already when it started
    retry_enqueued: bool = False
    progress_written_at: float = 0.0
    pending_progress: Optional[tuple[float, Optional[str]]] = field(default=None)

    def report(self, percent: float, message: Optional[str]) -> None:
        now = time.monotonic()
        if now - self.progress_written_at >= self.progress_interval_s:
            self.store.set_progress(self.job_id, percent, message)
            self.progress_written_at = now
            self.pending_progress = None
        else:
            self.pending_progress = (percent, message)


#: The attempt the current worker thread runs, or None outside an actor.
current_attempt: ContextVar[Optional[RunningAttempt]] = ContextVar("current_attempt", default=None)


class _ResultsAreStored(logging.Filter):
    """Drops Dramatiq's warning that results are discarded without its Results middleware:
    Tracking stores them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Results middleware" not in record.getMessage()


class Tracking(Middleware):
    """Records jobs and attempts in `store`.

    Parameters:
      store(Store): where jobs and attempts are written.
      heartbeat(Heartbeat): this process's worker identity, recorded with each attempt.
      dead_after_s(float): a worker silent this long is dead, and its running jobs run again.
      result_max_bytes(int): results larger than this, JSON-encoded, fail the job.
      traceback_max_bytes(int): tracebacks are cut to their last this many characters.
      progress_interval_s(float): progress is written at most this often per job.

    With a `TrackedBroker` (`engine.tracked_broker`), a job's row sent later is handed to the
    broker rather than waited for, and so is the record of an attempt's end.
    """

    def __init__(
        self,
        store: Store,
        *,
        heartbeat: Heartbeat,
        dead_after_s: float,
        result_max_bytes: int,
        traceback_max_bytes: int,
        progress_interval_s: float = DEFAULT_PROGRESS_INTERVAL_S,
    ) -> None:
        self.store = store
        self.heartbeat = heartbeat
        self.dead_after_s = dead_after_s
        self.result_max_bytes = result_max_bytes
        self.traceback_max_bytes = traceback_max_bytes
        self.progress_interval_s = progress_interval_s
        self.host = socket.gethostname()
        logging.getLogger("dramatiq.worker.WorkerThread").addFilter(_ResultsAreStored())

    def before_enqueue(self, broker: Broker, message: Message, delay: Optional[int]) -> None:
        first_send = metrics.mark_due(message, delay)
        if message.options.get(RECHECK_OPTION):
            # The job's row exists and is `running`: nothing to record. Unless this is its
            # first send: a scheduler's fire, whose row the scheduler recorded.
            if first_send:
                metrics.job_enqueued(message)
            return
        row, delayed = self.enqueue_record(message, delay)
        recorded: Optional[Pending[None]] = None
        if self.store.in_transaction():
            # The embedded broker's enqueue: the row is committed with the message, or neither is.
            self._record_now(lambda: self.store.record_enqueue(row, delayed=delayed), message)
        else:
            row_writes = row_writes_collected()
            # Committed with the rows of the process's other sends; a row its sender does not
            # wait for waits out a database outage instead of failing.
            recorded = self.store.enqueue_later(row, delayed=delayed, wait_out_outage=row_writes is not None)
            if row_writes is not None:
                row_writes.append(recorded)  # the broker sends the message once its row is committed
            else:
                self._record_now(recorded.result, message)
        if first_send:
            metrics.job_enqueued(message, recorded)

    def enqueue_record(self, message: Message, delay: Optional[int]) -> EnqueueRecord:
        """The job row `before_enqueue` writes for `message`, for a caller that records many
        rows in a transaction of its own (the scheduler's fires, through the store's dialect).

        Raises:
          ArgumentsNotSerializable: the message's arguments are not JSON.
        """
        now = time.time()
        # A message given a delay, even none (a retry with no backoff), waits as `scheduled`
        # until it falls due: a running job may only move there (`REENQUEUE_TRANSITIONS`),
        # and its retry, recorded as `queued`, would leave it `running` for good.
        delayed = delay is not None
        try:
            args, kwargs = json.dumps(message.args), json.dumps(message.kwargs)
        except (TypeError, ValueError) as error:
            raise ArgumentsNotSerializable(
                f"arguments of {message.actor_name!r} must be JSON-serializable: {error}"
            ) from None
        options = {key: value for key, value in message.options.items() if key not in _TRANSIENT_OPTIONS}
        row = {
            "id": message.message_id,
            "actor": message.actor_name,
            "queue": q_name(message.queue_name),
            "args": args,
            "kwargs": kwargs,
            "options": json.dumps(options, default=str),
            "priority": message.options.get("broker_priority") or 0,
            "idempotency_key": message.options.get("idempotency_key"),
            "created_at": now,
            "scheduled_for": now + delay / 1000 if delay is not None else None,
        }
        return EnqueueRecord(row, delayed)

    @staticmethod
    def _record_now(write: Callable[[], object], message: Message) -> None:
        try:
            write()
        except SQLAlchemyError as error:
            raise TrackingError(f"could not record job {message.message_id} in the store: {error}") from error

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        request = StartRequest(
            message.message_id, self.host, os.getpid(), self.heartbeat.worker_id, self.dead_after_s, time.time()
        )
        start = self.store.start(request, next_writes=WRITES_AFTER_A_START)
        if start.running_elsewhere:
            logger.info("Job {} runs under a live worker; looking again in {} s.", message.message_id, self.dead_after_s)
            recheck = message.copy(options={**message.options, RECHECK_OPTION: True})
            broker.enqueue(recheck, delay=int(self.dead_after_s * 1000))
            raise SkipMessage(message.message_id)
        if start.number is None:
            logger.info("Skipping job {}: it is not runnable (finished, canceled or unknown).", message.message_id)
            raise SkipMessage(message.message_id)
        # From here on this message is the job's own: a retry of it must be recorded as one.
        message.options.pop(RECHECK_OPTION, None)
        assert start.started_at is not None  # a start that runs the job has its time
        if start.took_over:
            metrics.attempt_abandoned(message)
        metrics.attempt_started(message, start.started_at)
        run = request.run(start.started_at)
        current_attempt.set(
            RunningAttempt(message.message_id, start.number, self.store, run, self.progress_interval_s, start.cancel_requested)
        )

    def after_enqueue(self, broker: Broker, message: Message, delay: Optional[int]) -> None:
        attempt = current_attempt.get()
        if attempt is not None and attempt.job_id == message.message_id:
            attempt.retry_enqueued = True

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: Optional[BaseException] = None,
    ) -> None:
        attempt = current_attempt.get()
        if attempt is None or attempt.job_id != message.message_id:
            return
        current_attempt.set(None)
        if exception is None:
            self._record_success(broker, message, attempt, result)
            return
        if not message.failed and not attempt.retry_enqueued:
            # Retries could not re-enqueue it (the broker or the store was down): dead-letter
            # it and fail the job visibly rather than ack it away; `engine retry` can requeue it.
            logger.error("The retry of job {} could not be enqueued; failing it.", attempt.job_id)
            message.fail()
        self._record_failure(broker, message, attempt, exception)

    def _record_success(self, broker: Broker, message: MessageProxy, attempt: RunningAttempt, result: Any) -> None:
        try:
            encoded = self._encode_result(result)
        except (ResultTooLarge, ResultNotSerializable) as error:
            message.fail()
            self._finish(broker, message, attempt, Outcome.FAILED, state=JobState.FAILED, error=error)
        else:
            self._finish(broker, message, attempt, Outcome.SUCCEEDED, state=JobState.SUCCEEDED, result=encoded)

    def _record_failure(self, broker: Broker, message: MessageProxy, attempt: RunningAttempt, exception: BaseException) -> None:
        # Without failure, Retries has already moved the job to `scheduled` by re-enqueueing it.
        state = JobState.FAILED if message.failed else None
        if isinstance(exception, JobCanceled):  # never retried: Retries fails it at once
            outcome, state = Outcome.CANCELED, JobState.CANCELED
        elif isinstance(exception, TimeLimitExceeded):
            outcome = Outcome.TIMED_OUT
        elif message.failed:
            outcome = Outcome.FAILED
        else:
            outcome = Outcome.WILL_RETRY
        trace = "".join(traceback.format_exception(exception))[-self.traceback_max_bytes :]
        self._finish(broker, message, attempt, outcome, state=state, error=exception, traceback=trace)

    def _finish(self, broker: Broker, message: MessageProxy, attempt: RunningAttempt, outcome: Outcome, **fields: Any) -> None:
        end = AttemptEnd.of(
            attempt.job_id, attempt.number, outcome, run=attempt.run, progress=attempt.pending_progress, **fields
        )
        recorded = self.store.end(end)
        metrics.attempt_ended(message, outcome, attempt.run.started_at, recorded)
        # With a broker that settles the message once its end is recorded, the thread goes on
        # to its next job, so that this end and the next job's start are committed together.
        if not (isinstance(broker, TrackedBroker) and broker.settle_when_recorded(message, recorded)):
            recorded.result()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self.store.writer.close(timeout_s=SHUTDOWN_FLUSH_S)

    def _encode_result(self, result: Any) -> Optional[str]:
        if result is None:
            return None
        try:
            encoded = json.dumps(result)
        except (TypeError, ValueError) as error:
            raise ResultNotSerializable(f"the result must be JSON-serializable: {error}") from None
        if len(encoded) > self.result_max_bytes:
            raise ResultTooLarge(
                f"the result is {len(encoded):,} bytes as JSON; the limit is {self.result_max_bytes:,} "
                "(ENGINE_RESULT_MAX_BYTES): store large output elsewhere and return its location"
            )
        return encoded
