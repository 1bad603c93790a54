"""Queue depths (engine/brokers/rabbitmq/depths.py) against a real RabbitMQ."""

from __future__ import annotations

import pytest

from tests.brokers.rabbitmq.support import HOLD_MS, rabbitmq_connections, recorder
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration


def test_queue_depths_count_ready_delayed_and_dead_messages(brokers, queue):
    broker = brokers(delay_hold_ms=HOLD_MS)
    actor, _ = recorder(broker, queue)
    for n in range(3):
        actor.send(n)
    actor.send_with_options(delay=500)
    actor.send_with_options(delay=60_000)
    consumer = broker.consume(queue, prefetch=1, timeout=1000)
    consumer.nack(wait_for(lambda: next(consumer), 5, "a delivery"))  # dead-lettered
    consumer.close()

    assert broker.queue_depths() == {queue: {"ready": 2, "delayed": 2, "dead": 1}}


def test_queue_depths_reuse_one_connection(brokers, queue):
    broker = brokers()
    recorder(broker, queue)[0].send(0)
    broker.queue_depths()
    opened = rabbitmq_connections()

    for _ in range(20):
        broker.queue_depths()

    assert rabbitmq_connections() == opened


def test_queue_depths_of_a_queue_rabbitmq_does_not_have_yet_are_zero(brokers, queue):
    broker = brokers()
    broker.declare_queue(queue)  # known to the broker, not declared in RabbitMQ yet

    assert broker.queue_depths() == {queue: {"ready": 0, "delayed": 0, "dead": 0}}
