"""Notifiers: how one process tells the others that something happened, without waiting for them
to look in the store. One module per transport, as Oban has:

- `unix`: a directory of Unix datagram sockets beside the store's SQLite file, one socket per
  listening process: the processes of one machine (the embedded broker's wake-ups, cancel
  requests on the embedded broker).
- `amqp`: a RabbitMQ fanout exchange, each listening process on an exclusive queue of its own:
  the processes of several hosts (cancel requests with RabbitMQ).

Both carry short messages at most once; a listener that misses one finds out by polling the store.
"""

from .amqp import Fanout
from .unix import SocketDirectory, SocketListener, sidecar_directory

__all__ = ["Fanout", "SocketDirectory", "SocketListener", "sidecar_directory"]
