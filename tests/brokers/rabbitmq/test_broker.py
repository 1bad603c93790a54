"""The RabbitMQ broker (engine/brokers/rabbitmq/broker.py) against a real RabbitMQ: long delays
through the hold queue (also with RabbitMQ's consumer_timeout really lowered), failing fast and
leaving no job behind when RabbitMQ is down, connect timeouts, quorum queues, and the thread's
own connection and channel, as in Dramatiq.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Callable, Iterator

import dramatiq
import pytest
from dramatiq import Message
from dramatiq.errors import ConnectionClosed

import engine
import engine.app
from engine import BrokerUnavailable, JobState
from engine.brokers import RabbitmqBroker
from engine.brokers.rabbitmq.connection import SOCKET_TIMEOUT_S

from tests.brokers.rabbitmq.support import HOLD_MS, rabbitmq_connections, rabbitmqctl, recorder, store_of, tracked_broker
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration


def watch_hold(spy: Callable[[str], int], queue: str, until: float) -> list[tuple[float, bool]]:
    """Sample every 50 ms whether a message waits in the queue's hold queue, until a time."""
    samples = []
    while time.time() < until:
        samples.append((time.time(), spy(f"{queue}.HQ") > 0))
        time.sleep(0.05)
    return samples


def longest_out_of_hold(samples: list[tuple[float, bool]]) -> float:
    """The longest time, in seconds, between samples that found the hold queue empty."""
    longest, left_at = 0.0, None
    for at, held in samples:
        if held:
            left_at = None
        else:
            left_at = at if left_at is None else left_at
            longest = max(longest, at - left_at)
    return longest


def test_a_delay_longer_than_the_hold_time_goes_to_the_hold_queue(brokers, queue, spy):
    broker = brokers(delay_hold_ms=HOLD_MS)
    actor, _ = recorder(broker, queue)

    actor.send_with_options(delay=HOLD_MS)  # due within the hold time: Dramatiq's delay queue
    actor.send_with_options(delay=HOLD_MS + 1)  # later: the hold queue
    actor.send_with_options(delay=60_000)

    assert (spy(queue), spy(f"{queue}.DQ"), spy(f"{queue}.HQ")) == (0, 1, 2)
    assert broker.queue_depths()[queue] == {"ready": 0, "delayed": 3, "dead": 0}


def test_the_hold_queue_expires_into_the_delay_queue_after_the_hold_time(brokers, queue, spy):
    broker = brokers(delay_hold_ms=HOLD_MS)
    actor, _ = recorder(broker, queue)

    actor.send_with_options(delay=60_000)
    sent_at = time.monotonic()

    wait_for(lambda: spy(f"{queue}.DQ") == 1, 5, "the message to leave the hold queue")
    assert HOLD_MS / 1000 - 0.1 <= time.monotonic() - sent_at < HOLD_MS / 1000 + 1
    assert spy(f"{queue}.HQ") == 0


def test_a_long_delay_runs_once_on_time_and_waits_in_the_hold_queue_not_in_a_consumer(brokers, workers, queue, spy):
    broker = brokers(delay_hold_ms=HOLD_MS)
    actor, runs = recorder(broker, queue)
    workers(broker, queue)
    holds = []
    hold = broker.hold
    broker.hold = lambda message: holds.append(time.time()) or hold(message)

    # when a job is delayed by four hold times
    message = actor.send_with_options(delay=4_000)
    due = message.options["eta"] / 1000
    samples = watch_hold(spy, queue, until=due)
    wait_for(lambda: runs.times, 5, "the delayed job to run")
    time.sleep(1)  # a second run, were there one, would happen now

    # then it ran once, on time
    [ran_at] = runs.times
    assert due <= ran_at < due + 1.5
    # and it waited in the hold queue, sent back to it by the consumer twice (at 1 s and 2 s:
    # still 3 s and 2 s from due), and no consumer held it for longer than the hold time
    # before it was due
    assert samples[0][1] and len(holds) == 2
    assert longest_out_of_hold(samples) < HOLD_MS / 1000 + 0.1
    assert broker.queue_depths()[queue] == {"ready": 0, "delayed": 0, "dead": 0}


def rabbit_env(*keys: str) -> dict[str, str]:
    """Settings of the running RabbitMQ node, each ``{ok,N}`` or ``undefined``."""
    listed = rabbitmqctl("eval", "[" + ", ".join(f"application:get_env(rabbit, {key})" for key in keys) + "].")
    return dict(zip(keys, re.findall(r"\{ok,\d+\}|undefined", listed)))


