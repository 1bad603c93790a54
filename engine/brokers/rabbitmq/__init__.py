"""The RabbitMQ broker: Dramatiq's, with long delays that survive ``consumer_timeout``, a
bounded connection pool for senders, sends behind the caller's back, and queue depths.

One subsystem per module: `broker` (the broker and its queue declarations), `consumer` (the
holding consumer), `sender` (the sender behind), `pool` (the sending threads' connections),
`depths` (queue depths), `connection` (what every connection shares).
"""

from .broker import RabbitmqBroker
from .depths import hq_name

__all__ = ["RabbitmqBroker", "hq_name"]
