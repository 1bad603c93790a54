"""The RabbitMQ broker: Dramatiq's, with what a long-lived deployment needs on top.

- Long delays wait in a hold queue, not in a consumer. Dramatiq keeps a delayed message
  unacknowledged in a worker's memory until it is due, and RabbitMQ closes the channel of a
  consumer that holds a delivery longer than its ``consumer_timeout`` (30 minutes by default):
  a job delayed by hours would break its worker's consumer again and again. Here a message due
  later than `delay_hold_ms` goes to ``<queue>.HQ``, a queue with that TTL which dead-letters
  into ``<queue>.DQ``. When it comes out, the delay queue's consumer sends it back to the hold
  queue if it is still not due within `delay_hold_ms`, and holds it the Dramatiq way otherwise.
  All messages of a hold queue have the same TTL, so they expire in the order they entered it
  and none waits behind another. No plugin is needed.
- Sending threads share a bounded pool of connections (Dramatiq opens one per sending thread
  and keeps it for the thread's life, which a web server with a thread per request turns into
  a leak).
- Publisher confirms are on, and a job whose first message RabbitMQ did not take is not left
  behind as `queued`: its row is deleted again and `BrokerUnavailable` is raised, within
  seconds, naming the broker.
- New jobs sent from outside a worker are sent behind the caller's back (`_Sender`): in
  batches, after their rows are committed, with confirms pipelined; `wait_sent` waits.
- `queue_depths`, the same report as the embedded broker's.
- Quorum queues on request (replicated; RabbitMQ 3.10 gives them no priorities).
"""

from __future__ import annotations

import atexit
import copy
import threading
import time
from collections import deque
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, NamedTuple, Optional, TypeVar, Union

import pika
import pika.exceptions
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, _RabbitmqConsumer
from dramatiq.brokers.rabbitmq import RabbitmqBroker as _DramatiqRabbitmqBroker
from dramatiq.common import current_millis, dq_name, q_name, xq_name
from dramatiq.errors import ConnectionClosed, QueueJoinTimeout
from dramatiq.message import Message
from dramatiq.middleware import Middleware
from dramatiq.worker import ConsumerThread, WorkerThread
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from ..errors import BrokerUnavailable, JobsNotSent
from ..middleware.tracking import Tracking, rows_in_flight, when_recorded
from ..store import Store
from .. import writer
from ..writer import BatchThread, Pending, wait_all
from .hooks import HookDispatch

#: Delays longer than this (milliseconds) wait in the hold queue by default. It must stay below
#: RabbitMQ's ``consumer_timeout`` (30 minutes unless configured), as a message due within it
#: is held unacknowledged by a consumer until it is due.
DEFAULT_DELAY_HOLD_MS = 10 * 60_000

#: How many connections sending threads share by default.
DEFAULT_POOL_SIZE = 8

#: How long (seconds) a publish (or a queue declaration) keeps being tried, each time on a
#: working or new connection, before `ConnectionClosed` is raised: long enough to ride out a
#: RabbitMQ restart or failover (a second or two), short enough for a web request. Tries are
#: `RETRY_DELAY` seconds apart at first, twice that after each failure, at most a second. With
#: the connect timeouts below, a send to a RabbitMQ that is down fails after about 3 s when its
#: host refuses connections, and about 4.5 s when the host does not answer at all.
SEND_TIMEOUT = 3.0
RETRY_DELAY = 0.25

#: How often (milliseconds) an idle consumer looks for delayed messages that have fallen due
#: (they start at most this late; Dramatiq looks once per worker timeout, a second) and for
#: messages it has held too long.
TICK_MS = 100

#: How long (seconds) a worker process holds a message that none of its threads is free to run
#: before it gives it back to RabbitMQ, for another process (see `_HoldingConsumer`).
HAND_BACK_AFTER_S = 0.25

#: How many messages a consumer holds per message it may give Dramatiq (see `_HoldingConsumer`):
#: with one, drains of no-op jobs ran 3-7 % slower than with two.
HELD_PER_SLOT = 2

#: Jobs sent without waiting (see `_Sender`): how many may wait to be sent, how many the sender
#: takes at a time, how many may wait for RabbitMQ's confirm, how often (seconds) the sender
#: looks for confirms while it waits for them, and how long (seconds) messages keep being tried
#: while RabbitMQ is down. Two batches may wait: a caller that sends faster than the sender
#: keeps up then waits for room, which leaves the GIL to the writer and the sender (with 10,000,
#: 20,000 sends took 11 % longer to be in RabbitMQ, the backlog going out after the loop).
SEND_BEHIND_CAPACITY = 1_000
SEND_BEHIND_BATCH = 500
MAX_UNCONFIRMED = 5_000
CONFIRM_POLL_S = 0.001
DEFAULT_SEND_BEHIND_TIMEOUT = 30.0

#: While true, `RabbitmqBroker.enqueue` sends at once and raises in the caller (`sending_now`).
_send_now: ContextVar[bool] = ContextVar("send_now", default=False)


@contextmanager
def sending_now() -> Iterator[None]:
    """Sends made inside are sent at once, and fail there: `engine.submit` and `engine.retry`
    return a job that RabbitMQ has, or raise."""
    token = _send_now.set(True)
    try:
        yield
    finally:
        _send_now.reset(token)


#: How long (seconds) a closing consumer waits for the store to record the ends of the jobs
#: it has yet to ack; a message it could not ack is delivered again, and its job, recorded
#: finished by then, is skipped.
SETTLE_TIMEOUT = 10.0