def set_rabbit_env(values: dict[str, str]) -> None:
    """Set (``{ok,N}``) or unset (``undefined``) settings of the running RabbitMQ node."""
    expressions = []
    for key, value in values.items():
        number = re.fullmatch(r"\{ok,(\d+)\}", value)
        if number:
            expressions.append(f"application:set_env(rabbit, {key}, {number.group(1)})")
        else:
            expressions.append(f"application:unset_env(rabbit, {key})")
    rabbitmqctl("eval", "[" + ", ".join(expressions) + "].")


@pytest.fixture
def lowered_consumer_timeout() -> Iterator[Callable[[], None]]:
    """RabbitMQ's consumer_timeout at 3 s, checked every second, for the channels opened until
    the test calls the fixture's value: RabbitMQ reads the timeout when a channel opens, and
    every other client of this RabbitMQ is exposed to it meanwhile, so the window is kept
    short. Both settings get their previous values back, whatever happens."""
    saved = rabbit_env("consumer_timeout", "channel_tick_interval")
    lowered = {"consumer_timeout"}

    def restore_consumer_timeout() -> None:
        if lowered:
            set_rabbit_env({"consumer_timeout": saved["consumer_timeout"]})
            lowered.clear()

    try:
        set_rabbit_env({"channel_tick_interval": "{ok,1000}", "consumer_timeout": "{ok,3000}"})
        yield restore_consumer_timeout
    finally:
        restore_consumer_timeout()
        set_rabbit_env({"channel_tick_interval": saved["channel_tick_interval"]})
    assert rabbit_env(*saved) == saved


def test_a_job_delayed_beyond_a_lowered_consumer_timeout_runs_once_on_time(
    brokers, workers, queue, lowered_consumer_timeout
):
    broker = brokers(delay_hold_ms=HOLD_MS)
    actor, runs = recorder(broker, queue)
    worker = workers(broker, queue)
    lowered_consumer_timeout()  # the worker's channels time out deliveries held for 3 s
    consumers = {name: thread.consumer for name, thread in worker.consumers.items()}

    # when a job is delayed by more than twice the consumer timeout
    message = actor.send_with_options(delay=8_000)
    due = message.options["eta"] / 1000
    wait_for(lambda: runs.times, 15, "the delayed job to run")
    time.sleep(1)

    # then it ran once, on time, and no consumer was cut off and restarted meanwhile
    [ran_at] = runs.times
    assert due <= ran_at < due + 1.5
    assert {name: thread.consumer for name, thread in worker.consumers.items()} == consumers


def test_without_the_hold_queue_a_lowered_consumer_timeout_cuts_the_delay_consumer_off(
    brokers, workers, queue, lowered_consumer_timeout
):
    """The control of the test above: the lowered timeout really cuts off Dramatiq's way."""
    broker = brokers(delay_hold_ms=60_000)  # an 8 s delay is held by the consumer
    actor, _ = recorder(broker, queue)
    worker = workers(broker, queue)
    lowered_consumer_timeout()
    delay_consumer = worker.consumers[f"{queue}.DQ"].consumer

    actor.send_with_options(delay=8_000)
    connected = rabbitmq_connections()  # the consumers', and the sender's

    wait_for(lambda: worker.consumers[f"{queue}.DQ"].consumer is not delay_consumer, 10, "the consumer to be cut off")
    # and the connection of the consumer that was cut off is closed, not leaked
    wait_for(lambda: rabbitmq_connections() == connected, 5, "as many connections as before")


def test_a_new_job_sent_to_a_rabbitmq_that_is_down_fails_fast_and_leaves_no_job(tmp_path, down_url):
    broker = tracked_broker(tmp_path, down_url)
    store = store_of(broker)
    actor = dramatiq.actor(lambda: None, broker=broker, actor_name="noop")

    for options in ({}, {"delay": 5_000}, {"delay": 60 * 60_000}):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as raised:
            actor.send_with_options(**options)
        assert time.monotonic() - started < 5

        error = str(raised.value)
        assert "127.0.0.1" in error and "nothing was enqueued" in error and "s3cret" not in error
        assert isinstance(raised.value, ConnectionClosed)  # what code written for Dramatiq catches
    assert store.list_jobs()[0] == []
    broker.close()


