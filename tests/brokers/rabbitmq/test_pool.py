"""The senders' channel pool (engine/brokers/rabbitmq/pool.py) against a real RabbitMQ: a bounded
number of connections shared by many threads, and connections RabbitMQ closed replaced."""

from __future__ import annotations

import threading

import pytest

from engine.tracked_broker import sending_now

from tests.brokers.rabbitmq.support import rabbitmq_connections, rabbitmqctl, recorder
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration


def test_many_sending_threads_share_a_bounded_pool_of_connections(brokers, queue, spy):
    broker = brokers(pool_size=3)
    actor, _ = recorder(broker, queue)
    before = rabbitmq_connections()
    all_sent = threading.Barrier(41)

    def send_and_linger() -> None:
        with sending_now():  # through the pool
            for n in range(5):
                actor.send(n)
        all_sent.wait(timeout=30)  # alive while the connections are counted

    senders = [threading.Thread(target=send_and_linger) for _ in range(40)]
    for sender in senders:
        sender.start()
    all_sent.wait(timeout=30)
    during = rabbitmq_connections() - before
    for sender in senders:
        sender.join()

    assert 1 <= during <= 3
    assert spy(queue) == 200


def test_a_sender_waits_while_every_pooled_connection_is_lent(brokers, queue, spy):
    broker = brokers(pool_size=1)
    actor, _ = recorder(broker, queue)
    actor.send(0)  # declares the queue

    def send_at_once() -> None:
        with sending_now():
            actor.send(1)

    sender = threading.Thread(target=send_at_once)

    with broker.pool.channel():
        sender.start()
        sender.join(0.5)
        assert sender.is_alive() and spy(queue) == 1
    sender.join(5)

    assert not sender.is_alive() and spy(queue) == 2


def test_connections_that_rabbitmq_closed_are_replaced(brokers, amqp_vhost, queue):
    broker = brokers(pool_size=2)
    actor, _ = recorder(broker, queue)
    actor.send(0)
    assert broker.queue_depths()[queue]["ready"] == 1

    # when RabbitMQ closes every connection of the vhost (a restart, a network cut)
    rabbitmqctl("close_all_connections", "--vhost", amqp_vhost, "closed by a test")

    # then the next send and the next count open new ones, and the broken ones are let go
    actor.send(1)
    assert broker.queue_depths()[queue]["ready"] == 2
    wait_for(lambda: rabbitmq_connections() <= 2, 5, "only the new connections to remain")
