"""The rule every write of a job's state follows: a compare-and-set on the states
`engine.job.TRANSITIONS` allows before the new one, so that concurrent or duplicate deliveries
cannot move a job backwards."""

from __future__ import annotations

import time
from typing import Any, Optional

from sqlalchemy import Connection, literal_column, update

from ..job import TRANSITIONS, JobState
from .schema import jobs


def transition(
    connection: Connection,
    job_id: str,
    to: JobState,
    *,
    from_states: Optional[frozenset[JobState]] = None,
    **values: Any,
) -> bool:
    """Compare-and-set the job's state from `from_states` (by default, every state
    `TRANSITIONS` allows before `to`); False when its current state is not one of them."""
    moved = connection.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.state.in_(from_states or TRANSITIONS[to]))
        .values({"state": to, "updated_at": time.time(), **values})
    )
    return moved.rowcount == 1


def state_in(states: frozenset[JobState]) -> Any:
    """``jobs.state IN (...)`` with the states written into the SQL, as executemany requires."""
    return jobs.c.state.in_([literal_column(f"'{state.value}'") for state in sorted(states)])