def test_engine_submit_fails_fast_when_rabbitmq_is_down(tmp_path, down_url, monkeypatch):
    for name, value in {"ENGINE_BROKER_URL": down_url, "ENGINE_STORE_URL": f"sqlite:///{tmp_path}/engine.db"}.items():
        monkeypatch.setenv(name, value)
    engine.settings.get_settings.cache_clear()
    engine.app._broker = None
    try:
        engine.actor(lambda: None, actor_name="noop")
        started = time.monotonic()

        with pytest.raises(BrokerUnavailable, match="nothing was enqueued"):
            engine.submit("noop", idempotency_key="once")

        assert time.monotonic() - started < 5
        assert engine.jobs().jobs == []
        with pytest.raises(BrokerUnavailable):  # the key is free again: nothing half-made
            engine.submit("noop", idempotency_key="once")
    finally:
        engine.get_broker().close()
        engine.app._broker = None
        engine.settings.get_settings.cache_clear()
        dramatiq.set_broker(None)


def test_a_job_recorded_before_keeps_its_row_when_its_message_cannot_be_sent(tmp_path, amqp_url, down_url, queue):
    # given a job sent once (as when it was first submitted)
    sender = tracked_broker(tmp_path, amqp_url)
    store = store_of(sender)
    message = dramatiq.actor(lambda: None, broker=sender, actor_name="noop", queue_name=queue).send()
    sender.close()

    # when it is sent again (as a retry or a delayed message falling due) and RabbitMQ is down
    broker = tracked_broker(tmp_path, down_url)
    dramatiq.actor(lambda: None, broker=broker, actor_name="noop", queue_name=queue)
    again = Message(queue_name=queue, actor_name="noop", args=(), kwargs={}, options={}, message_id=message.message_id)
    with pytest.raises(ConnectionClosed) as raised:
        broker.enqueue(again)

    # then the error is Dramatiq's, and the job is still there
    assert not isinstance(raised.value, BrokerUnavailable)
    assert store.get(message.message_id).state == JobState.QUEUED
    broker.close()


def test_connect_timeouts_are_bounded_unless_the_url_sets_them():
    assert RabbitmqBroker(url="amqp://localhost/").parameters.socket_timeout == SOCKET_TIMEOUT_S
    assert RabbitmqBroker(url="amqp://localhost/?socket_timeout=7").parameters.socket_timeout == 7


def test_quorum_queues_have_no_priorities():
    with pytest.raises(ValueError, match="no priorities"):
        RabbitmqBroker(url="amqp://localhost/", quorum_queues=True, max_priority=10)


def test_quorum_queues_hold_long_delays_too(brokers, workers, amqp_vhost, queue):
    broker = brokers(quorum_queues=True, max_priority=None, delay_hold_ms=HOLD_MS)
    actor, runs = recorder(broker, queue)
    workers(broker, queue)

    message = actor.send_with_options(delay=2_500)
    wait_for(lambda: runs.times, 10, "the delayed job to run")

    due = message.options["eta"] / 1000
    assert due <= runs.times[0] < due + 1.5
    listed = rabbitmqctl("list_queues", "-q", "--no-table-headers", "-p", amqp_vhost, "name", "type")
    types = dict(line.split("\t") for line in listed.splitlines())
    assert {types[f"{queue}{suffix}"] for suffix in ("", ".DQ", ".HQ", ".XQ")} == {"quorum"}


def test_connection_and_channel_are_the_threads_own_as_in_dramatiq(brokers, queue):
    broker = brokers()

    # a thread's connection and channel are its own, the same at each use
    assert broker.connection is broker.connection and broker.connection.is_open
    broker.channel.queue_declare(queue, durable=True)  # a user's own declaration
    assert broker.channel.queue_declare(queue, passive=True).method.message_count == 0
    other: list = []
    thread = threading.Thread(target=lambda: other.append(broker.connection))
    thread.start()
    thread.join()
    assert other[0] is not broker.connection

    # deleting them drops them, and never raises, not even twice
    dropped = broker.connection
    del broker.connection
    del broker.connection
    del broker.channel
    assert not dropped.is_open
    assert broker.connection is not dropped and broker.connection.is_open

    # closing the broker closes them
    kept = broker.connection
    broker.close()
    assert not kept.is_open and not other[0].is_open
