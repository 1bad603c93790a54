"""`purge_jobs`: retention for the job store.

Every job and attempt is kept until something deletes it, so without this job the store grows
forever. The engine schedules it daily (schedule `purge-jobs`, ``ENGINE_RETENTION_DAYS``); it
also trims the schedules' fire ledger to the same age; it deletes in batches of one transaction each so that workers
recording jobs at the same time never wait long on its locks.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from typing import Any

import engine
from engine import PermanentError
from scheduler.ledger import Ledger


@engine.actor(max_retries=3, time_limit=60 * 60_000)
def purge_jobs(older_than_days: float = 30, batch_size: int = 1000) -> dict[str, Any]:
    """Delete the jobs that finished (succeeded, failed or canceled) more than
    `older_than_days` ago, with their attempts. Safe to retry: a second run deletes what the
    first did not reach.

    Parameters:
      older_than_days(float): the age, since it finished, past which a job is deleted.
      batch_size(int): jobs deleted per transaction.

    Returns:
      dict: ``{"purged": how many jobs were deleted, "older_than": the cutoff in ISO 8601}``.

    Raises:
      PermanentError: `older_than_days` is not a positive number or `batch_size` is below 1.
    """
    if not 0 < older_than_days < math.inf:
        raise PermanentError(f"older_than_days must be a positive number, got {older_than_days}")
    if batch_size < 1:
        raise PermanentError(f"batch_size must be at least 1, got {batch_size}")
    cutoff = time.time() - older_than_days * 86_400
    store = engine.get_store()

    due = store.count_finished_before(cutoff)
    engine.progress(0, f"{due} jobs to purge")

    def report(purged: int) -> None:
        # `due` was counted before the first batch; should more have come due since, stop at 100 %.
        engine.progress(100 * purged / max(due, purged), f"{purged} jobs purged")

    purged = store.purge_finished(ended_before=cutoff, batch_size=batch_size, on_batch=report)
    Ledger(store).purge_fires(older_than=cutoff)
    engine.progress(100, f"{purged} jobs purged")
    return {"purged": purged, "older_than": datetime.fromtimestamp(cutoff, timezone.utc).isoformat()}

