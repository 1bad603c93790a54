"""The embedded broker: Dramatiq queues as rows of the store's SQLite file, so that one machine
needs no RabbitMQ. Any process that opens the store can send; any number of worker processes
consume from the same file.

- A message is a row of `engine.store.schema.messages`: it survives restarts, and it is inserted in
  the same transaction as the job row that the Tracking middleware writes before it.
- Its due time is the row's ``eta``: consumers claim only due rows, so there are no delay queues.
- A claimed row is leased (``leased_until``, ``lease_owner``). The lease is renewed in the
  background while this process holds the message; when its holder dies the lease runs out, and
  the row is claimed again and delivered with ``redelivered`` set.
- Idle consumers sleep on a Unix datagram socket in ``<database>.wake/``; an enqueue sends each of
  those sockets a byte once it has committed, so a message sent from any process is picked up at
  once. A slow poll (`POLL_INTERVAL_S`) remains for expired leases and lost wake-ups.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import deque
from typing import Any, Iterable, Iterator, Optional, Sequence
from uuid import uuid4

from dramatiq.broker import Broker, Consumer, MessageProxy
from dramatiq.errors import BrokerConnectionError, DecodeError, QueueJoinTimeout, QueueNotFound
from dramatiq.logging import get_logger
from dramatiq.message import Message
from dramatiq.middleware import Middleware
from loguru import logger
from sqlalchemy import Connection, Executable, Row, and_, case, delete, func, or_, select, update
from sqlalchemy.exc import OperationalError

from ..notifiers import SocketDirectory, SocketListener, sidecar_directory
from ..redaction import mask_urls
from ..store import Store
from ..store.schema import messages
from ..tracked_broker import TrackedBroker
from ..writer import Apply, Pending
from .hooks import HookDispatch

#: The longest an idle consumer sleeps without looking at its queue. It bounds how late an
#: expired lease is noticed, and the cost of a lost wake-up.
POLL_INTERVAL_S = 1.0

#: How often `SQLiteBroker.join` looks at the queue.
JOIN_INTERVAL_S = 0.05


class SQLiteBroker(HookDispatch, TrackedBroker, Broker):
    """A broker whose queues live in the store's SQLite database.

    Messages are delivered by ``broker_priority`` (higher first, as with RabbitMQ), then by due
    time. Delivered messages carry ``redelivered``: True when an earlier delivery's process died.

    Parameters:
      store(Store): the store whose SQLite file holds the messages.
      middleware(list[Middleware]): See :class:`Broker<dramatiq.Broker>`.
      lease_s(float): how long a claimed message stays invisible to other consumers
        without renewal. Leases are renewed every third of it, so the messages of a process
        that dies are redelivered at most this long after it died.

    Raises:
      ValueError: if the store is not in a SQLite file, the one thing its processes share.
    """


    def __init__(
        self, store: Store, *, middleware: Optional[list[Middleware]] = None, lease_s: float = 15.0
    ) -> None:
        super().__init__(middleware=middleware)
        wake_directory = sidecar_directory(store, "wake")
        if wake_directory is None:
            raise ValueError(f"the SQLite broker needs a SQLite database file, not {mask_urls(store.url)!r}")

        self.logger = get_logger(__name__, type(self))
        self.store = store
        self.lease_s = lease_s
        self.queues: set[str] = set()
        self.wake_sockets = SocketDirectory(wake_directory)
        self.leases = _Leases(self)

    def close(self) -> None:
        """Stop renewing leases: messages still held are redelivered once their leases run out."""
        self.leases.close()

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> Consumer:
        """Create a new consumer for a queue.

        Parameters:
          queue_name(str): The queue to consume.
          prefetch(int): The most messages the consumer holds unacknowledged at once.
          timeout(int): The idle timeout in milliseconds.

        Raises:
          QueueNotFound: If the queue hasn't been declared.
        """
        if queue_name not in self.queues:
            raise QueueNotFound(queue_name)
        return _SQLiteConsumer(self, queue_name, prefetch, timeout)

    def declare_queue(self, queue_name: str) -> None:
        """Declare a queue; no delay queue goes with it, as due times live in the rows."""
        if queue_name not in self.queues:
            self.emit_before("declare_queue", queue_name)
            self.queues.add(queue_name)
            self.emit_after("declare_queue", queue_name)

    def enqueue(self, message: Message, *, delay: Optional[int] = None) -> Message:
        """Insert a message, due after `delay` milliseconds, and wake the idle consumers.

        The ``before_enqueue`` hooks run inside the insert's transaction: what they write is
        committed with the message, and if one raises, neither is.

        Raises:
          BrokerConnectionError: If the database cannot be written.
        """
        self.declare_queue(message.queue_name)
        with _database_errors(), self.store.transaction() as connection:
            self.emit_before("enqueue", message, delay)
            connection.execute(
                messages.insert().values(
                    message_id=message.message_id,
                    queue=message.queue_name,
                    priority=message.options.get("broker_priority") or 0,
                    eta=time.time() + (delay or 0) / 1000,
                    body=message.encode(),
                )
            )
        self.emit_after("enqueue", message, delay)
        # Delayed messages too: a consumer sleeping until a later due time must look again.
        self.wake_consumers()
        return message

    def settle_when_recorded(self, message: MessageProxy, recorded: Pending[None]) -> bool:
        """Acks and nacks go through the store's writer, which commits them after the writes
        handed to it before: after Tracking's record of the job's end."""
        return True

    def get_declared_queues(self) -> set[str]:
        return self.queues.copy()

    def queue_depths(self) -> dict[str, dict[str, int]]:
        """How many messages each declared queue has in each state.

        Returns:
          {queue: {"ready": n, "delayed": n, "running": n, "dead": n}}, where ready messages
          are due and unclaimed (or their holder died), delayed ones not yet due, running ones
          held under a live lease, and dead ones dead-lettered.
        """
        now = time.time()
        state = case(
            (messages.c.dead_at.is_not(None), "dead"),
            (messages.c.leased_until >= now, "running"),
            (messages.c.eta > now, "delayed"),
            else_="ready",
        )
        query = (
            select(messages.c.queue, state, func.count())
            .where(messages.c.queue.in_(list(self.queues)))
            .group_by(messages.c.queue, state)
        )
        depths = {queue: {"ready": 0, "delayed": 0, "running": 0, "dead": 0} for queue in self.queues}
        with self.store.reading() as connection:
            for queue, queue_state, count in connection.execute(query):
                depths[queue][queue_state] = count
        return depths

    def flush(self, queue_name: str) -> None:
        """Drop all the messages of a queue, dead ones included."""
        with self.store.transaction() as connection:
            connection.execute(delete(messages).where(messages.c.queue == queue_name))

    def flush_all(self) -> None:
        """Drop all the messages of every declared queue."""
        with self.store.transaction() as connection:
            connection.execute(delete(messages).where(messages.c.queue.in_(list(self.queues))))

    def join(self, queue_name: str, *, timeout: Optional[int] = None) -> None:
        """Wait until a queue has no messages left but dead ones. Only meant for tests.

        Parameters:
          queue_name(str): The queue to wait on.
          timeout(Optional[int]): The max amount of time, in milliseconds, to wait.

        Raises:
          QueueJoinTimeout: When the timeout elapses.
        """
        deadline = timeout and time.monotonic() + timeout / 1000
        live = select(func.count()).where(messages.c.queue == queue_name, messages.c.dead_at.is_(None))
        while True:
            with self.store.reading() as connection:
                if not connection.execute(live).scalar():
                    return
            if deadline and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)
            time.sleep(JOIN_INTERVAL_S)

    def wake_consumers(self) -> None:
        """Send a byte to the socket of every idle consumer of this database, in any process.

        A consumer whose socket is full has wake-ups it has not read yet: it needs no other.
        """
        self.wake_sockets.broadcast(b"\0")


class _Leases:
    """The rows this broker's consumers hold, renewed in the background until they are settled.

    They are kept per broker rather than per consumer because a message can outlive the consumer
    that claimed it: when Dramatiq restarts a failed consumer, the messages it had handed to
    worker threads are acknowledged through its successor, and must stay leased until then.
    """

    def __init__(self, broker: SQLiteBroker) -> None:
        self.broker = broker
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex}"
        self.held: set[int] = set()
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.renewer: Optional[threading.Thread] = None

    def hold(self, row_ids: Iterable[int]) -> None:
        with self.lock:
            self.held.update(row_ids)
            # Started with the first claim, so that processes that only send have no thread.
            if self.renewer is None:
                self.renewer = threading.Thread(target=self._renew_until_closed, name="leases", daemon=True)
                self.renewer.start()

    def release(self, row_ids: Iterable[int]) -> None:
        with self.lock:
            self.held.difference_update(row_ids)

    def close(self) -> None:
        self.closed.set()
        if self.renewer is not None:
            self.renewer.join()

    def _renew_until_closed(self) -> None:
        while not self.closed.wait(self.broker.lease_s / 3):
            with self.lock:
                held = list(self.held)
            if held:
                self._renew(held)

    def _renew(self, row_ids: list[int]) -> None:
        # A row that was settled or taken over meanwhile simply matches nothing.
        renewal = (
            update(messages)
            .where(messages.c.id.in_(row_ids), messages.c.lease_owner == self.owner)
            .values(leased_until=time.time() + self.broker.lease_s)
        )
        try:
            with self.broker.store.transaction() as connection:
                connection.execute(renewal)
        except OperationalError:
            self.broker.logger.warning("Failed to renew %d leases; will try again.", len(row_ids), exc_info=True)


class _SQLiteConsumer(Consumer):
    """Claims due messages of one queue. Its ack, nack and requeue are called from worker
    threads while the consumer thread claims, so the messages it holds are kept under a lock."""

    def __init__(self, broker: SQLiteBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = prefetch
        self.timeout = timeout
        self.claimed: deque[_SQLiteMessageProxy] = deque()  # not yet handed out by __next__
        self.held: set[int] = set()  # row ids claimed and not yet settled: at most `prefetch`
        self.settled = threading.Condition()
        self.doorbell = self._bind_doorbell()

    def __next__(self) -> Optional[MessageProxy]:
        deadline = time.monotonic() + self.timeout / 1000
        while not self.claimed and not self._claim():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._wait(remaining)
        return self.claimed.popleft()

    def ack(self, message: MessageProxy) -> None:
        self._settle_with_writes(message.row_id, _delete_rows)

    def nack(self, message: MessageProxy) -> None:
        self._settle_with_writes(message.row_id, _dead_letter_rows)

    def requeue(self, proxies: Iterable[MessageProxy]) -> None:
        """Clear the leases of messages this process will not run, so any consumer takes them now."""
        row_ids = [proxy.row_id for proxy in proxies]
        if not row_ids:
            return
        unlease = (
            update(messages)
            .where(messages.c.id.in_(row_ids), messages.c.lease_owner == self.broker.leases.owner)
            .values(leased_until=None, lease_owner=None)
        )
        self._settle(row_ids, unlease)
        self.broker.wake_consumers()

    def close(self) -> None:
        """Requeue the messages claimed but never handed out, and stop listening for wake-ups.

        Messages handed out stay leased until they are settled, possibly through the consumer
        that replaces this one.
        """
        if self.doorbell is not None:
            self.doorbell.close()
            self.doorbell = None
        unclaimed = list(self.claimed)
        self.claimed.clear()
        self.requeue(unclaimed)

    # -- claiming -----------------------------------------------------------------------------

    def _claim(self) -> int:
        """Claim due messages, up to the prefetch limit; returns how many."""
        with self.settled:
            room = self.prefetch - len(self.held)
        if room <= 0:
            return 0
        with _database_errors():
            rows = self._claim_rows(room)
        claimed = 0
        for row in rows:
            try:
                message = Message.decode(row.body)
            except DecodeError:
                logger.exception("Failed to decode message row {}; dead-lettering it.", row.id)
                self._settle([row.id], _dead_letter(row.id))
                continue
            # A lease owner left on the row is a previous holder that neither settled it nor
            # requeued it: it died, maybe in the middle of running it.
            self.claimed.append(_SQLiteMessageProxy(message, row.id, redelivered=row.lease_owner is not None))
            claimed += 1
        return claimed

    def _claim_rows(self, limit: int) -> Sequence[Row[Any]]:
        # SELECT then UPDATE rather than one UPDATE ... RETURNING, because RETURNING only sees the
        # new lease owner and `redelivered` needs the old one. BEGIN IMMEDIATE holds the write
        # lock across both, so no other consumer can claim the same rows in between.
        now = time.time()
        claimable = and_(
            messages.c.queue == self.queue_name,
            messages.c.dead_at.is_(None),
            messages.c.eta <= now,
            or_(messages.c.leased_until.is_(None), messages.c.leased_until < now),
        )
        # The claim walks `ix_messages_claim` in delivery order, and so past the rows not due
        # yet: a queue of delayed jobs alone would be walked whole at each look. So first a look
        # along `ix_messages_due` (SQLite's choice for a query without an order), where the due
        # rows lie apart, that there is any.
        any_due = select(messages.c.id).where(claimable).limit(1)
        due = (
            select(messages.c.id, messages.c.body, messages.c.lease_owner)
            .where(claimable)
            .order_by(messages.c.priority.desc(), messages.c.eta, messages.c.id)
            .limit(limit)
        )
        leases = self.broker.leases
        with self.broker.store.transaction() as connection:
            rows = connection.execute(due).all() if connection.execute(any_due).first() else []
            if rows:
                connection.execute(
                    update(messages)
                    .where(messages.c.id.in_([row.id for row in rows]))
                    .values(leased_until=now + self.broker.lease_s, lease_owner=leases.owner)
                )
        with self.settled:
            self.held.update(row.id for row in rows)
        leases.hold(row.id for row in rows)
        return rows

    # -- waiting ------------------------------------------------------------------------------

    def _wait(self, remaining: float) -> None:
        """Sleep until a message may be claimable, or `remaining` seconds at most."""
        with self.settled:
            if len(self.held) >= self.prefetch:
                # Full: only a worker thread settling a message makes room.
                self.settled.wait(remaining)
                return
        timeout = min(remaining, self._seconds_to_next_eta(), POLL_INTERVAL_S)
        if self.doorbell is None:
            time.sleep(max(timeout, 0))
        elif self.doorbell.receive(timeout) is not None:
            # However many enqueues rang, one look at the queue serves them all.
            self.doorbell.drain()

    def _seconds_to_next_eta(self) -> float:
        now = time.time()
        next_eta = select(func.min(messages.c.eta)).where(
            messages.c.queue == self.queue_name,
            messages.c.dead_at.is_(None),
            messages.c.leased_until.is_(None),
            messages.c.eta > now,
        )
        with self.broker.store.reading() as connection:
            eta = connection.execute(next_eta).scalar()
        return POLL_INTERVAL_S if eta is None else eta - now

    def _bind_doorbell(self) -> Optional[SocketListener]:
        """The socket enqueues ring; None (and a poll every `POLL_INTERVAL_S`) if it cannot be bound."""
        try:
            return self.broker.wake_sockets.bind()
        except OSError:
            logger.opt(exception=True).warning(
                "Cannot listen in {}; polling every {:.1f} s instead.", self.broker.wake_sockets.path, POLL_INTERVAL_S
            )
            return None

    # -- settling -----------------------------------------------------------------------------

    def _settle_with_writes(self, row_id: int, apply: Apply[int, None]) -> None:
        """Ack or nack through the store's writer, after the writes handed to it before (Tracking's
        record of the job's end) and in the same commit as those of other threads. The worker
        thread does not wait: the row is released once it is committed. Meanwhile it stays
        leased, so a crash before the commit delivers it again."""
        settled = self.broker.store.writer.submit(apply, row_id)
        settled.add_done_callback(lambda done: self._released([row_id], done.exception()))

    def _settle(self, row_ids: list[int], statement: Executable) -> None:
        """Run the statement that ends this holding, then stop renewing the rows' leases.

        If the database fails, the rows stay held and leased: Dramatiq retries an ack or nack
        that raises a BrokerConnectionError.
        """
        with _database_errors(), self.broker.store.transaction() as connection:
            connection.execute(statement)
        self._released(row_ids)

    def _released(self, row_ids: list[int], error: Optional[BaseException] = None) -> None:
        if error is not None:  # outages are waited out: only a bug gets here
            logger.error("Failed to settle message rows {}: {!r}; they are delivered again.", row_ids, error)
        self.broker.leases.release(row_ids)
        with self.settled:
            self.held.difference_update(row_ids)
            self.settled.notify_all()


def _dead_letter(*row_ids: int) -> Executable:
    return update(messages).where(messages.c.id.in_(row_ids)).values(dead_at=time.time())


def _delete_rows(connection: Connection, row_ids: list[int]) -> list[None]:
    connection.execute(delete(messages).where(messages.c.id.in_(row_ids)))
    return [None] * len(row_ids)


def _dead_letter_rows(connection: Connection, row_ids: list[int]) -> list[None]:
    connection.execute(_dead_letter(*row_ids))
    return [None] * len(row_ids)


class _SQLiteMessageProxy(MessageProxy):
    """A delivered message and the row it came from.

    Attributes:
      row_id(int): the message's row, which an ack deletes (a retry is a new row, same message id).
      redelivered(bool): an earlier delivery's process died before settling the message.
    """

    def __init__(self, message: Message, row_id: int, *, redelivered: bool) -> None:
        super().__init__(message)
        self.row_id = row_id
        self.redelivered = redelivered


@contextlib.contextmanager
def _database_errors() -> Iterator[None]:
    """Raise a locked or failing database as the connection error Dramatiq knows how to retry."""
    try:
        yield
    except OperationalError as error:
        raise BrokerConnectionError(str(error)) from error
