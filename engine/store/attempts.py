"""The starts and ends of attempts, statement by statement: one statement per kind of write
for a whole batch of the writer, the same on SQLite and PostgreSQL.

`AttemptWrites` is what both dialects share: the SQLite store records every batch with it, and
the PostgreSQL one, whose batches are one statement of its own (`engine.store.postgres`), decides
with it the starts that statement leaves undecided (a redelivery, a takeover) and ends attempts
outside the writer (`Store.finish_attempt`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from sqlalchemy import Connection, and_, bindparam, func, select, update

from ..job import FINISHED_STATES, TRANSITIONS, JobState, Outcome
from .records import AttemptEnd, AttemptStart, StartRequest
from .reads import latest_attempt, run_of
from .schema import attempts, jobs
from .states import state_in

# The statements of the writer's batches, built once: they run for every job.

_START_QUEUED = (
    update(jobs)
    .where(jobs.c.id.in_(bindparam("ids", expanding=True)), state_in(TRANSITIONS[JobState.RUNNING]))
    .values(state=JobState.RUNNING, attempts=jobs.c.attempts + 1, started_at=bindparam("now"), updated_at=bindparam("now"))
    .returning(jobs.c.id, jobs.c.attempts, jobs.c.cancel_requested_at, jobs.c.started_at)
)

#: The worker of each attempt `_START_QUEUED` opened, into its job's row.
_OPEN_ATTEMPT = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_job_id"))
    .values(
        attempt_host=bindparam("b_host"),
        attempt_pid=bindparam("b_pid"),
        attempt_worker_id=bindparam("b_worker_id"),
        attempt_token=bindparam("b_requested_at"),
    )
)

#: Columns of an ended job that keep their value when the end brings none.
_KEEP_UNLESS_GIVEN = {
    "updated_at": bindparam("now"),
    "last_error": func.coalesce(bindparam("b_last_error"), jobs.c.last_error),
    "progress_percent": func.coalesce(bindparam("b_progress_percent"), jobs.c.progress_percent),
    "progress_message": func.coalesce(bindparam("b_progress_message"), jobs.c.progress_message),
}

#: By the state the job ends in (None: it was moved already), each a compare-and-set.
_END_JOB = {
    None: update(jobs).where(jobs.c.id == bindparam("b_job_id")).values(_KEEP_UNLESS_GIVEN),
    **{
        state: update(jobs)
        .where(jobs.c.id == bindparam("b_job_id"), state_in(TRANSITIONS[state]))
        .values(state=state, result=bindparam("b_result"), finished_at=bindparam("now"), **_KEEP_UNLESS_GIVEN)
        for state in FINISHED_STATES
    },
}

#: What an ended attempt's row takes from its end when the row exists (see `_completing`).
ENDED_COLUMNS = ("finished_at", "duration_ms", "outcome", "error_type", "error_message", "traceback")

#: The columns of an attempt's row that `AttemptEnd.attempt_row` gives: all but its key.
_ATTEMPT_ROW_COLUMNS = tuple(column.name for column in attempts.columns if not column.primary_key)


def _completing(ended: Any) -> Any:
    """An INSERT of attempt rows that completes the row when one exists: the row a takeover
    wrote when it judged the worker dead, or one a store older than schema 6 opened at the start."""
    return ended.on_conflict_do_update(
        index_elements=["job_id", "number"], set_={column: ended.excluded[column] for column in ENDED_COLUMNS}
    )


def _ended_attempts_insert(insert: Callable[[Any], Any]) -> Any:
    """The INSERT of ended attempts' rows (`AttemptEnd.attempt_row`, executemany), run after
    their jobs' update in the same transaction, that skips the attempt whose end moved its job
    to `succeeded` (its job's row holds it: see `engine.store.schema`) unless that attempt has
    a row already (a takeover's, a schema-5 start's), which it completes.

    The job's row shows that this end moved it: `succeeded`, with this attempt's number and this
    end's time as its `finished_at` (the update and the row share `now`). Most jobs succeed at
    their first attempt, and that insert (a row, two index entries, a foreign-key check) would
    be a large part of the database's work per job. `engine.store.postgres` applies the same
    rule in its one statement.
    """
    row = {name: bindparam(name, type_=attempts.c[name].type) for name in _ATTEMPT_ROW_COLUMNS}
    ended_the_job = (
        select(jobs.c.id)
        .where(
            jobs.c.id == row["job_id"], jobs.c.state == JobState.SUCCEEDED,
            jobs.c.attempts == row["number"], jobs.c.finished_at == row["finished_at"],
        )  # fmt: skip
        .exists()
    )
    has_row = (
        select(attempts.c.id).where(attempts.c.job_id == row["job_id"], attempts.c.number == row["number"]).exists()
    )
    in_job = and_(row["outcome"] == Outcome.SUCCEEDED.value, ended_the_job, ~has_row)
    chosen = select(*(value.label(name) for name, value in row.items())).where(~in_job)
    return _completing(insert(attempts).from_select(list(_ATTEMPT_ROW_COLUMNS), chosen))


class AttemptWrites:
    """The starts and ends of attempts on a dialect's INSERT (whose ON CONFLICT the rows of
    ended attempts take).

    Parameters:
      insert: the dialect's ``insert`` (``sqlalchemy.dialects.sqlite.insert``, say).
    """

    def __init__(self, insert: Callable[[Any], Any]) -> None:
        self._insert_abandoned = _completing(insert(attempts))
        self._insert_ended = _ended_attempts_insert(insert)

    def start_attempts(self, connection: Connection, requests: list[StartRequest]) -> list[AttemptStart]:
        """Move each request's job to `running` with its attempt's worker, in `connection`'s
        transaction: one UPDATE for every queued job of the batch, one more for the workers.
        The attempt's row is written when it ends (`finish_attempts`).

        A job found `running` already is run again only if the worker of its open attempt is
        dead: silent for `dead_after_s`, stopped, or unknown. That attempt is then closed as
        `abandoned`. Under a live worker it is left alone, however long it runs: liveness, not
        a timeout, decides. Two deliveries racing to rerun it are settled by a compare-and-set
        on the attempt count, so at most one wins. The start also reads whether the job's
        cancel was requested, so that the worker need not ask again.

        Returns:
          list[AttemptStart]: one per request, in order.
        """
        if not requests:
            return []
        now = time.time()
        moved = connection.execute(
            _START_QUEUED, {"ids": [request.job_id for request in requests], "now": now}
        ).all()
        queued = {row.id: row for row in moved}
        starts, opened = [], []
        for request in requests:
            # pop: a second delivery of the same job in this batch finds it `running`.
            row = queued.pop(request.job_id, None)
            if row is None:
                starts.append(self._start_running(connection, request, now))
            else:
                starts.append(start_of(row))
                opened.append({f"b_{name}": value for name, value in request._asdict().items()})
        if opened:
            connection.execute(_OPEN_ATTEMPT, opened)
        return starts

    def _start_running(self, connection: Connection, request: StartRequest, now: float) -> AttemptStart:
        """Start a job that was not queued: take it over if its worker died, else say why not."""
        found = latest_attempt(connection, request.job_id)
        if found is None or found.state != JobState.RUNNING:
            return AttemptStart(None)
        own = (request.worker_id, request.requested_at)
        if request.worker_id is not None and (found.worker_id, found.start_token) == own:
            return start_of(found)  # this very start, committed by a try whose reply was lost
        alive = (
            found.heartbeat_at is not None
            and found.stopped_at is None
            and now - found.heartbeat_at < request.dead_after_s
        )
        if alive:
            return AttemptStart(None, running_elsewhere=True)
        number = connection.execute(
            update(jobs)
            .where(jobs.c.id == request.job_id, jobs.c.state == JobState.RUNNING, jobs.c.attempts == found.attempts)
            .values(
                attempts=jobs.c.attempts + 1, started_at=now, updated_at=now, attempt_host=request.host,
                attempt_pid=request.pid, attempt_worker_id=request.worker_id, attempt_token=request.requested_at,
            )  # fmt: skip
            .returning(jobs.c.attempts)
        ).scalar()
        if number is None:  # another delivery took it over first: it runs there now
            return AttemptStart(None, running_elsewhere=True)
        abandoned = AttemptEnd.of(request.job_id, found.attempts, Outcome.ABANDONED, run=run_of(found))
        connection.execute(self._insert_abandoned, abandoned.attempt_row(now))
        cancel_requested = found.cancel_requested_at is not None
        return AttemptStart(number, cancel_requested=cancel_requested, started_at=now, took_over=True)

    def finish_attempts(self, connection: Connection, ends: list[AttemptEnd]) -> list[None]:
        """Write the rows of ended attempts, in `connection`'s transaction, one executemany
        per statement for the whole batch.

        A job whose end has a `state` is moved there (compare-and-set). When `state` is None
        the job's state was already moved (a retry set it to `scheduled`) and only its last
        error and progress are written.

        Returns:
          list[None]: one per end, for the writer that batches them.
        """
        if not ends:
            return []
        now = time.time()
        rows = [end.parameters(now) for end in ends]
        for state in {end.state for end in ends}:
            connection.execute(_END_JOB[state], [row for row in rows if row["b_state"] == state])
        connection.execute(self._insert_ended, [end.attempt_row(now) for end in ends])
        return [None] * len(ends)


def start_of(row: Any) -> AttemptStart:
    """The start of a job moved to `running` (`row` has its attempt count, cancel request and
    start time); undecided when there is no row."""
    if row is None:
        return AttemptStart(None, undecided=True)
    return AttemptStart(row.attempts, cancel_requested=row.cancel_requested_at is not None, started_at=row.started_at)
