"""The holding consumer: Dramatiq's RabbitMQ consumer, which also holds the next messages for
its worker threads, settles messages once their jobs' ends are recorded, and keeps long delays
out of a consumer's hands."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Optional

import pika.exceptions
from dramatiq.brokers.rabbitmq import _RabbitmqConsumer
from dramatiq.common import current_millis
from dramatiq.errors import ConnectionClosed
from dramatiq.worker import ConsumerThread
from loguru import logger

from ...writer import Pending, wait_all
from .connection import AMQP_ERRORS, close_quietly

if TYPE_CHECKING:
    from .broker import RabbitmqBroker

#: How often (milliseconds) an idle consumer looks for delayed messages that have fallen due
#: (they start at most this late; Dramatiq looks once per worker timeout, a second) and for
#: messages it has held too long.
TICK_MS = 100

#: How long (seconds) a worker process holds a message that none of its threads is free to run
#: before it gives it back to RabbitMQ, for another process (see `HoldingConsumer`).
HAND_BACK_AFTER_S = 0.25

#: How many messages a consumer holds per message it may give Dramatiq (see `HoldingConsumer`):
#: a thread that ends its job finds the next at hand, without a round trip to RabbitMQ, while
#: RabbitMQ sends the one after it.
HELD_PER_SLOT = 2

#: How long (seconds) a closing consumer waits for the store to record the ends of the jobs
#: it has yet to ack; a message it could not ack is delivered again, and its job, recorded
#: finished by then, is skipped.
SETTLE_TIMEOUT_S = 10.0


class HoldingConsumer(_RabbitmqConsumer):
    """Dramatiq's consumer, which holds the next messages for its worker threads, and on a
    delay queue sends a message not due within the hold time back to the hold queue, rather than
    holding it unacknowledged for longer than RabbitMQ allows.

    When it has nothing for Dramatiq's consumer thread, it returns None, which the thread takes
    for an idle tick. It ticks every `TICK_MS` when idle rather than every worker timeout (a
    second): the consumer thread looks for due messages at each tick, and this consumer for
    messages held too long.

    Held messages (main queues): Dramatiq is given at most `prefetch` messages at a time (one
    per worker thread, see `engine.worker`), and RabbitMQ delivers up to `HELD_PER_SLOT` times
    as many more, which this consumer holds. A thread that ends its job frees its slot at once
    (its message is still unacknowledged while its end is committed), and the next held message
    goes to the work queue from that thread, without a round trip to RabbitMQ. A message held longer than
    `HAND_BACK_AFTER_S` goes back to its queue (a requeue, to its place at the head), for
    another process whose threads are free: a short job waits that long at most behind long
    ones in a busy process. The channel's limit is then lowered to what the consumer has, so
    that RabbitMQ does not send it straight back, and raised again once a thread is free with
    nothing held. Under a steady load of short jobs the limit never changes.

    Settles (acks and nacks) are sent in batches: the writer thread commits the ends of many
    jobs at once, and their settles go to the consumer thread together, as one callback that
    writes them all to the socket at once (Dramatiq's consumer wakes the thread, and writes to
    the socket, once per message).
    """

    broker: "RabbitmqBroker"

    def __init__(self, broker: "RabbitmqBroker", queue_name: str, prefetch: int, timeout: int) -> None:
        self.delayed = queue_name.endswith(".DQ")
        self.unsettled: set[Pending[None]] = set()
        self.prefetch = prefetch
        # Messages given to Dramatiq and not settled yet (main queues), by delivery tag: a
        # message settled here that this consumer did not give (its predecessor's, on a lost
        # channel whose tags may repeat) is not one of them.
        self._given: dict[int, Any] = {}
        self._held: deque[tuple[Any, float]] = deque()  # (message, when it came), oldest first
        self._settles: list[tuple[int, bool]] = []  # (delivery tag, ack?) for the consumer thread
        self._update_pending = False  # a callback to the consumer thread is on its way
        self._lock = threading.Lock()
        # The ConsumerThread this consumer feeds, to hand it held messages from other threads.
        thread = threading.current_thread()
        self._consumer_thread = thread if isinstance(thread, ConsumerThread) else None
        # Holding needs a limit that RabbitMQ applies to a consumer while it consumes, its
        # channel-wide (``global``) one: it is lowered when messages are handed back, lest they
        # come straight back. Quorum queues have no such limit, nor delay queues a need for it.
        self.holds = not self.delayed and not broker.quorum_queues
        self._window = prefetch * (1 + HELD_PER_SLOT)  # the channel's limit while holding
        self._limited = False  # the limit is lowered (see `_hand_back_stale`)
        self._restore = False  # the consumer thread is to raise it again
        # Dramatiq's consumer limits its consumer alone; when holding, the channel's limit does
        # it. The limit must be in place before the first read subscribes.
        super().__init__(broker, queue_name, 0 if self.holds else prefetch, min(timeout, TICK_MS))
        if self.holds:
            try:
                self._limit_channel(queue_name, timeout)
            except AMQP_ERRORS as error:
                raise ConnectionClosed(error) from None

    def _limit_channel(self, queue_name: str, timeout: int) -> None:
        """Set the channel-wide limit, or, on a RabbitMQ that refuses it (global QoS is a
        deprecated feature from RabbitMQ 4.0 on, which a server can deny), consume on a new
        channel with Dramatiq's fixed limit per consumer, holding nothing."""
        try:
            self.channel.basic_qos(prefetch_count=self._window, global_qos=True)
        except pika.exceptions.ChannelClosedByBroker as refused:
            logger.warning("RabbitMQ refused a channel-wide prefetch ({}): no message is held.", refused)
            self.holds = False
            self.channel = self.connection.channel()
            self.channel.basic_qos(prefetch_count=self.prefetch)
            self.iterator = self.channel.consume(queue_name, inactivity_timeout=min(timeout, TICK_MS) / 1000)

    def __next__(self) -> Any:
        message = self._take_held()
        if message is not None:
            return message
        self._hand_back_stale()
        message = super().__next__()
        if message is None:
            return None
        if self.holds:
            return self._give_or_hold(message)
        if not self.delayed:
            return message
        eta = message.options.get("eta")
        due_in = eta - current_millis() if isinstance(eta, (int, float)) else 0
        if due_in <= self.broker.delay_hold_ms:
            return message
        logger.debug("Message {} is due in {} ms: back to its hold queue.", message.message_id, due_in)
        # Published and confirmed before the ack, so a crash in between duplicates the
        # message (Tracking runs a job once) rather than losing it.
        self.broker.hold(message._message)
        self.known_tags.discard(message._tag)
        try:
            self.channel.basic_ack(message._tag)
        except AMQP_ERRORS as error:
            raise ConnectionClosed(error) from None
        return None

    def _give_or_hold(self, message: Any) -> Any:
        """The message for Dramatiq if one of its slots is free, else None (it is held)."""
        with self._lock:
            if len(self._given) < self.prefetch:
                self._given[message._tag] = message
                return message
            self._held.append((message, time.monotonic()))
            return None

    def _take_held(self) -> Any:
        """The oldest held message if a slot is free (it then takes the slot), else None."""
        if not self._held:  # read without the lock: an append it misses is taken at the next call
            return None
        with self._lock:
            if not self._held or len(self._given) >= self.prefetch:
                return None
            message, _ = self._held.popleft()
            self._given[message._tag] = message
        return message

    def _hand_back_stale(self) -> None:
        """On the consumer thread: requeue the messages held for longer than `HAND_BACK_AFTER_S`."""
        if not self._held:
            return
        cutoff = time.monotonic() - HAND_BACK_AFTER_S
        stale = []
        with self._lock:
            while self._held and self._held[0][1] < cutoff:
                message, _ = self._held.popleft()
                self.known_tags.discard(message._tag)
                stale.append(message)
            if stale:
                limit, self._limited = max(len(self.known_tags), 1), True
        if not stale:
            return
        try:
            # The limit first: lowered to what the consumer keeps, so that RabbitMQ sends nothing
            # more until a message is settled, not even the requeued ones straight back.
            self.channel.basic_qos(prefetch_count=limit, global_qos=True)
            for message in stale:
                logger.debug("Message {} waited behind busy threads: back to its queue.", message.message_id)
                self.channel.basic_nack(message._tag, requeue=True)
        except AMQP_ERRORS as error:
            raise ConnectionClosed(error) from None

    def ack(self, message: Any) -> None:
        self._settle_when_recorded(message, ack=True)

    def nack(self, message: Any) -> None:
        self._settle_when_recorded(message, ack=False)

    def _settle_when_recorded(self, message: Any, *, ack: bool) -> None:
        """Settle once the end of the message's job is committed to the store (Tracking hands
        its pending record to `RabbitmqBroker.settle_when_recorded`): the worker thread does
        not wait for it, and its slot goes to the next held message."""
        self._free_slot(message)
        recorded = self.broker.end_record_of(message)

        def settle(done: Optional[Pending[None]]) -> None:
            _settle_recorded(message, lambda: self._settle_soon(message._tag, ack), done)

        if recorded is None or recorded.done():
            settle(recorded)
            return
        recorded.add_done_callback(settle)
        self.unsettled.add(recorded)
        recorded.add_done_callback(self.unsettled.discard)

    def _free_slot(self, message: Any) -> None:
        """The message's thread is free: give it the next held message, if there is one."""
        with self._lock:
            if self._given.get(message._tag) is not message:
                return  # delivered on a delay queue, or to this consumer's predecessor
            del self._given[message._tag]
            # A thread free with nothing held: the process is not busy any more.
            restore = self._limited and not self._held
            if restore:
                self._limited, self._restore = False, True
            wake = restore and self._wake_once()
        if wake:
            try:
                self._call_on_consumer_thread()
            except ConnectionClosed:
                pass  # the consumer is gone with its connection; the next one starts with the full limit
        if self._consumer_thread is None:
            return  # the next read takes it
        held = self._take_held()
        if held is not None:
            self._consumer_thread.handle_message(held)

    def _settle_soon(self, tag: int, ack: bool) -> None:
        """Hand the settle to the consumer thread; the first of a batch wakes it. The tag
        leaves `known_tags` and joins the settles at once, under the lock that `_update`
        takes: a tag is always in one or the other until it is sent."""
        with self._lock:
            try:
                self.known_tags.remove(tag)
            except KeyError:  # delivered on a connection since lost: RabbitMQ delivers it again
                logger.warning("Failed to settle message: not in known tags.")
                return
            self._settles.append((tag, ack))
            wake = self._wake_once()
        if wake:
            self._call_on_consumer_thread()

    def _wake_once(self) -> bool:
        """Under the lock: whether the caller must wake the consumer thread (no wake-up is
        on its way yet)."""
        wake, self._update_pending = not self._update_pending, True
        return wake

    def _call_on_consumer_thread(self) -> None:
        try:
            self.connection.add_callback_threadsafe(self._update)
        except AMQP_ERRORS as error:
            raise ConnectionClosed(error) from None

    def _update(self) -> None:
        """On the consumer thread: the limit raised again if asked, then the settles waiting.
        pika's BlockingChannel would flush the socket after each and wait for the limit's
        reply; its underlying channel buffers them, and the consumer's I/O loop writes them out
        together at its next turn."""
        with self._lock:
            settles, self._settles = self._settles, []
            self._update_pending = False
            restore, self._restore = self._restore, False
            # One ack for all when every message delivered before the last is settled.
            highest = max((tag for tag, _ in settles), default=0)
            unsettled_before = min(self.known_tags, default=highest) < highest
            ack_all = bool(settles) and all(ack for _, ack in settles) and not unsettled_before
        if restore:
            self.channel._impl.basic_qos(prefetch_count=self._window, global_qos=True)
        if ack_all:
            self.channel._impl.basic_ack(highest, multiple=True)
            return
        for tag, ack in settles:
            if ack:
                self.channel._impl.basic_ack(tag)
            else:
                self.channel._impl.basic_nack(tag, requeue=False)

    def close(self) -> None:
        """Close the channel and the connection, once the messages whose end is being
        recorded are settled. Dramatiq's leaves the connection open when the channel is closed
        already, which is how RabbitMQ cuts off a consumer (e.g. on ``consumer_timeout``): each
        restart of the consumer would leak a connection."""
        with self._lock:
            self._held.clear()  # unacknowledged: RabbitMQ delivers them again, elsewhere
        wait_all(list(self.unsettled), timeout=SETTLE_TIMEOUT_S)
        try:
            super().close()
        finally:
            close_quietly(self.connection)


def _settle_recorded(message: Any, settle: Callable[[], None], recorded: Optional[Pending[None]]) -> None:
    error = recorded.exception() if recorded is not None else None
    if error is not None:
        # Only a bug gets here (outages are waited out): leaving the message unsettled would
        # block its consumer's prefetch for good, so settle it, and say what was lost.
        logger.error("Could not record the end of job {}: {!r}", message.message_id, error)
    try:
        settle()
    except Exception as settle_error:
        logger.warning("Could not settle message {} ({!r}); the broker will deliver it again.", message.message_id, settle_error)
