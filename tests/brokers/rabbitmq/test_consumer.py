"""The holding consumer (engine/brokers/rabbitmq/consumer.py) against a real RabbitMQ: messages
held behind busy worker threads, handed back to their queue, and settled in order."""

from __future__ import annotations

import time

import dramatiq
import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from engine.brokers import RabbitmqBroker
from engine.brokers.rabbitmq import consumer as rabbitmq_consumer
from engine.brokers.rabbitmq.consumer import HAND_BACK_AFTER_S, HELD_PER_SLOT
from engine.writer import Pending

from tests.brokers.rabbitmq.support import recorder
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration


def consume_jobs(broker: RabbitmqBroker, queue: str, jobs: int):
    """Send `jobs` jobs and consume them with a prefetch of one; returns the consumer."""
    actor, _ = recorder(broker, queue)
    for n in range(jobs):
        actor.send(n)
    return broker.consume(queue, prefetch=1, timeout=100)


def nothing_delivered(consumer) -> bool:
    """No message comes for 0.3 s (three idle ticks)."""
    return [next(consumer) for _ in range(3)] == [None] * 3


def test_a_consumer_holds_more_messages_and_gives_one_as_a_slot_frees(brokers, queue, spy, monkeypatch):
    monkeypatch.setattr(rabbitmq_consumer, "HAND_BACK_AFTER_S", 60.0)  # none is handed back here
    consumer = consume_jobs(broker := brokers(), queue, HELD_PER_SLOT + 2)
    first = wait_for(lambda: next(consumer), 5, "a delivery")

    # given the one slot taken, the next messages are held, and the last left in the queue
    assert nothing_delivered(consumer)
    assert spy(queue) == 1

    # when the first job ends, its end still being recorded (its message unacknowledged)
    broker.settle_when_recorded(first, recorded := Pending())
    consumer.ack(first)

    # then its slot goes to the oldest held message at once, and no other comes
    second = next(consumer)
    assert second is not None
    assert nothing_delivered(consumer)

    # and once the first is acknowledged, the last comes to be held
    recorded.set_result(None)
    wait_for(lambda: next(consumer) is None and spy(queue) == 0, 5, "the last message delivered")
    taken = [first, second]
    while len(taken) < HELD_PER_SLOT + 2:
        consumer.ack(taken[-1])
        taken.append(wait_for(lambda: next(consumer), 5, "a held message"))
    assert [message.args[0] for message in taken] == list(range(HELD_PER_SLOT + 2))
    consumer.ack(taken[-1])
    consumer.close()


def test_messages_held_behind_a_busy_thread_go_back_to_their_queue(brokers, queue, spy):
    held = HELD_PER_SLOT
    consumer = consume_jobs(broker := brokers(), queue, 1 + held)
    first = wait_for(lambda: next(consumer), 5, "a delivery")

    # when the first job runs on and on, the next messages held behind it
    wait_for(lambda: next(consumer) is None and spy(queue) == 0, 5, "the next messages delivered")

    # then they go back to the queue within the hand-back time and a tick, and stay there
    started = time.monotonic()
    wait_for(lambda: next(consumer) is None and spy(queue) == held, 5, "the held messages back in the queue")
    assert time.monotonic() - started < HAND_BACK_AFTER_S + 0.3
    assert nothing_delivered(consumer)
    assert spy(queue) == held

    # and a consumer with free slots gets them, in their order
    other = broker.consume(queue, prefetch=held, timeout=100)
    taken = [wait_for(lambda: next(other), 5, "a delivery") for _ in range(held)]
    assert [message.args[0] for message in taken] == list(range(1, 1 + held))
    for message in taken:
        other.ack(message)
    consumer.ack(first)
    other.close()
    consumer.close()


def test_a_rabbitmq_that_refuses_a_channel_wide_prefetch_gets_a_fixed_one(brokers, queue, monkeypatch, spy):
    # RabbitMQ 4 can deny global QoS (a deprecated feature); this RabbitMQ cannot, so the
    # refusal is raised where pika would raise it
    basic_qos = BlockingChannel.basic_qos

    def refuse_global(channel, *args, global_qos=False, **kwargs):
        if global_qos:
            raise pika.exceptions.ChannelClosedByBroker(540, "NOT_IMPLEMENTED - global QoS is denied")
        return basic_qos(channel, *args, global_qos=global_qos, **kwargs)

    monkeypatch.setattr(BlockingChannel, "basic_qos", refuse_global)
    consumer = consume_jobs(broker := brokers(), queue, 3)
    first = wait_for(lambda: next(consumer), 5, "a delivery")

    # then nothing is held, and a slot stays taken until its message is settled
    assert nothing_delivered(consumer)
    assert spy(queue) == 2
    broker.settle_when_recorded(first, recorded := Pending())
    consumer.ack(first)
    assert nothing_delivered(consumer)
    recorded.set_result(None)
    second = wait_for(lambda: next(consumer), 5, "the second delivery")
    consumer.ack(second)
    consumer.close()


def test_acks_of_later_messages_leave_an_earlier_unsettled_one_unacknowledged(brokers, queue, spy):
    actor, _ = recorder(broker := brokers(), queue)
    for n in range(4):
        actor.send(n)
    consumer = broker.consume(queue, prefetch=4, timeout=100)
    first, *later = [wait_for(lambda: next(consumer), 5, "a delivery") for _ in range(4)]

    # when every message but the first is acknowledged (the consumer sends the acks as one
    # when it can) while the first one's job still runs
    for message in reversed(later):
        consumer.ack(message)
    assert nothing_delivered(consumer)

    # then the first is still the consumer's: it goes back to the queue when the consumer goes
    consumer.close()
    assert wait_for(lambda: spy(queue) == 1, 5, "the first message back in the queue")
    assert [message.args[0] for message in (first, *later)] == [0, 1, 2, 3]


def test_a_worker_thread_that_ends_its_job_runs_the_held_message_next(brokers, workers, queue):
    broker = brokers()
    runs: list[tuple[int, float]] = []

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name=f"sleeper_{queue}")
    def sleeper(n: int, seconds: float) -> None:
        runs.append((n, time.monotonic()))
        time.sleep(seconds)

    workers(broker, queue, prefetch=1)  # one thread, as engine.worker sets it: one message held
    # when a job that runs for less than the hand-back time is followed by another
    sleeper.send(0, 0.12)  # ends between two of the consumer thread's idle ticks, 0.1 s apart
    sleeper.send(1, 0)
    wait_for(lambda: len(runs) == 2, 5, "both jobs to run")

    # then the second, held meanwhile, runs as soon as the first ends, handed over by the
    # thread that ran the first, not at the consumer thread's next idle tick
    assert [n for n, _ in runs] == [0, 1]
    assert runs[1][1] - runs[0][1] < 0.12 + 0.04
