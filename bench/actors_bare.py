"""Bare Dramatiq: the benchmark's reference side.

``dramatiq bench.actors_bare --processes P --threads T`` with ``BENCH_AMQP_URL`` set. A plain
``dramatiq.brokers.rabbitmq.RabbitmqBroker(url=...)`` with Dramatiq's default middleware and
default options (no publisher confirms, no queue priorities), made the global broker, and the
same job bodies as `bench.actors_engine`.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from . import bodies

broker = RabbitmqBroker(url=os.environ["BENCH_AMQP_URL"])
dramatiq.set_broker(broker)

noop = dramatiq.actor(bodies.noop, broker=broker)
io_1ms = dramatiq.actor(bodies.io_1ms, broker=broker)
probe = dramatiq.actor(bodies.probe, broker=broker)
