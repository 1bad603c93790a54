"""Queue depths: how many messages each of the broker's queues holds, read from RabbitMQ."""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Optional

import pika
import pika.exceptions
from dramatiq.common import dq_name, q_name, xq_name
from dramatiq.errors import ConnectionClosed
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from .connection import AMQP_ERRORS, alive, close_quietly


def hq_name(queue_name: str) -> str:
    """The hold queue of a queue: where messages delayed longer than the hold time wait."""
    return q_name(queue_name) + ".HQ"


class QueueDepths:
    """Counts the messages of queues on a connection of its own, kept between calls (a
    passive declare per queue), opened again when RabbitMQ closed it.

    Parameters:
      parameters: pika connection parameters.
      queues: the declared queues, read at each count.
    """

    def __init__(self, parameters: Any, queues: Callable[[], Iterable[str]]) -> None:
        self.parameters = parameters
        self.queues = queues
        self._lock = threading.Lock()
        self._connection: Optional[BlockingConnection] = None
        self._channel: Optional[BlockingChannel] = None

    def count(self) -> dict[str, dict[str, int]]:
        """{queue: {"ready": n, "delayed": n, "dead": n}} (see `RabbitmqBroker.queue_depths`).

        Raises:
          ConnectionClosed: RabbitMQ cannot be reached.
        """
        with self._lock:
            try:
                return self._count_messages()
            except AMQP_ERRORS:
                # Most likely a connection that RabbitMQ closed while it was idle: once more.
                self._disconnect()
            try:
                return self._count_messages()
            except AMQP_ERRORS as error:
                self._disconnect()
                raise ConnectionClosed(error) from None

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def _count_messages(self) -> dict[str, dict[str, int]]:
        depths = {}
        for queue in sorted(self.queues()):
            depths[queue] = {
                "ready": self._ready(queue),
                "delayed": self._ready(dq_name(queue)) + self._ready(hq_name(queue)),
                "dead": self._ready(xq_name(queue)),
            }
        return depths

    def _ready(self, queue_name: str) -> int:
        """Messages ready in a queue; 0 for a queue RabbitMQ does not have yet."""
        if self._channel is None or not self._channel.is_open:
            if self._connection is None or not alive(self._connection):
                self._disconnect()
                self._connection = pika.BlockingConnection(parameters=self.parameters)
            self._channel = self._connection.channel()
        try:
            return self._channel.queue_declare(queue=queue_name, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code != 404:
                raise
            self._channel = None  # RabbitMQ closes a channel after a failed declare
            return 0

    def _disconnect(self) -> None:
        if self._connection is not None:
            close_quietly(self._connection)
        self._connection = self._channel = None
