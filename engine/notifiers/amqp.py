"""Notifications between the processes of several hosts: a RabbitMQ fanout exchange. Each
listening process consumes it through an exclusive, auto-deleted queue on a connection of its
own, and connects again when that connection is lost."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Optional

import pika
import pika.exceptions
from loguru import logger
from pika.adapters.blocking_connection import BlockingChannel

from ..backoff import Backoff
from ._delivery import OnMessage, deliver

#: How long a broadcast may take to connect and publish before it gives up.
SEND_TIMEOUT_S = 2.0

#: The first and the longest pause before a lost listener connects again.
RECONNECT_MIN_PAUSE_S = 0.5
RECONNECT_MAX_PAUSE_S = 10.0


class Fanout:
    """A RabbitMQ fanout exchange that carries short messages to every listening process.

    Parameters:
      url(str): the amqp:// URL of RabbitMQ.
      exchange(str): the exchange's name; it is declared durable, so that it outlives a RabbitMQ
        restart between a listener's reconnects.
      name(str): what the messages are, in connection names (``engine <name> request <host>``,
        ``engine <name> listener <pid> <host>``) and in logs.
    """

    def __init__(self, url: str, exchange: str, *, name: str) -> None:
        self.url = url
        self.exchange = exchange
        self.name = name
        self._closing = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._consuming: Optional[tuple[pika.BlockingConnection, BlockingChannel]] = None

    def broadcast(self, message: bytes) -> list[str]:
        """Publish `message` to every listener, over a connection of its own.

        A short connection per message: these are rare, and an idle long-lived connection would
        only need heartbeats and reconnects. Short timeouts too (unless the URL sets its own),
        for a caller should not wait long for a RabbitMQ that is down.

        Returns:
          list[str]: always empty: which listeners a fanout reaches is not known.

        Raises:
          ConnectionError: RabbitMQ could not be reached or refused the message.
        """
        parameters = self._parameters(f"{self.name} request")
        if "socket_timeout" not in self.url:
            parameters.socket_timeout = SEND_TIMEOUT_S
        if "stack_timeout" not in self.url:
            parameters.stack_timeout = SEND_TIMEOUT_S
        try:
            connection = pika.BlockingConnection(parameters)
            try:
                channel = connection.channel()
                self._declare(channel)
                channel.basic_publish(self.exchange, routing_key="", body=message)
            finally:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    connection.close()
        except (pika.exceptions.AMQPError, OSError) as error:
            raise ConnectionError(f"cannot publish to the exchange {self.exchange!r}: {error!r}") from error
        return []

    def listen(self, on_message: OnMessage, *, thread_name: str) -> None:
        """Call `on_message` with each message, from a thread of its own, until `close`.

        The thread connects again, with pauses doubling up to `RECONNECT_MAX_PAUSE_S`, whenever
        RabbitMQ cannot be reached; messages published meanwhile are lost.
        """
        self._closing.clear()
        self._thread = threading.Thread(target=self._consume, args=(on_message,), name=thread_name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening."""
        self._closing.set()
        with self._lock:
            consuming = self._consuming
        if consuming is not None:
            connection, channel = consuming
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.add_callback_threadsafe(channel.stop_consuming)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _consume(self, on_message: OnMessage) -> None:
        backoff = Backoff(RECONNECT_MIN_PAUSE_S, RECONNECT_MAX_PAUSE_S)
        while not self._closing.is_set():
            try:
                connection = pika.BlockingConnection(self._parameters(f"{self.name} listener {os.getpid()}"))
            except (pika.exceptions.AMQPError, OSError) as error:
                logger.warning(
                    "Cannot reach RabbitMQ for {} notifications ({!r}); retrying in {:.1f} s.", self.name, error, backoff.next_s
                )
                backoff.pause(self._closing)
                continue
            try:
                channel = connection.channel()
                with self._lock:
                    self._consuming = (connection, channel)
                if self._closing.is_set():
                    break
                self._declare(channel)
                queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
                channel.queue_bind(queue, self.exchange)
                channel.basic_consume(
                    queue, lambda _ch, _method, _props, body: deliver(on_message, body, self.exchange), auto_ack=True
                )
                backoff.reset()
                channel.start_consuming()
            except (pika.exceptions.AMQPError, OSError) as error:
                if not self._closing.is_set():
                    logger.warning("Lost RabbitMQ for {} notifications ({!r}); connecting again.", self.name, error)
                    backoff.pause(self._closing)
            finally:
                with self._lock:
                    self._consuming = None
                if connection.is_open:
                    with contextlib.suppress(pika.exceptions.AMQPError):
                        connection.close()

    def _parameters(self, purpose: str) -> pika.URLParameters:
        parameters = pika.URLParameters(self.url)
        parameters.client_properties = {"connection_name": f"engine {purpose} {socket.gethostname()}"}
        return parameters

    def _declare(self, channel: BlockingChannel) -> None:
        channel.exchange_declare(self.exchange, exchange_type="fanout", durable=True)
