"""`engine.progress`: report how far the running job has got."""

from __future__ import annotations

from typing import Optional

from .middleware.cancellation import cancel_requested
from .middleware.tracking import current_attempt


def progress(percent: float, message: Optional[str] = None) -> None:
    """Record the running job's progress, shown by `engine watch` and the HTTP API.

    Writes are throttled (see ``ENGINE_PROGRESS_INTERVAL_S``); the last value reported always
    lands when the attempt ends, so calling this in a tight loop is cheap.

    Parameters:
      percent(float): from 0 to 100.
      message(str): what the job is doing, e.g. "row 1200 of 5000".

    It is also a cancellation checkpoint (see `engine.cancel_requested`). Outside a job (an
    actor called as a plain function, in a test say) it does nothing.

    Raises:
      ValueError: when percent is outside 0..100.
      JobCanceled: the job's cancel was requested.
    """
    cancel_requested()
    if not 0 <= percent <= 100:
        raise ValueError(f"progress must be between 0 and 100, got {percent}")
    attempt = current_attempt.get()
    if attempt is not None:
        attempt.report(float(percent), message)
