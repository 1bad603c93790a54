"""The store's commands: a user's (cancel, retry by hand, purge), and those of the engine's own
parts (a job's progress, a worker's heartbeat, jobs whose message was never sent)."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional

from sqlalchemy import and_, delete, func, or_, select, update

from ..errors import InvalidJobState, JobNotFound
from ..job import RETRYABLE_STATES, Job, JobState
from ..redaction import mask
from .reads import Reads, finished_before, job_from_row
from .schema import attempts, jobs, workers
from .states import transition


class Commands(Reads):
    """What the store is told to do, each in a transaction of its own (or the caller's)."""

    # -- cancellation and retries --------------------------------------------------------------

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a job, or ask its worker to, in one transaction with the row locked.

        A `scheduled` or `queued` job becomes `canceled` at once (compare-and-set, with its
        finished_at): whichever worker receives its message later skips it. A `running` job
        stays `running` with ``cancel_requested_at`` set, durably: its worker interrupts it and
        records it `canceled`. A finished job is left as it is. ``cancel_requested_at`` keeps
        the first request's time when the job is canceled twice.

        Returns:
          Job: the job after the request: `canceled`, `running` (the request is recorded), or
          the finished state it already had.

        Raises:
          JobNotFound
        """
        now = time.time()
        with self.transaction() as connection:
            state = connection.execute(select(jobs.c.state).where(jobs.c.id == job_id).with_for_update()).scalar()
            if state is None:
                raise JobNotFound(job_id)
            requested = func.coalesce(jobs.c.cancel_requested_at, now)
            if state in (JobState.SCHEDULED, JobState.QUEUED):
                transition(connection, job_id, JobState.CANCELED, finished_at=now, cancel_requested_at=requested)
            elif state == JobState.RUNNING:
                connection.execute(
                    jobs.update().where(jobs.c.id == job_id).values(cancel_requested_at=requested, updated_at=now)
                )
            return self.get(job_id)

    def requeue(self, job_id: str) -> Job:
        """Move a failed or canceled job back to `queued` so that its message can be sent again.

        Raises:
          JobNotFound, InvalidJobState
        """
        with self.transaction() as connection:
            # The new run must not inherit the cancel request of the one before.
            reset = {"finished_at": None, "scheduled_for": None, "cancel_requested_at": None}
            if not transition(connection, job_id, JobState.QUEUED, from_states=RETRYABLE_STATES, **reset):
                job = self.get(job_id)
                raise InvalidJobState(f"job {job_id} is {job.state}; only failed or canceled jobs can be retried")
            return self.get(job_id)

    # -- progress and workers ------------------------------------------------------------------

    def set_progress(self, job_id: str, percent: float, message: Optional[str]) -> None:
        """Record progress of a running job (ignored once it has ended)."""
        with self.transaction() as connection:
            connection.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING)
                .values(progress_percent=percent, progress_message=message, updated_at=time.time())
            )

    def heartbeat(self, worker_id: str, *, host: str, pid: int) -> None:
        """Say that the worker process lives; its first heartbeat registers it."""
        now = time.time()
        beat = (
            self.dialect.insert(workers)
            .values(id=worker_id, host=host, pid=pid, started_at=now, heartbeat_at=now)
            .on_conflict_do_update(index_elements=["id"], set_={"heartbeat_at": now})
        )
        with self.transaction() as connection:
            connection.execute(beat)

    def mark_workers_stopped(
        self, *, worker_id: Optional[str] = None, host: Optional[str] = None, pid: Optional[int] = None
    ) -> None:
        """Record that a worker process is gone, by id or by host and pid (the supervisor knows
        only the pid of a child that died): its running jobs may be taken over at once."""
        condition = workers.c.id == worker_id if worker_id else and_(workers.c.host == host, workers.c.pid == pid)
        with self.transaction() as connection:
            connection.execute(
                update(workers).where(condition, workers.c.stopped_at.is_(None)).values(stopped_at=time.time())
            )

    # -- unsent messages -----------------------------------------------------------------------

    def claim_unsent(self, drained_queues: list[str], *, older_than_s: float, limit: int = 500) -> list[tuple[Job, dict[str, Any]]]:
        """Jobs whose message was most likely never sent, claimed for sending again (see
        `engine.middleware.resend`), with the options of their message. Untouched for
        `older_than_s` seconds, each is:

        - `queued` in one of `drained_queues` (queues whose messages RabbitMQ has all delivered);
        - or `scheduled` for more than `older_than_s` seconds ago.

        A claim sets the job's ``updated_at``: one process takes each job, and takes it again
        only after another `older_than_s`, should its message still not have come.
        """
        now = time.time()
        cutoff = now - older_than_s
        untouched = and_(jobs.c.created_at < cutoff, jobs.c.updated_at < cutoff)
        lost = and_(jobs.c.state == JobState.SCHEDULED, jobs.c.scheduled_for < cutoff)
        if drained_queues:
            lost = or_(and_(jobs.c.state == JobState.QUEUED, jobs.c.queue.in_(drained_queues)), lost)
        # No order: the scan stops at `limit` found, and what is left is found at the next look.
        candidates = select(jobs.c.id).where(untouched, lost).limit(limit)
        with self.transaction() as connection:
            claimed = connection.execute(
                update(jobs)
                .where(jobs.c.id.in_(candidates.scalar_subquery()), untouched, lost)
                .values(updated_at=now)
                .returning(*jobs.c)
            ).all()
        return [(job_from_row(row), json.loads(row.options)) for row in claimed]

    def forget_unsent(self, job_id: str, *, recorded_since: float) -> bool:
        """Delete the row of a new job whose message the broker did not take, so that no job
        waits as `queued` for a message that does not exist.

        Only a row recorded by that enqueue goes: still `queued` or `scheduled`, never started,
        and created at or after `recorded_since` (when the enqueue began). The row of a job
        recorded before (a retry, a delayed message falling due, a job requeued by hand) stays.

        Returns:
          bool: True if the row was deleted.
        """
        with self.transaction() as connection:
            deleted = connection.execute(
                delete(jobs).where(
                    jobs.c.id == job_id,
                    jobs.c.state.in_([JobState.QUEUED, JobState.SCHEDULED]),
                    jobs.c.attempts == 0,
                    jobs.c.created_at >= recorded_since,
                )
            )
        return deleted.rowcount == 1

    def fail_unsent(self, job_id: str, reason: str) -> bool:
        """Fail a job whose message the broker never took, long after it was sent (see
        `forget_unsent` for a sender still waiting): it is not left `queued` for a message
        that does not exist, and `engine retry` sends it again.

        Returns:
          bool: True if the job was waiting for that message (`queued` or `scheduled`, never
          started), and is now `failed`.
        """
        now = time.time()
        with self.transaction() as connection:
            failed = connection.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_([JobState.QUEUED, JobState.SCHEDULED]), jobs.c.attempts == 0)
                .values(state=JobState.FAILED, last_error=mask(reason), finished_at=now, updated_at=now)
            )
        return failed.rowcount == 1

    # -- retention -----------------------------------------------------------------------------

    def purge_finished(
        self, *, ended_before: float, batch_size: int = 1000, on_batch: Optional[Callable[[int], None]] = None
    ) -> int:
        """Delete finished jobs (and their attempts) that ended before `ended_before` (a time, in
        seconds since the epoch), one batch per transaction so that a large purge never holds a
        long lock. Returns how many went.

        `on_batch`, when given, is called with the running total after each batch that deleted
        jobs has been committed, e.g. to report progress.

        Raises:
          ValueError: batch_size below 1."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        purged = 0
        while True:
            with self.transaction() as connection:
                ids = (
                    connection.execute(select(jobs.c.id).where(finished_before(ended_before)).limit(batch_size))
                    .scalars()
                    .all()
                )
                if ids:
                    connection.execute(delete(attempts).where(attempts.c.job_id.in_(ids)))
                    connection.execute(delete(jobs).where(jobs.c.id.in_(ids)))
            purged += len(ids)
            if ids and on_batch is not None:
                on_batch(purged)
            if len(ids) < batch_size:
                return purged
