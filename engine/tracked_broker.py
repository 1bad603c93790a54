"""The contract between the engine's brokers and the Tracking middleware.

Tracking records every job before its message leaves and every attempt's end before its
message is settled. A broker that tracks its jobs in a store derives from `TrackedBroker`,
which says what such a broker offers (its store, queue depths, waiting for the sends it makes
later, settling a message once its attempt's end is recorded) and what Tracking hands it (the
pending write of a job's row, the pending record of an attempt's end). Brokers and middleware
import this module, never each other.

Any other Dramatiq broker (Dramatiq's StubBroker in unit tests) still works with Tracking:
its sends and settles simply wait for each write.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, ClassVar, Iterator, Optional

from dramatiq.broker import MessageProxy
from dramatiq.message import Message

if TYPE_CHECKING:
    from .store import Store
    from .writer import Pending

__all__ = ["TrackedBroker", "sending_now", "sends_now", "collecting_row_writes", "row_writes_collected"]


class TrackedBroker:
    """Mixed into a Dramatiq broker whose jobs Tracking records in `store`.

    Attributes:
      store(Store): where the broker's jobs are tracked, handed to the broker when it is built;
        None for a broker built without one (then nothing is tracked).
      sends_behind(bool): whether the broker sends some new jobs from a thread of its own,
        after their rows are committed (RabbitMQ, outside a worker): a process that dies in
        between leaves a job without a message, which `Resend` sends again. A broker that
        commits the row and the message together (the embedded one) does not.
    """

    store: Optional["Store"] = None
    sends_behind: ClassVar[bool] = False

    if TYPE_CHECKING:  # it is mixed into a Dramatiq broker, which has these

        def enqueue(self, message: Message, *, delay: Optional[int] = None) -> Message: ...

    def queue_depths(self) -> dict[str, dict[str, int]]:
        """How many messages each declared queue holds, by kind (``ready``, ``delayed``,
        ``dead``, and others a broker knows)."""
        raise NotImplementedError

    def wait_sent(self, timeout: Optional[float] = None) -> None:
        """Wait until every job this process sent so far is in the broker (``engine.flush``).

        Raises:
          JobsNotSent: some could not be sent (each is `failed`).
          TimeoutError: some are still being sent after `timeout` seconds.
        """

    def settle_sends(self, message_id: Optional[str] = None) -> None:
        """Wait until the job (or every job) this process is sending is sent or failed, so that
        the process reads its own sends. Raises nothing."""

    def settle_when_recorded(self, message: MessageProxy, recorded: "Pending[None]") -> bool:
        """Tracking hands over the pending record of how `message`'s attempt ended.

        Returns:
          True if the broker settles (acks or nacks) the message only once `recorded` is
          committed: the worker thread goes on at once. False: Tracking waits for the record
          before the message is settled.
        """
        return False


#: While true, a broker that sends behind sends at once and raises in the caller.
_send_now: ContextVar[bool] = ContextVar("send_now", default=False)


@contextmanager
def sending_now() -> Iterator[None]:
    """Sends made inside are sent at once, and fail there: `engine.submit` and `engine.retry`
    return a job that the broker has, or raise."""
    token = _send_now.set(True)
    try:
        yield
    finally:
        _send_now.reset(token)


def sends_now() -> bool:
    """Whether the caller is inside `sending_now`."""
    return _send_now.get()


#: Set by a broker around ``before_enqueue`` of a message it sends later (`collecting_row_writes`).
_row_writes: ContextVar[Optional[list["Pending[None]"]]] = ContextVar("row_writes", default=None)


@contextmanager
def collecting_row_writes() -> Iterator[list["Pending[None]"]]:
    """The broker's side, around ``before_enqueue`` of a message it sends later, from a thread
    of its own: Tracking appends the pending write of the job's row to the list instead of
    waiting for it, and the broker sends the message once that write is committed."""
    writes: list[Pending[None]] = []
    token = _row_writes.set(writes)
    try:
        yield writes
    finally:
        _row_writes.reset(token)


def row_writes_collected() -> Optional[list["Pending[None]"]]:
    """Tracking's side: where to hand the pending write of a job's row, or None if the
    enqueue waits for it."""
    return _row_writes.get()
