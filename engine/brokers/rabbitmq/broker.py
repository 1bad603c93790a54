"""The RabbitMQ broker itself: Dramatiq's, with what a long-lived deployment needs on top.

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
- New jobs sent from outside a worker are sent behind the caller's back (`sender.Sender`): in
  batches, after their rows are committed, with confirms pipelined; `wait_sent` waits.
- `queue_depths`, the same report as the embedded broker's.
- Quorum queues on request (replicated; RabbitMQ 3.10 gives them no priorities).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, TypeVar, Union

import pika
import pika.exceptions
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, _RabbitmqConsumer
from dramatiq.brokers.rabbitmq import RabbitmqBroker as _DramatiqRabbitmqBroker
from dramatiq.common import current_millis, dq_name, q_name, xq_name
from dramatiq.errors import ConnectionClosed, QueueJoinTimeout
from dramatiq.message import Message
from dramatiq.middleware import Middleware
from dramatiq.worker import ConsumerThread, WorkerThread
from loguru import logger
from pika.adapters.blocking_connection import BlockingChannel

from ...backoff import Backoff
from ...errors import BrokerUnavailable
from ...store import Store
from ...tracked_broker import TrackedBroker, collecting_row_writes, sends_now
from ...writer import Pending
from ..hooks import HookDispatch
from .connection import (
    AMQP_ERRORS,
    RETRY_FIRST_PAUSE_S,
    RETRY_MAX_PAUSE_S,
    SOCKET_TIMEOUT_S,
    STACK_TIMEOUT_S,
    as_list,
    for_senders,
    message_properties,
    set_default,
)
from .consumer import HoldingConsumer
from .depths import QueueDepths, hq_name
from .pool import ChannelPool
from .sender import DEFAULT_SEND_BEHIND_TIMEOUT_S, Sender

#: Delays longer than this (milliseconds) wait in the hold queue by default. It must stay below
#: RabbitMQ's ``consumer_timeout`` (30 minutes unless configured), as a message due within it
#: is held unacknowledged by a consumer until it is due.
DEFAULT_DELAY_HOLD_MS = 10 * 60_000

#: How many connections sending threads share by default.
DEFAULT_POOL_SIZE = 8

#: How long (seconds) a publish (or a queue declaration) keeps being tried, each time on a
#: working or new connection, before `ConnectionClosed` is raised: long enough to ride out a
#: RabbitMQ restart or failover (a second or two), short enough for a web request. With the
#: connect timeouts of `connection`, a send to a RabbitMQ that is down fails after about 3 s
#: when its host refuses connections, and about 4.5 s when the host does not answer at all.
SEND_TIMEOUT_S = 3.0

_T = TypeVar("_T")


class RabbitmqBroker(HookDispatch, TrackedBroker, _DramatiqRabbitmqBroker):
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
      store(Store): where Tracking (in `middleware`) records the broker's jobs; a job whose
        first message cannot be sent is deleted from it again. None: jobs are not tracked.
      middleware(list[Middleware]): see :class:`Broker<dramatiq.Broker>`.
      max_priority(int): queues are declared with this ``x-max-priority``; None for none.
      quorum_queues(bool): declare quorum queues (``x-queue-type: quorum``), replicated across
        the cluster's nodes. RabbitMQ 3.10 quorum queues have no priorities, so `max_priority`
        must then be None.
      delay_hold_ms(int): delays longer than this wait in the hold queue. It must be below
        RabbitMQ's ``consumer_timeout``; the hold queues are declared with it as their TTL,
        which RabbitMQ will not change on an existing queue (see README, "RabbitMQ").
      pool_size(int): how many connections sending threads share.
      send_behind_timeout_s(float): how long (seconds) jobs sent without waiting keep being
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
        store: Optional[Store] = None,
        middleware: Optional[list[Middleware]] = None,
        max_priority: Optional[int] = None,
        quorum_queues: bool = False,
        delay_hold_ms: int = DEFAULT_DELAY_HOLD_MS,
        pool_size: int = DEFAULT_POOL_SIZE,
        send_behind_timeout_s: float = DEFAULT_SEND_BEHIND_TIMEOUT_S,
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
        for each in as_list(self.parameters):
            set_default(each, "socket_timeout", SOCKET_TIMEOUT_S)
            set_default(each, "stack_timeout", STACK_TIMEOUT_S)
        self.store = store
        self.quorum_queues = quorum_queues
        self.delay_hold_ms = delay_hold_ms
        self.send_behind_timeout_s = send_behind_timeout_s
        self.pool = ChannelPool(for_senders(self.parameters), pool_size, confirm_delivery=confirm_delivery)
        self.sender = Sender(self)
        self.depths = QueueDepths(self.parameters, lambda: self.queues)
        # The pending records of how attempts ended, by message (`settle_when_recorded`).
        self._end_records: dict[int, Pending[None]] = {}

    #: New jobs sent from outside a worker leave from the sender's thread (see `enqueue`).
    sends_behind = True

    @property
    def consumer_class(self) -> type[_RabbitmqConsumer]:
        return HoldingConsumer

    @property
    def address(self) -> str:
        """Where RabbitMQ is, for messages: ``host:port/vhost`` of each URL, without credentials."""
        return ", ".join(f"{each.host}:{each.port}/{each.virtual_host}" for each in as_list(self.parameters))

    def close(self) -> None:
        """Send the jobs waiting to be sent, then close the sender's connection, the pooled
        ones (lent ones when they are given back) and the one of `queue_depths`. The broker
        opens new ones if it is used again."""
        self.sender.close(timeout=self.send_behind_timeout_s + 1)
        self.pool.close()
        self.depths.close()
        super().close()

    # -- sending -----------------------------------------------------------------------------

    def enqueue(self, message: Message, *, delay: Optional[int] = None) -> Message:
        """Enqueue a message, after `delay` milliseconds.

        A message delayed by up to `delay_hold_ms` goes to the delay queue, as with Dramatiq; a
        longer delay, to the hold queue. ``before_enqueue`` hooks run once, before the publish.

        A new job sent from outside a worker's threads (a web app, a script) is sent without
        waiting: this returns once the job is handed to the sender thread (see `sender.Sender`), and
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
        if self._sends_behind(message):
            with collecting_row_writes() as row_writes:
                self.emit_before("enqueue", message, delay)
            self.sender.send(routing_key, message, delay, row_writes)
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
            sends_now()
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
        properties = message_properties(message)
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
        backoff = Backoff(RETRY_FIRST_PAUSE_S, RETRY_MAX_PAUSE_S, within_s=SEND_TIMEOUT_S)
        while True:
            try:
                with self.pool.channel() as channel:
                    self._declare_if_pending(channel, canonical_name)
                    return operation(channel)
            except AMQP_ERRORS as error:
                # A message no queue took: its queue was deleted. Declare it again.
                if isinstance(error, pika.exceptions.UnroutableError):
                    self.queues_pending.add(canonical_name)
                if backoff.exhausted():
                    raise ConnectionClosed(error) from None
                logger.debug("RabbitMQ failed ({!r}); trying again in {:.2f} s.", error, backoff.next_s)
                backoff.pause()

    def _forget_new_job(self, message: Message, recorded_since: float) -> bool:
        """Delete the row of the job whose message was not sent, if this enqueue created it.

        Returns:
          bool: True if it was a new job, now forgotten; False if it was recorded before (the
          job then still needs its message), or if the broker has no store.
        """
        if self.store is None:
            return False
        try:
            return self.store.forget_unsent(message.message_id, recorded_since=recorded_since)
        except Exception:
            logger.exception("Failed to delete job {}, whose message was not sent.", message.message_id)
            return False

    def settle_when_recorded(self, message: MessageProxy, recorded: Pending[None]) -> bool:
        """Consumers ack or nack the message once `recorded` is committed (see
        `HoldingConsumer`), so that the worker thread goes on to its next job at once."""
        self._end_records[id(message)] = recorded
        return True

    def end_record_of(self, message: MessageProxy) -> Optional[Pending[None]]:
        """The pending record of how the message's attempt ended, once (None if Tracking
        handed none: a message it skipped, or one of a delay queue)."""
        return self._end_records.pop(id(message), None)

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
        return self.depths.count()

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
            except AMQP_ERRORS as error:
                raise ConnectionClosed(error) from None

    def flush_all(self) -> None:
        """Drop all the messages of every declared queue."""
        for queue_name in self.queues:
            self.flush(queue_name)