#: Connect timeouts (seconds) of every connection the broker opens, unless the URL sets
#: ``socket_timeout`` or ``stack_timeout``: pika's defaults, 10 s and 15 s, would hold a
#: request for a minute before it learns that RabbitMQ is down.
SOCKET_TIMEOUT = 2.0
STACK_TIMEOUT = 5.0

#: How long (seconds) a sending connection may stay blocked by RabbitMQ (a memory or disk
#: alarm) before the send fails instead of hanging, unless the URL sets
#: ``blocked_connection_timeout``.
BLOCKED_CONNECTION_TIMEOUT = 10.0

_T = TypeVar("_T")

#: What a broken channel or connection raises; the operation is retried on another.
_AMQP_ERRORS = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError)


def hq_name(queue_name: str) -> str:
    """The hold queue of a queue: where messages delayed longer than the hold time wait."""
    return q_name(queue_name) + ".HQ"


class RabbitmqBroker(HookDispatch, _DramatiqRabbitmqBroker):
    """Dramatiq's RabbitMQ broker with long delays that survive ``consumer_timeout``, a bounded
    connection pool for senders, and jobs never left `queued` without a message.

    Each queue ``q`` comes with ``q.DQ`` (delayed messages due within `delay_hold_ms`, held by a
    worker until due), ``q.HQ`` (delayed messages due later, waiting out a TTL of
    `delay_hold_ms` at a time) and ``q.XQ`` (dead letters).

    Connections: each worker process opens one per consumed queue and delay queue (Dramatiq's
    consumers), plus at most `pool_size` shared by every thread that sends (``actor.send``,
    `engine.submit`, retries, delayed messages falling due), plus one for `queue_depths` when
    it is called. A sending thread borrows a connection for one publish and gives it back;
    when all are lent it waits for one. A broken connection is dropped and replaced.

    ``broker.connection`` and ``broker.channel`` are Dramatiq's: a connection and a channel of
    the calling thread, opened on first use outside the pool, for code of the user's own
    (health checks, declarations); ``del broker.connection`` closes a broken one, and the next
    use opens another. The broker's own sends never use them.

    Parameters:
      url(str|list[str]): the ``amqp://`` URL(s) of RabbitMQ. pika's URL options (e.g.
        ``?heartbeat=30&socket_timeout=5``) apply; see :class:`dramatiq.brokers.rabbitmq.RabbitmqBroker`.
      middleware(list[Middleware]): see :class:`Broker<dramatiq.Broker>`. When it includes
        `Tracking`, a job whose first message cannot be sent is deleted from its store again.
      max_priority(int): queues are declared with this ``x-max-priority``; None for none.
      quorum_queues(bool): declare quorum queues (``x-queue-type: quorum``), replicated across
        the cluster's nodes. RabbitMQ 3.10 quorum queues have no priorities, so `max_priority`
        must then be None.
      delay_hold_ms(int): delays longer than this wait in the hold queue. It must be below
        RabbitMQ's ``consumer_timeout``; the hold queues are declared with it as their TTL,
        which RabbitMQ will not change on an existing queue (see README, "RabbitMQ").
      pool_size(int): how many connections sending threads share.
      send_behind_timeout(float): how long (seconds) jobs sent without waiting keep being
        tried while RabbitMQ cannot be reached, before they are failed (see `enqueue`).
      confirm_delivery(bool): wait for RabbitMQ to confirm each message has been taken.
      parameters(list[dict]), **kwargs: pika connection parameters instead of a URL.

    Raises:
      ValueError: quorum queues with a max_priority, or a hold time or pool size below 1.
    """

    def __init__(
        self,
        *,
        url: Optional[Union[str, list[str]]] = None,
        middleware: Optional[list[Middleware]] = None,
        max_priority: Optional[int] = None,
        quorum_queues: bool = False,
        delay_hold_ms: int = DEFAULT_DELAY_HOLD_MS,
        pool_size: int = DEFAULT_POOL_SIZE,
        send_behind_timeout: float = DEFAULT_SEND_BEHIND_TIMEOUT,
        confirm_delivery: bool = True,
        parameters: Optional[list[dict[str, Any]]] = None,
        **kwargs: Any,
    ) -> None:
        if quorum_queues and max_priority:
            raise ValueError("RabbitMQ quorum queues have no priorities: pass max_priority=None with quorum_queues")
        if delay_hold_ms < 1 or pool_size < 1:
            raise ValueError(f"delay_hold_ms and pool_size must be at least 1, got {delay_hold_ms} and {pool_size}")
        super().__init__(
            confirm_delivery=confirm_delivery,
            url=url,
            middleware=middleware,
            max_priority=max_priority,
            parameters=parameters,
            **kwargs,
        )
        for each in _as_list(self.parameters):
            _default(each, "socket_timeout", SOCKET_TIMEOUT)
            _default(each, "stack_timeout", STACK_TIMEOUT)
        self.quorum_queues = quorum_queues
        self.delay_hold_ms = delay_hold_ms
        self.send_behind_timeout = send_behind_timeout
        self.pool = _ChannelPool(_for_senders(self.parameters), pool_size, confirm_delivery=confirm_delivery)
        self.sender = _Sender(self)
        self._depths_lock = threading.Lock()
        self._depths_connection: Optional[BlockingConnection] = None
        self._depths_channel: Optional[BlockingChannel] = None

    #: Consumers ack a message once Tracking has recorded its end (`when_recorded`).
    settles_when_recorded = True

    @property
    def consumer_class(self) -> type[_RabbitmqConsumer]:
        return _HoldingConsumer

    @property
    def address(self) -> str:
        """Where RabbitMQ is, for messages: ``host:port/vhost`` of each URL, without credentials."""
        return ", ".join(f"{each.host}:{each.port}/{each.virtual_host}" for each in _as_list(self.parameters))

    def close(self) -> None:
        """Send the jobs waiting to be sent, then close the sender's connection, the pooled
        ones (lent ones when they are given back) and the one of `queue_depths`. The broker
        opens new ones if it is used again."""
        self.sender.close(timeout=self.send_behind_timeout + 1)
        self.pool.close()
        with self._depths_lock:
            self._close_depths_connection()
        super().close()

    # -- sending -----------------------------------------------------------------------------

    def enqueue(self, message: Message, *, delay: Optional[int] = None) -> Message:
        """Enqueue a message, after `delay` milliseconds.

        A message delayed by up to `delay_hold_ms` goes to the delay queue, as with Dramatiq; a
        longer delay, to the hold queue. ``before_enqueue`` hooks run once, before the publish.

        A new job sent from outside a worker's threads (a web app, a script) is sent without
        waiting: this returns once the job is handed to the sender thread (see `_Sender`), and
        `wait_sent` (``engine.flush``) waits for it. Workers' sends (retries, delayed messages
        falling due, jobs sent by jobs), jobs with an idempotency key, and sends made inside
        `sending_now` are sent at once, and raise here.

        Raises:
          BrokerUnavailable: RabbitMQ did not take the first message of a job; its row, which
            Tracking had just written, is deleted again: nothing was enqueued.
          ConnectionClosed: RabbitMQ did not take the message of a job recorded earlier (a
            retry, a delayed message falling due); the job's row is left as it is.
        """
        canonical_name = q_name(message.queue_name)
        routing_key = canonical_name
        if delay is not None:
            message = message.copy(queue_name=dq_name(canonical_name), options={"eta": current_millis() + delay})
            routing_key = hq_name(canonical_name) if delay > self.delay_hold_ms else dq_name(canonical_name)

        self.declare_queue(canonical_name)
        self.logger.debug("Enqueueing message %r on queue %r.", message.message_id, routing_key)
        if self._sends_behind(message):
            in_flight: list[Pending[None]] = []
            token = rows_in_flight.set(in_flight)
            try:
                self.emit_before("enqueue", message, delay)
            finally:
                rows_in_flight.reset(token)
            self.sender.send(routing_key, message, delay, in_flight)
            return message
        recorded_since = time.time()
        self.emit_before("enqueue", message, delay)
        try:
            self._publish(routing_key, message)
        except ConnectionClosed as error:
            if self._forget_new_job(message, recorded_since):
                raise BrokerUnavailable(self.address, message.message_id, str(error)) from error
            raise
        self.emit_after("enqueue", message, delay)
        return message

    def wait_sent(self, timeout: Optional[float] = None) -> None:
        """Wait until every job sent without waiting so far is in RabbitMQ (``engine.flush``).

        Raises:
          JobsNotSent: RabbitMQ did not take some of them (each is `failed`; each failure is
            raised once).
          TimeoutError: some are still being sent after `timeout` seconds.
        """
        self.sender.wait(timeout=timeout)

    def settle_sends(self, message_id: Optional[str] = None) -> None:
        """Wait until the job (or every job) being sent without waiting is in RabbitMQ or
        failed: what reads do first, so that a process reads its own sends. Raises nothing."""
        self.sender.wait(message_id, report=False)

    def _sends_behind(self, message: Message) -> bool:
        # In a worker's threads a send must be done before the message being processed (or the
        # delayed one falling due) is acked; a job with an idempotency key must learn of a
        # duplicate; `sending_now` asks for the error here.
        return not (
            _send_now.get()
            or message.options.get("idempotency_key")
            or isinstance(threading.current_thread(), (WorkerThread, ConsumerThread))
        )

    def hold(self, message: Message) -> None:
        """Send a delayed message to its hold queue, to come back to its delay queue after
        `delay_hold_ms`. No middleware runs: the job is still the same delayed job.

        Raises:
          ConnectionClosed: RabbitMQ did not take it.
        """
        self._publish(hq_name(message.queue_name), message)

    def _publish(self, routing_key: str, message: Message) -> None:
        properties = _properties(message)
        body = message.encode()
        self._on_a_channel(
            q_name(message.queue_name),
            lambda channel: channel.basic_publish(
                exchange="",
                routing_key=routing_key,
                body=body,
                properties=properties,
                # Only with confirms does RabbitMQ report a message that no queue took.
                mandatory=self.confirm_delivery,
            ),
        )

    def _on_a_channel(self, canonical_name: str, operation: Callable[[BlockingChannel], _T]) -> _T:
        """Run `operation` on a pooled channel, after declaring the queue if it may be missing;
        on a broken channel or connection, again on another, for up to `SEND_TIMEOUT` seconds.

        Raises:
          ConnectionClosed: the last try failed too.
        """
        deadline = time.monotonic() + SEND_TIMEOUT
        pause = RETRY_DELAY
        while True:
            try:
                with self.pool.channel() as channel:
                    self._declare_if_pending(channel, canonical_name)
                    return operation(channel)
            except _AMQP_ERRORS as error:
                # A message no queue took: its queue was deleted. Declare it again.
                if isinstance(error, pika.exceptions.UnroutableError):
                    self.queues_pending.add(canonical_name)
                if time.monotonic() + pause > deadline:
                    raise ConnectionClosed(error) from None
                self.logger.debug("RabbitMQ failed (%r); trying again in %.2f s.", error, pause)
                time.sleep(pause)
                pause = min(2 * pause, 1.0)

    def _forget_new_job(self, message: Message, recorded_since: float) -> bool:
        """Delete the row of the job whose message was not sent, if this enqueue created it.

        Returns:
          bool: True if it was a new job, now forgotten; False if it was recorded before (the
          job then still needs its message), or if no Tracking middleware records jobs.
        """
        store = self._store()
        if store is None:
            return False
        try:
            return store.forget_unsent(message.message_id, recorded_since=recorded_since)
        except Exception:
            self.logger.exception("Failed to delete job %s, whose message was not sent.", message.message_id)
            return False

    def _store(self) -> Optional[Store]:
        for middleware in self.middleware:
            if isinstance(middleware, Tracking):
                return middleware.store
        return None

    # -- queues ------------------------------------------------------------------------------

    def _ensure_queue(self, canonical_queue_name: str) -> None:
        if canonical_queue_name in self.queues_pending:
            self._on_a_channel(canonical_queue_name, lambda channel: None)

    def _declare_if_pending(self, channel: BlockingChannel, canonical_name: str) -> None:
        """Declare the queue on `channel` if it may be missing (new, or deleted meanwhile)."""
        if canonical_name in self.queues_pending:
            self._declare_queues(channel, canonical_name)
            self.queues_pending.discard(canonical_name)

    def _declare_queues(self, channel: BlockingChannel, queue_name: str) -> None:
        """Declare a queue with its delay, hold and dead-letter queues."""
        arguments = self._build_queue_arguments(queue_name)
        channel.queue_declare(queue=queue_name, durable=True, arguments=arguments)
        channel.queue_declare(queue=dq_name(queue_name), durable=True, arguments=arguments)
        channel.queue_declare(queue=hq_name(queue_name), durable=True, arguments=self._build_hold_arguments(queue_name))
        dead_letters: dict[str, Any] = {"x-message-ttl": DEAD_MESSAGE_TTL}
        if self.quorum_queues:
            dead_letters["x-queue-type"] = "quorum"
        channel.queue_declare(queue=xq_name(queue_name), durable=True, arguments=dead_letters)

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments = super()._build_queue_arguments(queue_name)
        if self.quorum_queues:
            arguments["x-queue-type"] = "quorum"
        return arguments

    def _build_hold_arguments(self, queue_name: str) -> dict[str, Any]:
        # One TTL for every message: they expire in the order they came in, none blocked
        # behind a later one (RabbitMQ only expires messages at the head of a queue).
        arguments: dict[str, Any] = {
            "x-message-ttl": self.delay_hold_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dq_name(queue_name),
        }
        if self.quorum_queues:
            # Quorum queues drop a message whose dead-lettering fails unless told otherwise.
            arguments["x-queue-type"] = "quorum"
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"  # what at-least-once dead-lettering requires
        return arguments

    # -- reading the queues ------------------------------------------------------------------

    def queue_depths(self) -> dict[str, dict[str, int]]:
        """How many messages each declared queue holds, by kind.

        Counts come from RabbitMQ's passive declares, which count the messages that wait to be
        delivered: messages delivered to a worker and not yet acknowledged (running, prefetched,
        or delayed and due within `delay_hold_ms`) are not counted anywhere.

        Returns:
          {queue: {"ready": n, "delayed": n, "dead": n}}: ready messages wait in the queue,
          delayed ones in its delay and hold queues, dead ones in its dead-letter queue.

        Raises:
          ConnectionClosed: RabbitMQ cannot be reached.
        """
        with self._depths_lock:
            try:
                return self._count_messages()
            except _AMQP_ERRORS:
                # Most likely a connection that RabbitMQ closed while it was idle: once more.
                self._close_depths_connection()
            try:
                return self._count_messages()
            except _AMQP_ERRORS as error:
                self._close_depths_connection()
                raise ConnectionClosed(error) from None

    def get_queue_message_counts(self, queue_name: str) -> tuple[int, int, int]:
        """The numbers of messages ready in a queue, in its delay and hold queues, and in its
        dead-letter queue (see `queue_depths`)."""
        depths = self.queue_depths().get(q_name(queue_name)) or {"ready": 0, "delayed": 0, "dead": 0}
        return depths["ready"], depths["delayed"], depths["dead"]

    def join(
        self, queue_name: str, min_successes: int = 10, idle_time: int = 100, *, timeout: Optional[int] = None
    ) -> None:
        """Wait until a queue and its delay and hold queues have no message ready. Only meant for
        tests, and unreliable as Dramatiq's: messages held by workers are not seen.

        Raises:
          QueueJoinTimeout: When the timeout elapses.
        """
        deadline = timeout and time.monotonic() + timeout / 1000
        successes = 0
        while successes < min_successes:
            if deadline and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)
            ready, delayed, _ = self.get_queue_message_counts(queue_name)
            successes = successes + 1 if ready + delayed == 0 else 0
            time.sleep(idle_time / 1000)

    def flush(self, queue_name: str) -> None:
        """Drop all the messages of a queue and of its delay, hold and dead-letter queues,
        the process's sends still on their way included: they are waited for first."""
        self.settle_sends()
        for name in (q_name(queue_name), dq_name(queue_name), hq_name(queue_name), xq_name(queue_name)):
            try:
                with self.pool.channel() as channel:
                    channel.queue_purge(name)
            except pika.exceptions.ChannelClosedByBroker as error:
                if error.reply_code != 404:  # a queue not declared yet has nothing to drop
                    raise ConnectionClosed(error) from None
            except _AMQP_ERRORS as error:
                raise ConnectionClosed(error) from None

    def flush_all(self) -> None:
        """Drop all the messages of every declared queue."""
        for queue_name in self.queues:
            self.flush(queue_name)

    def _count_messages(self) -> dict[str, dict[str, int]]:
        depths = {}
        for queue in sorted(self.queues):
            depths[queue] = {
                "ready": self._count(queue),
                "delayed": self._count(dq_name(queue)) + self._count(hq_name(queue)),
                "dead": self._count(xq_name(queue)),
            }
        return depths

    def _count(self, queue_name: str) -> int:
        """Messages ready in a queue; 0 for a queue RabbitMQ does not have yet."""
        if self._depths_channel is None or not self._depths_channel.is_open:
            if self._depths_connection is None or not _alive(self._depths_connection):
                self._close_depths_connection()
                self._depths_connection = pika.BlockingConnection(parameters=self.parameters)
            self._depths_channel = self._depths_connection.channel()
        try:
            return self._depths_channel.queue_declare(queue=queue_name, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code != 404:
                raise
            self._depths_channel = None  # RabbitMQ closes a channel after a failed declare
            return 0

    def _close_depths_connection(self) -> None:
        if self._depths_connection is not None:
            _close_quietly(self._depths_connection)
        self._depths_connection = self._depths_channel = None


class _HoldingConsumer(_RabbitmqConsumer):
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

    broker: RabbitmqBroker

    def __init__(self, broker: RabbitmqBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.delayed = queue_name.endswith(".DQ")
        self.unsettled: set[Pending[None]] = set()
        self.prefetch = prefetch
        self._given = 0  # messages given to Dramatiq and not settled yet (main queues)
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
            except _AMQP_ERRORS as error:
                raise ConnectionClosed(error) from None

    def _limit_channel(self, queue_name: str, timeout: int) -> None:
        """Set the channel-wide limit, or, on a RabbitMQ that refuses it (global QoS is a
        deprecated feature from RabbitMQ 4.0 on, which a server can deny), consume on a new
        channel with Dramatiq's fixed limit per consumer, holding nothing."""
        try:
            self.channel.basic_qos(prefetch_count=self._window, global_qos=True)
        except pika.exceptions.ChannelClosedByBroker as refused:
            self.logger.warning("RabbitMQ refused a channel-wide prefetch (%s): no message is held.", refused)
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
        self.logger.debug("Message %r is due in %d ms: back to its hold queue.", message.message_id, due_in)
        # Published and confirmed before the ack, so a crash in between duplicates the
        # message (Tracking runs a job once) rather than losing it.
        self.broker.hold(message._message)
        self.known_tags.discard(message._tag)
        try:
            self.channel.basic_ack(message._tag)
        except _AMQP_ERRORS as error:
            raise ConnectionClosed(error) from None
        return None

    def _give_or_hold(self, message: Any) -> Any:
        """The message for Dramatiq if one of its slots is free, else None (it is held)."""
        with self._lock:
            if self._given < self.prefetch:
                self._given += 1
                message.given_by = self
                return message
            self._held.append((message, time.monotonic()))
            return None

    def _take_held(self) -> Any:
        """The oldest held message if a slot is free (it then takes the slot), else None."""
        if not self._held:  # read without the lock: an append it misses is taken at the next call
            return None
        with self._lock:
            if not self._held or self._given >= self.prefetch:
                return None
            self._given += 1
            message, _ = self._held.popleft()
        message.given_by = self
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
                self.logger.debug("Message %r waited behind busy threads: back to its queue.", message.message_id)
                self.channel.basic_nack(message._tag, requeue=True)
        except _AMQP_ERRORS as error:
            raise ConnectionClosed(error) from None

    def ack(self, message: Any) -> None:
        self._settle_when_recorded(message, ack=True)

    def nack(self, message: Any) -> None:
        self._settle_when_recorded(message, ack=False)

    def _settle_when_recorded(self, message: Any, *, ack: bool) -> None:
        """Settle once the end of the message's job is committed to the store (`when_recorded`):
        the worker thread does not wait for it, and its slot goes to the next held message."""
        self._free_slot(message)
        recorded = when_recorded(message, lambda: self._settle_soon(message._tag, ack))
        if recorded is not None:
            self.unsettled.add(recorded)
            recorded.add_done_callback(self.unsettled.discard)

    def _free_slot(self, message: Any) -> None:
        """The message's thread is free: give it the next held message, if there is one."""
        if getattr(message, "given_by", None) is not self:
            return  # delivered on a delay queue, or to this consumer's predecessor
        message.given_by = None
        with self._lock:
            self._given -= 1
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
                self.logger.warning("Failed to settle message: not in known tags.")
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
        except _AMQP_ERRORS as error:
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
        wait_all(list(self.unsettled), timeout=SETTLE_TIMEOUT)
        try:
            super().close()
        finally:
            _close_quietly(self.connection)


class _Outgoing(NamedTuple):
    """A message sent without waiting, on its way to RabbitMQ."""

    routing_key: str
    message: Message
    body: bytes  # encoded by the caller, who learns if it cannot be
    delay: Optional[int]
    recorded: list[Pending[None]]  # the writes of its job's row
    sent: Pending[None]


class _Sender:
    """Sends the messages `RabbitmqBroker.enqueue` takes without waiting, from a thread of its
    own, in batches, on a connection of its own with publisher confirms (see `_Publisher`): a
    message is sent once RabbitMQ has confirmed it (persisted it). A message goes out only
    once its job's row is committed (the store's writer batches those too), so no worker
    receives a job the store does not know.

    A RabbitMQ that cannot be reached is tried again, with growing pauses, for
    `send_behind_timeout` seconds; the jobs of a batch still not sent then are `failed`, with
    the reason as their last error (``engine retry`` sends them again), and `wait` raises
    `JobsNotSent`. At most `SEND_BEHIND_CAPACITY` messages wait: a send beyond that blocks.
    """

    def __init__(self, broker: "RabbitmqBroker") -> None:
        self.broker = broker
        self.unsent: dict[str, Pending[None]] = {}
        self.errors: list[Exception] = []  # of sends that failed, for `wait` to report
        self._thread: BatchThread[_Outgoing] = BatchThread(
            "rabbitmq-sender", lambda: _Publisher(self), max_batch=SEND_BEHIND_BATCH, capacity=SEND_BEHIND_CAPACITY
        )
        self._pid = 0  # of the process whose sends `unsent` holds

    def send(self, routing_key: str, message: Message, delay: Optional[int], recorded: list[Pending[None]]) -> None:
        """Queue a message whose row is being written; blocks while the queue is full."""
        self._own_process()
        sent: Pending[None] = Pending()
        self.unsent[message.message_id] = sent
        sent.add_done_callback(lambda _: self.unsent.pop(message.message_id, None))
        self._thread.put(_Outgoing(routing_key, message, message.encode(), delay, recorded, sent))

    def wait(self, message_id: Optional[str] = None, timeout: Optional[float] = None, *, report: bool = True) -> None:
        """Wait until the message (or every message sent so far) is in RabbitMQ, or failed.

        Raises (when `report` is true):
          JobsNotSent, TrackingError: the message could not be sent; without a `message_id`,
            some message since the last call could not (each failure is raised once).
          TimeoutError: still not sent after `timeout` seconds.
        """
        self._own_process()
        if message_id is None:
            pending = list(self.unsent.values())
        else:
            future = self.unsent.get(message_id)
            pending = [future] if future is not None else []
        all_done = wait_all(pending, timeout=timeout)
        if not report:
            return
        if not all_done:
            left = [job_id for job_id, future in list(self.unsent.items()) if not future.done()]
            raise TimeoutError(
                f"{len(left)} jobs are still being sent to RabbitMQ at {self.broker.address} after {timeout} s "
                f"(the first: {', '.join(left[:5])})"
            )
        if message_id is not None:
            for future in pending:
                future.result()  # raises its error
            return
        errors, self.errors = self.errors, []
        if errors:
            raise errors[0]

    def close(self, timeout: float) -> None:
        """Send what is waiting (for `timeout` seconds at most), then stop the thread."""
        self._thread.close(timeout)

    def waiting(self) -> int:
        """How many messages are waiting for the sender thread to take them."""
        return self._thread.waiting()

    def _own_process(self) -> None:
        """Start this process's bookkeeping: a forked child has none of its parent's sends
        (they leave with the parent's thread), and flushes its own when it exits."""
        if self._pid != writer.current_pid:
            self._pid = writer.current_pid
            self.unsent, self.errors = {}, []
            atexit.register(self._flush_at_exit, writer.current_pid)

    def _flush_at_exit(self, pid: int) -> None:
        if pid != writer.current_pid:  # registered by the parent, before a fork
            return
        try:
            self.wait(timeout=self.broker.send_behind_timeout + 1)
        except (JobsNotSent, TimeoutError) as error:
            self.broker.logger.error("Exiting with jobs not sent: %s", error)


class _Publisher:
    """The sender thread's connection to RabbitMQ, and how it sends.

    Messages are published with publisher confirms, without waiting for each: RabbitMQ
    confirms a message once it has taken it (persisted it, for a durable queue), usually many
    with one ack, while the next ones are published. The publisher waits for confirms only when
    nothing else is waiting to be sent, or when `MAX_UNCONFIRMED` are outstanding. (An AMQP
    transaction per batch waited for each commit: twice the CPU per message, and RabbitMQ idle
    while the next batch was published.)

    pika's BlockingChannel would wait for each confirm: its underlying channel (``_impl``,
    what BlockingChannel itself drives) is used for publishing, confirms and returns, so that
    they are handled in the order RabbitMQ sends them (a return comes before its message's ack).
    """

    def __init__(self, sender: _Sender) -> None:
        self.sender = sender
        self.broker = sender.broker
        self._connection: Optional[BlockingConnection] = None
        self._channel: Optional[BlockingChannel] = None
        self._unconfirmed: dict[int, _Outgoing] = {}  # by delivery tag, oldest first
        self._last_tag = 0
        self._returned: set[str] = set()
        # Taken and not published yet: new, or returned or nacked and to go again.
        self._to_publish: deque[_Outgoing] = deque()

    def __call__(self, batch: list[_Outgoing]) -> None:
        self._send([outgoing for outgoing in batch if self._recorded(outgoing)])

    def close(self) -> None:
        """The sender thread stops: what it published waits for RabbitMQ's confirms first (its
        last batch left them for the next one), so that each job ends sent or failed."""
        if self._unconfirmed or self._to_publish:
            self._send([])
        self._disconnect()

    def _send(self, batch: list[_Outgoing]) -> None:
        """Publish `batch`, and settle what RabbitMQ confirmed; while RabbitMQ fails, try it
        (with what it had not confirmed yet) again, for up to `send_behind_timeout` seconds."""
        self._to_publish.extend(batch)
        give_up_at = time.monotonic() + self.broker.send_behind_timeout
        pause = RETRY_DELAY
        while True:
            try:
                self._settle(wait=not self.sender.waiting())
                return
            except _AMQP_ERRORS as error:
                self._disconnect()
                unsettled = self._take_unsettled()
                if time.monotonic() + pause > give_up_at:
                    self._give_up(unsettled, repr(error))
                    return
                self.broker.logger.warning("RabbitMQ failed (%r); sending %d jobs again in %.2f s.", error, len(unsettled), pause)
                time.sleep(pause)
                pause = min(2 * pause, 1.0)
                self._to_publish.extend(unsettled)
            except Exception as error:  # a bug: fail the messages visibly, keep the thread alive
                self.broker.logger.exception("Failed to send jobs.")
                self._disconnect()
                self._give_up(self._take_unsettled(), repr(error))
                return

    def _recorded(self, outgoing: _Outgoing) -> bool:
        """Wait for the job's row; False (the send failed) if it could not be written."""
        wait_all(outgoing.recorded)
        errors = [future.exception() for future in outgoing.recorded if future.exception() is not None]
        if errors:
            self.broker.logger.error("Job %s is not sent: its row could not be written: %r", outgoing.message.message_id, errors[0])
            self.sender.errors.append(errors[0])  # type: ignore[arg-type]
            outgoing.sent.set_exception(errors[0])  # type: ignore[arg-type]
        return not errors

    def _publish_waiting(self) -> None:
        """Publish what waits, each message counted unconfirmed before it goes out, so that
        a failure halfway leaves every message either waiting or unconfirmed, none in both."""
        channel = self._open_channel()
        while self._to_publish:
            outgoing = self._to_publish[0]
            self.broker._declare_if_pending(channel, q_name(outgoing.message.queue_name))
            self._last_tag += 1
            self._unconfirmed[self._last_tag] = self._to_publish.popleft()
            channel._impl.basic_publish(
                exchange="",
                routing_key=outgoing.routing_key,
                body=outgoing.body,
                properties=_properties(outgoing.message),
                mandatory=True,
            )

    def _settle(self, *, wait: bool) -> None:
        """Publish what waits and handle the confirms that came in; with `wait`, until none is
        outstanding. Messages returned (their queue was deleted: it is declared again first) or
        nacked go again."""
        while True:
            self._publish_waiting()
            assert self._connection is not None
            self._connection.process_data_events(time_limit=0)
            if self._to_publish:
                continue
            if not self._unconfirmed or not (wait or len(self._unconfirmed) > MAX_UNCONFIRMED):
                return
            self._connection.process_data_events(time_limit=CONFIRM_POLL_S)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        for tag in self._confirmed_tags(method.delivery_tag, method.multiple):
            outgoing = self._unconfirmed.pop(tag, None)
            if outgoing is None:
                continue
            if not acked or outgoing.message.message_id in self._returned:
                self._returned.discard(outgoing.message.message_id)
                self._to_publish.append(outgoing)
            else:
                outgoing.sent.set_result(None)
                self.broker.emit_after("enqueue", outgoing.message, outgoing.delay)

    def _confirmed_tags(self, delivery_tag: int, multiple: bool) -> list[int]:
        if not multiple:
            return [delivery_tag]
        tags = []
        for tag in self._unconfirmed:  # oldest first
            if tag > delivery_tag:
                break
            tags.append(tag)
        return tags

    def _on_return(self, _channel: Any, _method: Any, _properties: Any, body: bytes) -> None:
        message = Message.decode(body)
        self.broker.queues_pending.add(q_name(message.queue_name))
        self._returned.add(message.message_id)

    def _take_unsettled(self) -> list[_Outgoing]:
        """What was published and not confirmed, or is to go again: after a failure, all of it
        goes again (RabbitMQ may hold some of it: a job delivered twice is skipped by its start)."""
        unsettled = [*self._unconfirmed.values(), *self._to_publish]
        self._unconfirmed, self._returned = {}, set()
        self._to_publish.clear()
        return unsettled

    def _open_channel(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        if self._connection is None or not self._connection.is_open:
            self._connection = pika.BlockingConnection(parameters=_for_senders(self.broker.parameters))
        channel = self._connection.channel()
        channel._impl.add_on_return_callback(self._on_return)
        channel._impl.confirm_delivery(ack_nack_callback=self._on_confirm)
        self._connection.process_data_events(time_limit=0)  # Confirm.SelectOk
        self._channel, self._last_tag = channel, 0
        return channel

    def _give_up(self, batch: list[_Outgoing], reason: str) -> None:
        job_ids = [outgoing.message.message_id for outgoing in batch]
        error = JobsNotSent(self.broker.address, job_ids, reason)
        self.broker.logger.error("%s", error)
        store = self.broker._store()
        for outgoing in batch:
            if store is not None:
                try:
                    store.fail_unsent(outgoing.message.message_id, f"not sent: {error}")
                except Exception:
                    self.broker.logger.exception("Failed to fail job %s, whose message was not sent.", outgoing.message.message_id)
            outgoing.sent.set_exception(error)
        self.sender.errors.append(error)

    def _disconnect(self) -> None:
        if self._connection is not None:
            _close_quietly(self._connection)
        self._connection = self._channel = None


class _ChannelPool:
    """At most `size` connections, each with one channel, lent to one thread at a time (pika's
    connections are not thread-safe).

    A borrowed connection is checked first (a non-blocking read notices one that RabbitMQ
    closed while it sat idle and missed heartbeats): a dead one is dropped and another taken
    or opened. A connection that fails while lent is dropped; a channel that RabbitMQ closed is
    reopened on its connection.
    """

    def __init__(self, parameters: Any, size: int, *, confirm_delivery: bool) -> None:
        self.parameters = parameters
        self.size = size
        self.confirm_delivery = confirm_delivery
        self.opened = 0  # idle and lent
        self.idle: list[tuple[BlockingConnection, BlockingChannel]] = []
        self.available = threading.Condition()

    @contextmanager
    def channel(self) -> Iterator[BlockingChannel]:
        """Borrow a channel for one operation, waiting while all connections are lent.

        Raises:
          pika.exceptions.AMQPConnectionError: a connection could not be opened.
        """
        connection, channel = self._borrow()
        try:
            yield channel
        except pika.exceptions.AMQPChannelError:
            self._give_back(connection, channel)
            raise
        except BaseException:
            # A failed connection, or an operation cut off in the middle (its replies may
            # still come): not safe to lend again.
            self._drop(connection)
            raise
        self._give_back(connection, channel)

    def close(self) -> None:
        """Close the idle connections."""
        with self.available:
            idle, self.idle = self.idle, []
            self.opened -= len(idle)
            self.available.notify_all()
        for connection, _ in idle:
            _close_quietly(connection)

    def _borrow(self) -> tuple[BlockingConnection, BlockingChannel]:
        while True:
            with self.available:
                while not self.idle and self.opened >= self.size:
                    self.available.wait()
                if not self.idle:
                    self.opened += 1  # taken now, opened outside the lock
                    break
                connection, channel = self.idle.pop()  # the most recently used: likeliest alive
            if channel.is_open and _alive(connection):
                return connection, channel
            self._drop(connection)
        try:
            return self._open()
        except BaseException:
            self._drop(None)
            raise

    def _open(self) -> tuple[BlockingConnection, BlockingChannel]:
        connection = pika.BlockingConnection(parameters=self.parameters)
        try:
            return connection, self._open_channel(connection)
        except BaseException:
            _close_quietly(connection)
            raise

    def _open_channel(self, connection: BlockingConnection) -> BlockingChannel:
        channel = connection.channel()
        if self.confirm_delivery:
            channel.confirm_delivery()
        return channel

    def _give_back(self, connection: BlockingConnection, channel: BlockingChannel) -> None:
        if connection.is_open and not channel.is_open:
            try:
                channel = self._open_channel(connection)
            except _AMQP_ERRORS:
                pass
        if not (connection.is_open and channel.is_open):
            self._drop(connection)
            return
        with self.available:
            self.idle.append((connection, channel))
            self.available.notify()

    def _drop(self, connection: Optional[BlockingConnection]) -> None:
        if connection is not None:
            _close_quietly(connection)
        with self.available:
            self.opened -= 1
            self.available.notify()


def _properties(message: Message) -> pika.BasicProperties:
    return pika.BasicProperties(delivery_mode=2, priority=message.options.get("broker_priority"))


def _alive(connection: BlockingConnection) -> bool:
    """Whether an idle connection still works: a zero-time read handles what RabbitMQ sent
    meanwhile (heartbeats, or the close of a connection that missed too many of them)."""
    if not connection.is_open:
        return False
    try:
        connection.process_data_events(time_limit=0)
    except _AMQP_ERRORS:
        return False
    return connection.is_open


def _close_quietly(connection: BlockingConnection) -> None:
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # already broken: nothing more to release
        pass


def _as_list(parameters: Any) -> list[pika.ConnectionParameters]:
    return list(parameters) if isinstance(parameters, list) else [parameters]


def _default(parameters: pika.ConnectionParameters, name: str, value: float) -> None:
    """Set a pika parameter that still has pika's default (a URL or caller's value stays)."""
    if getattr(parameters, name) == getattr(pika.ConnectionParameters, "DEFAULT_" + name.upper()):
        setattr(parameters, name, value)


def _for_senders(parameters: Any) -> Any:
    """The parameters of the pool's connections: those of consumers, plus a bound on how long
    a send waits out a RabbitMQ alarm. Consumers must not get it: RabbitMQ notifies every
    connection of an alarm, and pika would close a consumer's that stays blocked."""
    senders = [copy.copy(each) for each in _as_list(parameters)]
    for each in senders:
        _default(each, "blocked_connection_timeout", BLOCKED_CONNECTION_TIMEOUT)
    return senders if isinstance(parameters, list) else senders[0]
