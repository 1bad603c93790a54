"""The pool of connections that the broker's sending threads share."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from .connection import AMQP_ERRORS, alive, close_quietly


class ChannelPool:
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
            close_quietly(connection)

    def _borrow(self) -> tuple[BlockingConnection, BlockingChannel]:
        while True:
            with self.available:
                while not self.idle and self.opened >= self.size:
                    self.available.wait()
                if not self.idle:
                    self.opened += 1  # taken now, opened outside the lock
                    break
                connection, channel = self.idle.pop()  # the most recently used: likeliest alive
            if channel.is_open and alive(connection):
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
            close_quietly(connection)
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
            except AMQP_ERRORS:
                pass
        if not (connection.is_open and channel.is_open):
            self._drop(connection)
            return
        with self.available:
            self.idle.append((connection, channel))
            self.available.notify()

    def _drop(self, connection: Optional[BlockingConnection]) -> None:
        if connection is not None:
            close_quietly(connection)
        with self.available:
            self.opened -= 1
            self.available.notify()
