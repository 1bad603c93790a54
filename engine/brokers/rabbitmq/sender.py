"""The sender behind: new jobs sent from outside a worker leave from a thread of their own, in
batches, after their rows are committed, with publisher confirms pipelined."""

from __future__ import annotations

import atexit
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import pika
import pika.exceptions
from dramatiq.common import q_name
from dramatiq.message import Message
from loguru import logger
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from ... import writer
from ...backoff import Backoff
from ...errors import JobsNotSent
from ...writer import BatchThread, Pending, wait_all
from .connection import AMQP_ERRORS, RETRY_FIRST_PAUSE_S, RETRY_MAX_PAUSE_S, close_quietly, for_senders, message_properties

if TYPE_CHECKING:
    from .broker import RabbitmqBroker

#: Jobs sent without waiting (see `Sender`): how many may wait to be sent, how many the sender
#: takes at a time, how many may wait for RabbitMQ's confirm, how often (seconds) the sender
#: looks for confirms while it waits for them, and how long (seconds) messages keep being tried
#: while RabbitMQ is down. Two batches may wait: a caller that sends faster than the sender
#: keeps up then waits for room, which leaves the GIL to the writer and the sender.
SEND_BEHIND_CAPACITY = 1_000
SEND_BEHIND_BATCH = 500
MAX_UNCONFIRMED = 5_000
CONFIRM_POLL_S = 0.001
DEFAULT_SEND_BEHIND_TIMEOUT_S = 30.0


class Outgoing(NamedTuple):
    """A message sent without waiting, on its way to RabbitMQ."""

    routing_key: str
    message: Message
    body: bytes  # encoded by the caller, who learns if it cannot be
    delay: Optional[int]
    recorded: list[Pending[None]]  # the writes of its job's row
    sent: Pending[None]


class Sender:
    """Sends the messages `RabbitmqBroker.enqueue` takes without waiting, from a thread of its
    own, in batches, on a connection of its own with publisher confirms (see `Publisher`): a
    message is sent once RabbitMQ has confirmed it (persisted it). A message goes out only
    once its job's row is committed (the store's writer batches those too), so no worker
    receives a job the store does not know.

    A RabbitMQ that cannot be reached is tried again, with growing pauses, for
    `send_behind_timeout_s` seconds; the jobs of a batch still not sent then are `failed`, with
    the reason as their last error (``engine retry`` sends them again), and `wait` raises
    `JobsNotSent`. At most `SEND_BEHIND_CAPACITY` messages wait: a send beyond that blocks.
    """

    def __init__(self, broker: RabbitmqBroker) -> None:
        self.broker = broker
        self.unsent: dict[str, Pending[None]] = {}
        self.errors: list[Exception] = []  # of sends that failed, for `wait` to report
        self._thread: BatchThread[Outgoing] = BatchThread(
            "rabbitmq-sender", lambda: Publisher(self), max_batch=SEND_BEHIND_BATCH, capacity=SEND_BEHIND_CAPACITY
        )
        self._pid = 0  # of the process whose sends `unsent` holds

    def send(self, routing_key: str, message: Message, delay: Optional[int], recorded: list[Pending[None]]) -> None:
        """Queue a message whose row is being written; blocks while the queue is full."""
        self._own_process()
        sent: Pending[None] = Pending()
        self.unsent[message.message_id] = sent
        sent.add_done_callback(lambda _: self.unsent.pop(message.message_id, None))
        self._thread.put(Outgoing(routing_key, message, message.encode(), delay, recorded, sent))

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
            self.wait(timeout=self.broker.send_behind_timeout_s + 1)
        except (JobsNotSent, TimeoutError) as error:
            logger.error("Exiting with jobs not sent: {}", error)


class Publisher:
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

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.broker = sender.broker
        self._connection: Optional[BlockingConnection] = None
        self._channel: Optional[BlockingChannel] = None
        self._unconfirmed: dict[int, Outgoing] = {}  # by delivery tag, oldest first
        self._last_tag = 0
        self._returned: set[str] = set()
        # Taken and not published yet: new, or returned or nacked and to go again.
        self._to_publish: deque[Outgoing] = deque()

    def __call__(self, batch: list[Outgoing]) -> None:
        self._send([outgoing for outgoing in batch if self._recorded(outgoing)])

    def close(self) -> None:
        """The sender thread stops: what it published waits for RabbitMQ's confirms first (its
        last batch left them for the next one), so that each job ends sent or failed."""
        if self._unconfirmed or self._to_publish:
            self._send([])
        self._disconnect()

    def _send(self, batch: list[Outgoing]) -> None:
        """Publish `batch`, and settle what RabbitMQ confirmed; while RabbitMQ fails, try it
        (with what it had not confirmed yet) again, for up to `send_behind_timeout_s` seconds."""
        self._to_publish.extend(batch)
        backoff = Backoff(RETRY_FIRST_PAUSE_S, RETRY_MAX_PAUSE_S, within_s=self.broker.send_behind_timeout_s)
        while True:
            try:
                self._settle(wait=not self.sender.waiting())
                return
            except AMQP_ERRORS as error:
                self._disconnect()
                unsettled = self._take_unsettled()
                if backoff.exhausted():
                    self._give_up(unsettled, repr(error))
                    return
                logger.warning("RabbitMQ failed ({!r}); sending {} jobs again in {:.2f} s.", error, len(unsettled), backoff.next_s)
                backoff.pause()
                self._to_publish.extend(unsettled)
            except Exception as error:  # a bug: fail the messages visibly, keep the thread alive
                logger.exception("Failed to send jobs.")
                self._disconnect()
                self._give_up(self._take_unsettled(), repr(error))
                return

    def _recorded(self, outgoing: Outgoing) -> bool:
        """Wait for the job's row; False (the send failed) if it could not be written."""
        wait_all(outgoing.recorded)
        errors = [future.exception() for future in outgoing.recorded if future.exception() is not None]
        if errors:
            logger.error("Job {} is not sent: its row could not be written: {!r}", outgoing.message.message_id, errors[0])
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
                properties=message_properties(outgoing.message),
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

    def _take_unsettled(self) -> list[Outgoing]:
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
            self._connection = pika.BlockingConnection(parameters=for_senders(self.broker.parameters))
        channel = self._connection.channel()
        channel._impl.add_on_return_callback(self._on_return)
        channel._impl.confirm_delivery(ack_nack_callback=self._on_confirm)
        self._connection.process_data_events(time_limit=0)  # Confirm.SelectOk
        self._channel, self._last_tag = channel, 0
        return channel

    def _give_up(self, batch: list[Outgoing], reason: str) -> None:
        job_ids = [outgoing.message.message_id for outgoing in batch]
        error = JobsNotSent(self.broker.address, job_ids, reason)
        logger.error("{}", error)
        store = self.broker.store
        for outgoing in batch:
            if store is not None:
                try:
                    store.fail_unsent(outgoing.message.message_id, f"not sent: {error}")
                except Exception:
                    logger.exception("Failed to fail job {}, whose message was not sent.", outgoing.message.message_id)
            outgoing.sent.set_exception(error)
        self.sender.errors.append(error)

    def _disconnect(self) -> None:
        if self._connection is not None:
            close_quietly(self._connection)
        self._connection = self._channel = None
