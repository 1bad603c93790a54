"""The pauses of a retry loop: each twice the one before, up to a longest one."""

from __future__ import annotations

import threading
import time
from typing import Optional


class Backoff:
    """Pauses between tries of something that fails for a while (a connection, a database).

    Parameters:
      first_s(float): the first pause, in seconds, and the one after `reset`.
      max_s(float): the longest pause.
      within_s(float): when given, the tries stop being worth it after this many seconds from
        now: `exhausted` says when the next pause would end past that.
    """

    def __init__(self, first_s: float, max_s: float, *, within_s: Optional[float] = None) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.next_s = first_s
        self._give_up_at = None if within_s is None else time.monotonic() + within_s

    def exhausted(self) -> bool:
        """Whether the next pause would end after the time given (never without one)."""
        return self._give_up_at is not None and time.monotonic() + self.next_s > self._give_up_at

    def pause(self, stop: Optional[threading.Event] = None) -> bool:
        """Sleep for the next pause (woken early by `stop`), then double it.

        Returns:
          True if `stop` was set.
        """
        if stop is not None:
            stopped = stop.wait(self.next_s)
        else:
            time.sleep(self.next_s)
            stopped = False
        self.next_s = min(self.next_s * 2, self.max_s)
        return stopped

    def reset(self) -> None:
        """Back to the first pause, after a success."""
        self.next_s = self.first_s
