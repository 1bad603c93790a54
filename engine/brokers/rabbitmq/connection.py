"""What every RabbitMQ connection of the broker shares: its timeouts, the errors that mean it
broke, and small helpers around pika's connections and parameters."""

from __future__ import annotations

import copy
from typing import Any

import pika
import pika.exceptions
from dramatiq.message import Message
from pika.adapters.blocking_connection import BlockingConnection

#: Connect timeouts (seconds) of every connection the broker opens, unless the URL sets
#: ``socket_timeout`` or ``stack_timeout``: pika's defaults, 10 s and 15 s, would hold a
#: request for a minute before it learns that RabbitMQ is down.
SOCKET_TIMEOUT_S = 2.0
STACK_TIMEOUT_S = 5.0

#: How long (seconds) a sending connection may stay blocked by RabbitMQ (a memory or disk
#: alarm) before the send fails instead of hanging, unless the URL sets
#: ``blocked_connection_timeout``.
BLOCKED_CONNECTION_TIMEOUT_S = 10.0

#: What a broken channel or connection raises; the operation is retried on another.
AMQP_ERRORS = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError)


def message_properties(message: Message) -> pika.BasicProperties:
    """The AMQP properties of a job's message: persistent, with its priority."""
    return pika.BasicProperties(delivery_mode=2, priority=message.options.get("broker_priority"))


def alive(connection: BlockingConnection) -> bool:
    """Whether an idle connection still works: a zero-time read handles what RabbitMQ sent
    meanwhile (heartbeats, or the close of a connection that missed too many of them)."""
    if not connection.is_open:
        return False
    try:
        connection.process_data_events(time_limit=0)
    except AMQP_ERRORS:
        return False
    return connection.is_open


def close_quietly(connection: BlockingConnection) -> None:
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # already broken: nothing more to release
        pass


def as_list(parameters: Any) -> list[pika.ConnectionParameters]:
    return list(parameters) if isinstance(parameters, list) else [parameters]


def set_default(parameters: pika.ConnectionParameters, name: str, value: float) -> None:
    """Set a pika parameter that still has pika's default (a URL or caller's value stays)."""
    if getattr(parameters, name) == getattr(pika.ConnectionParameters, "DEFAULT_" + name.upper()):
        setattr(parameters, name, value)


def for_senders(parameters: Any) -> Any:
    """The parameters of the sending connections: those of consumers, plus a bound on how long
    a send waits out a RabbitMQ alarm. Consumers must not get it: RabbitMQ notifies every
    connection of an alarm, and pika would close a consumer's that stays blocked."""
    senders = [copy.copy(each) for each in as_list(parameters)]
    for each in senders:
        set_default(each, "blocked_connection_timeout", BLOCKED_CONNECTION_TIMEOUT_S)
    return senders if isinstance(parameters, list) else senders[0]


#: A failed operation is tried again after this pause (seconds), twice as long after each
#: failure, at most `RETRY_MAX_PAUSE_S`, each time on a working or new connection.
RETRY_FIRST_PAUSE_S = 0.25
RETRY_MAX_PAUSE_S = 1.0
