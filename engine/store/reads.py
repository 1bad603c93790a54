"""The store's reads: jobs, their attempts (the audit trail), counts, and the figures of reports.

A job's attempts are its rows in `attempts`, and, for the attempt that runs now or that ended
the job as `succeeded`, the job's own row (see `engine.store.schema`): the reads put them together.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from typing import Any, Optional

from sqlalchemy import Connection, and_, case, func, or_, select, tuple_

from ..errors import EngineError, JobNotFound
from ..job import FINISHED_STATES, Attempt, Job, JobState, Outcome, Worker
from .database import Database
from .records import AttemptRun
from .schema import attempts, jobs, workers


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(created_at), str(job_id)
    except (ValueError, TypeError) as error:
        raise EngineError(f"malformed cursor {cursor!r}: pass back the next_cursor of a previous page") from error


class Reads(Database):
    """What the store answers about jobs, their attempts and their numbers."""

    def get(self, job_id: str) -> Job:
        """Raises: JobNotFound."""
        with self.reading() as connection:
            row = connection.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(job_id)
        return job_from_row(row)

    def get_result(self, job_id: str) -> tuple[JobState, Optional[str]]:
        """The job's state and its JSON-encoded result (None until it succeeds)."""
        with self.reading() as connection:
            row = connection.execute(select(jobs.c.state, jobs.c.result).where(jobs.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(job_id)
        return JobState(row.state), row.result

    def message_options(self, job_id: str) -> dict[str, Any]:
        """The options the job's message was sent with, to send it again."""
        with self.reading() as connection:
            options = connection.execute(select(jobs.c.options).where(jobs.c.id == job_id)).scalar()
        if options is None:
            raise JobNotFound(job_id)
        return json.loads(options)

    def list_attempts(self, job_id: str) -> list[Attempt]:
        """The audit trail of a job, oldest attempt first. Its latest attempt, while it runs and
        once it has ended the job as `succeeded`, is read from the job's row when it has no row
        of its own (see `engine.store.schema`). Raises: JobNotFound."""
        with self.reading() as connection:
            latest = latest_attempt(connection, job_id)
            if latest is None:
                raise JobNotFound(job_id)
            rows = connection.execute(
                select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.number)
            ).all()
        trail = [_attempt(row) for row in rows]
        if latest.host is not None and latest.attempts not in {attempt.number for attempt in trail}:
            if latest.state in (JobState.RUNNING, JobState.SUCCEEDED):
                # Unless an earlier attempt, taken for abandoned but alive, ended the job: the
                # end of this one is not known yet.
                ended_it = latest.state == JobState.SUCCEEDED and Outcome.SUCCEEDED not in {a.outcome for a in trail}
                trail.append(_attempt_in_job(job_id, latest, ended_it))
        return trail

    def list_jobs(
        self,
        *,
        state: Optional[JobState] = None,
        actor: Optional[str] = None,
        queue: Optional[str] = None,
        schedule: Optional[str] = None,
        limit: int = 50,
        cursor: Optional[str] = None,
        created_since: Optional[float] = None,
        created_before: Optional[float] = None,
    ) -> tuple[list[Job], Optional[str]]:
        """Jobs newest first, optionally filtered (each filter has an index on it and
        ``created_at``); returns the page and the cursor of the next."""
        query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        if state is not None:
            query = query.where(jobs.c.state == state)
        if actor is not None:
            query = query.where(jobs.c.actor == actor)
        if queue is not None:
            query = query.where(jobs.c.queue == queue)
        if schedule is not None:
            query = query.where(jobs.c.schedule == schedule)
        if created_since is not None:
            query = query.where(jobs.c.created_at >= created_since)
        if created_before is not None:
            query = query.where(jobs.c.created_at < created_before)
        if cursor is not None:
            query = query.where(tuple_(jobs.c.created_at, jobs.c.id) < tuple_(*decode_cursor(cursor)))
        with self.reading() as connection:
            rows = connection.execute(query).all()
        page = [job_from_row(row) for row in rows[:limit]]
        next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
        return page, next_cursor

    def count_by_state(self, *, created_since: Optional[float] = None) -> dict[JobState, int]:
        """How many jobs are in each state (states with none are 0)."""
        query = select(jobs.c.state, func.count()).group_by(jobs.c.state)
        if created_since is not None:
            query = query.where(jobs.c.created_at >= created_since)
        with self.reading() as connection:
            counts = dict(connection.execute(query).all())
        return {state: counts.get(state, 0) for state in JobState}

    def oldest_waiting_by_queue(self, *, now: float) -> dict[str, float]:
        """Since when (seconds since the epoch) the longest-waiting job of each queue has been
        due and not started, for the queues that have one:

        - a `queued` job since it was queued: its ``updated_at``, which nothing else changes
          while it is queued but the resend's claim (`claim_unsent`), which sends it again;
        - a `scheduled` job (a delay, a retry's backoff) since its due time, once past: the
          brokers start such a job without moving it to `queued`.

        One query, through ``ix_jobs_state_created``: it reads every queued and scheduled job.
        """
        waiting = (jobs.c.state == JobState.QUEUED) | (jobs.c.scheduled_for <= now)
        since = case((jobs.c.state == JobState.QUEUED, jobs.c.updated_at), else_=jobs.c.scheduled_for)
        query = (
            select(jobs.c.queue, func.min(since))
            .where(jobs.c.state.in_([JobState.QUEUED, JobState.SCHEDULED]), waiting)
            .group_by(jobs.c.queue)
        )
        with self.reading() as connection:
            return dict(connection.execute(query).all())

    def list_workers(self, *, seen_since: float) -> list[Worker]:
        """Worker processes whose last heartbeat is at or after `seen_since`, live or not,
        newest start first, each with the jobs it is running."""
        query = select(workers).where(workers.c.heartbeat_at >= seen_since).order_by(workers.c.started_at.desc())
        running = select(jobs.c.attempt_worker_id, jobs.c.id).where(jobs.c.state == JobState.RUNNING)
        with self.reading() as connection:
            rows = connection.execute(query).all()
            jobs_of: dict[str, list[str]] = {}
            for worker_id, job_id in connection.execute(running):
                jobs_of.setdefault(worker_id, []).append(job_id)
        return [
            Worker(id=row.id, host=row.host, pid=row.pid, started_at=row.started_at, heartbeat_at=row.heartbeat_at,
                   stopped_at=row.stopped_at, running_jobs=sorted(jobs_of.get(row.id, [])))  # fmt: skip
            for row in rows
        ]

    # -- cancellation --------------------------------------------------------------------------

    def find_by_idempotency_key(self, key: str) -> Optional[Job]:
        with self.reading() as connection:
            found = connection.execute(select(jobs).where(jobs.c.idempotency_key == key)).first()
        return job_from_row(found) if found else None

    def cancel_requests(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs have a cancel request: a worker asks about the jobs it runs."""
        if not job_ids:
            return set()
        query = select(jobs.c.id).where(jobs.c.id.in_(job_ids), jobs.c.cancel_requested_at.is_not(None))
        with self.reading() as connection:
            return set(connection.execute(query).scalars())

    def count_finished_before(self, ended_before: float) -> int:
        """How many jobs `purge_finished` would delete for this cutoff (a time, in seconds
        since the epoch)."""
        with self.reading() as connection:
            return connection.execute(select(func.count()).where(finished_before(ended_before))).scalar_one()

    def count_by_actor_and_state(self, *, created_since: float) -> list[tuple[str, JobState, int]]:
        """How many jobs of each actor are in each state, among those created since
        `created_since`: one query, so that the counts by actor and by state add up."""
        query = (
            select(jobs.c.actor, jobs.c.state, func.count())
            .where(jobs.c.created_at >= created_since)
            .group_by(jobs.c.actor, jobs.c.state)
        )
        with self.reading() as connection:
            return [(actor, JobState(state), count) for actor, state, count in connection.execute(query)]

    def attempt_durations_by_actor(self, *, created_since: float) -> dict[str, list[float]]:
        """The duration in milliseconds of every ended attempt of the jobs created since
        `created_since`, sorted, by actor."""
        ended = _ended_attempt_durations(created_since).subquery()
        query = select(ended.c.actor, ended.c.duration_ms).order_by(ended.c.actor, ended.c.duration_ms)
        durations: dict[str, list[float]] = defaultdict(list)
        with self.reading() as connection:
            for actor, duration in connection.execute(query):
                durations[actor].append(duration)
        return dict(durations)



def _ended_attempt_durations(since: float) -> Any:
    """A query of (actor, duration_ms), one row per ended attempt of the jobs created since
    `since`: the attempts' rows, and the attempts that ended their job as `succeeded` and that
    only their job's row holds (see `engine.store.schema`)."""
    with_rows = (
        select(jobs.c.actor, attempts.c.duration_ms)
        .join(attempts, attempts.c.job_id == jobs.c.id)
        .where(jobs.c.created_at >= since, attempts.c.duration_ms.is_not(None))
    )
    # A row for its latest attempt, or for an attempt taken for abandoned that ended it after all.
    in_a_row = or_(attempts.c.number == jobs.c.attempts, attempts.c.outcome == Outcome.SUCCEEDED)
    in_job_rows = select(jobs.c.actor, ((jobs.c.finished_at - jobs.c.started_at) * 1000).label("duration_ms")).where(
        jobs.c.created_at >= since, jobs.c.state == JobState.SUCCEEDED, jobs.c.attempt_host.is_not(None),
        ~select(attempts.c.id).where(attempts.c.job_id == jobs.c.id, in_a_row).exists(),
    )  # fmt: skip
    return with_rows.union_all(in_job_rows)


def _open_attempt_row() -> Any:
    """The job's latest attempt row, when it is still open: only a worker of schema 5 or older
    opens one (a rolling upgrade, or a job it started before the migration)."""
    return and_(attempts.c.job_id == jobs.c.id, attempts.c.number == jobs.c.attempts, attempts.c.finished_at.is_(None))


def latest_attempt(connection: Connection, job_id: str) -> Any:
    """The job's state, attempt count, cancel request and start, who runs its latest attempt
    (`_running_attempt`) and that worker's heartbeat; None for an unknown job."""
    run = _running_attempt()
    return connection.execute(
        select(
            jobs.c.state, jobs.c.attempts, jobs.c.cancel_requested_at, jobs.c.started_at, jobs.c.finished_at,
            *run.values(), workers.c.heartbeat_at, workers.c.stopped_at,
        )  # fmt: skip
        .select_from(jobs.outerjoin(attempts, _open_attempt_row()).outerjoin(workers, workers.c.id == run["worker_id"]))
        .where(jobs.c.id == job_id)
    ).first()


def run_of(latest: Any) -> AttemptRun:
    """Who runs the attempt that `latest_attempt` found."""
    return AttemptRun(latest.host or "", latest.pid or 0, latest.worker_id, latest.run_started_at, latest.start_token)


def _running_attempt() -> dict[str, Any]:
    """Who runs a job's latest attempt, as columns by name (outer-joined with
    `_open_attempt_row`): from the open attempt row if there is one, else from the job's row
    (see `engine.store.schema`)."""
    return {
        name: case((attempts.c.id.is_not(None), open_row), else_=job_row).label(name)
        for name, open_row, job_row in (
            ("host", attempts.c.worker_host, jobs.c.attempt_host),
            ("pid", attempts.c.worker_pid, jobs.c.attempt_pid),
            ("worker_id", attempts.c.worker_id, jobs.c.attempt_worker_id),
            ("run_started_at", attempts.c.started_at, jobs.c.started_at),
            ("start_token", attempts.c.start_token, jobs.c.attempt_token),
        )
    }


def finished_before(cutoff: float) -> Any:
    """Finished jobs that ended before `cutoff`. A job ends after it was created, so the
    condition on ``created_at`` drops none of them: it gives the planner a range of the
    created_at indexes to walk (finished_at has no index: see `engine.store.schema`)."""
    return and_(
        jobs.c.state.in_([state.value for state in FINISHED_STATES]),
        jobs.c.created_at < cutoff,
        jobs.c.finished_at < cutoff,
    )



def job_from_row(row: Any) -> Job:
    return Job(
        id=row.id,
        actor=row.actor,
        queue=row.queue,
        state=JobState(row.state),
        args=json.loads(row.args),
        kwargs=json.loads(row.kwargs),
        priority=row.priority,
        idempotency_key=row.idempotency_key,
        attempts=row.attempts,
        progress_percent=row.progress_percent,
        progress_message=row.progress_message,
        last_error=row.last_error,
        created_at=row.created_at,
        scheduled_for=row.scheduled_for,
        started_at=row.started_at,
        finished_at=row.finished_at,
        schedule=row.schedule,
        fire_time=row.fire_time,
    )


def _attempt_in_job(job_id: str, latest: Any, ended_the_job: bool) -> Attempt:
    """The latest attempt from its job's row (`latest_attempt`): running, or the one that
    ended the job as `succeeded`."""
    run = run_of(latest)
    finished_at = latest.finished_at if ended_the_job else None
    return Attempt(
        job_id=job_id, number=latest.attempts, worker_host=run.host, worker_pid=run.pid, started_at=run.started_at,
        finished_at=finished_at, duration_ms=(finished_at - run.started_at) * 1000 if ended_the_job else None,
        outcome=Outcome.SUCCEEDED if ended_the_job else None, error_type=None, error_message=None, traceback=None,
    )  # fmt: skip


def _attempt(row: Any) -> Attempt:
    return Attempt(
        job_id=row.job_id,
        number=row.number,
        worker_host=row.worker_host,
        worker_pid=row.worker_pid,
        started_at=row.started_at,
        finished_at=row.finished_at,
        duration_ms=row.duration_ms,
        outcome=Outcome(row.outcome) if row.outcome else None,
        error_type=row.error_type,
        error_message=row.error_message,
        traceback=row.traceback,
    )
