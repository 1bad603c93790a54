"""The engine's RabbitMQ broker against a real RabbitMQ: long delays through the hold queue
(also with RabbitMQ's consumer_timeout really lowered), the bounded connection pool, failing
fast and leaving no job behind when RabbitMQ is down, queue depths, and quorum queues.

Each test uses queues of its own in a vhost of this test session.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable, Iterator

import dramatiq
import pika
import psutil
import pytest
from dramatiq import Message, Worker
from dramatiq.errors import ConnectionClosed
from pika.adapters.blocking_connection import BlockingChannel

import engine
import engine.app
from engine import BrokerUnavailable, JobsNotSent, JobState
from engine.app import build_broker
from engine.brokers import RabbitmqBroker
from engine.brokers.rabbitmq import consumer as rabbitmq_consumer
from engine.brokers.rabbitmq.connection import SOCKET_TIMEOUT_S
from engine.brokers.rabbitmq.consumer import HAND_BACK_AFTER_S, HELD_PER_SLOT
from engine.tracked_broker import sending_now
from engine.settings import Settings
from engine.store import Store
from engine.writer import Pending

from tests.integration.conftest import AMQP_HOST, _unavailable, amqp_vhost  # noqa: F401 (a fixture)
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

HOLD_MS = 1_000


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def sent_at_once(request) -> Iterator[None]:
    """These tests look at what reaches RabbitMQ: a send is made at once, in RabbitMQ when it
    returns. Sending without waiting, the default outside a worker, has tests of its own
    (marked ``sends_behind``)."""
    if request.node.get_closest_marker("sends_behind"):
        yield
        return
    with sending_now():
        yield


@pytest.fixture
def amqp_url(amqp_vhost) -> str:
    return f"amqp://guest:guest@{AMQP_HOST}:5672/{amqp_vhost}"


@pytest.fixture
def queue() -> str:
    """A queue of this test alone, so that tests cannot see each other's messages."""
    return f"q-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def brokers(amqp_url) -> Iterator[Callable[..., RabbitmqBroker]]:
    """Makes brokers on the session's vhost (`make(**options)`); closes them after the test."""
    made: list[RabbitmqBroker] = []

    def make(**options) -> RabbitmqBroker:
        options.setdefault("url", amqp_url)
        options.setdefault("middleware", [])
        options.setdefault("max_priority", engine.app.MAX_PRIORITY)
        broker = RabbitmqBroker(**options)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    """Starts in-process Dramatiq workers (`start(broker, queue)`); stops them after the test."""
    started: list[Worker] = []

    def start(broker: RabbitmqBroker, queue: str, threads: int = 1, prefetch: int | None = None) -> Worker:
        worker = Worker(broker, queues={queue}, worker_threads=threads)
        worker.queue_prefetch = prefetch or worker.queue_prefetch
        worker.start()
        started.append(worker)
        wait_for(lambda: consuming(worker, queue), 10, "the worker's consumers")
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=5_000)


@pytest.fixture
def spy(amqp_url) -> Iterator[Callable[[str], int]]:
    """`count(queue_name)`: the messages ready in a queue, read on a connection of the test's own."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()

    def count(name: str) -> int:
        return channel.queue_declare(name, passive=True).method.message_count

    yield count
    connection.close()


class Runs:
    """An actor body that records when it ran."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, *args) -> None:
        self.times.append(time.time())


def recorder(broker: RabbitmqBroker, queue: str) -> tuple[dramatiq.Actor, Runs]:
    runs = Runs()
    return dramatiq.actor(runs, broker=broker, queue_name=queue, actor_name=f"record_{queue}"), runs


def consuming(worker: Worker, queue: str) -> bool:
    """Whether the worker has connected the consumers of the queue and of its delay queue."""
    threads = [worker.consumers.get(name) for name in (queue, f"{queue}.DQ")]
    return all(thread is not None and thread.consumer is not None for thread in threads)


def store_of(broker: RabbitmqBroker) -> Store:
    return broker.store


def rabbitmq_connections() -> int:
    """How many connections this process has open to RabbitMQ."""
    return sum(
        1
        for each in psutil.Process().net_connections(kind="tcp")
        if each.raddr and each.raddr.port == 5672 and each.status == psutil.CONN_ESTABLISHED
    )


def rabbitmqctl(*args: str) -> str:
    try:
        done = subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        _unavailable("rabbitmqctl", error)
    return done.stdout.strip()


def free_port() -> int:
    """A local port nothing listens on: connections to it are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


# -- long delays -------------------------------------------------------------------------------


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


# -- sending: the pool, and RabbitMQ down ------------------------------------------------------


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


@pytest.fixture
def down_url() -> str:
    """The URL of a RabbitMQ that is down: its port refuses connections."""
    return f"amqp://guest:s3cret@127.0.0.1:{free_port()}/prod"


def tracked_broker(tmp_path, url: str, **settings) -> RabbitmqBroker:
    settings = Settings(store_url=f"sqlite:///{tmp_path}/engine.db", broker_url=url, **settings)
    return build_broker(settings)  # with the engine's middleware and a migrated store


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


# -- sending without waiting -------------------------------------------------------------------


def sender_of_noops(tmp_path, amqp_url: str, queue: str, *, warm: bool = False) -> tuple[RabbitmqBroker, Store, dramatiq.Actor]:
    """A tracked broker, its store, and an actor of `queue` taking one argument; `warm`: one
    job sent and flushed already (the queue declared, the sender connected)."""
    broker = tracked_broker(tmp_path, amqp_url)
    actor = dramatiq.actor(lambda n: None, broker=broker, actor_name="noop", queue_name=queue)
    if warm:
        actor.send(0)
        broker.wait_sent()
    return broker, store_of(broker), actor


@pytest.mark.sends_behind
def test_sends_outside_a_worker_are_recorded_and_in_rabbitmq_once_flushed(tmp_path, amqp_url, queue, spy):
    broker, store, actor = sender_of_noops(tmp_path, amqp_url, queue)

    sent = [actor.send(n).message_id for n in range(300)]
    broker.wait_sent()

    assert spy(queue) == 300
    assert {store.get(job_id).state for job_id in sent} == {JobState.QUEUED}
    broker.close()


@pytest.mark.sends_behind
def test_sends_behind_to_a_queue_deleted_meanwhile_declare_it_again(tmp_path, amqp_url, queue, spy):
    broker, _, actor = sender_of_noops(tmp_path, amqp_url, queue, warm=True)

    # when the queue is deleted behind the broker's back (which declared it already)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    connection.channel().queue_delete(queue)
    connection.close()
    sent = [actor.send(n).message_id for n in range(20)]
    broker.wait_sent()

    # then RabbitMQ returned the messages, the queue was declared again, and they went again
    assert spy(queue) == len(sent)
    broker.close()


@pytest.mark.sends_behind
def test_sends_behind_survive_rabbitmq_closing_the_connection_midway(tmp_path, amqp_url, amqp_vhost, queue):
    broker, store, actor = sender_of_noops(tmp_path, amqp_url, queue, warm=True)

    # when RabbitMQ closes every connection (a restart, a network cut) while jobs stream out
    closer = threading.Thread(target=rabbitmqctl, args=("close_all_connections", "--vhost", amqp_vhost, "closed by a test"))
    closer.start()
    sent = []
    while closer.is_alive() or len(sent) < 2000:
        sent.append(actor.send(len(sent)).message_id)
    broker.wait_sent(timeout=30)

    # then every job is in RabbitMQ (those not confirmed before the cut were sent again, so
    # some may be there twice: a job's start skips a second delivery) and recorded as queued
    assert broker.queue_depths()[queue]["ready"] >= len(sent) + 1  # on a new connection
    assert {store.get(job_id).state for job_id in sent} == {JobState.QUEUED}
    broker.close()


@pytest.mark.sends_behind
def test_sends_to_a_rabbitmq_that_stays_down_fail_their_jobs_visibly(tmp_path, down_url):
    broker = tracked_broker(tmp_path, down_url, send_behind_timeout_s=1.0)
    store = store_of(broker)
    actor = dramatiq.actor(lambda: None, broker=broker, actor_name="noop")

    started = time.monotonic()
    message = actor.send()
    assert time.monotonic() - started < 0.5  # the send does not wait for RabbitMQ

    with pytest.raises(JobsNotSent) as raised:
        broker.wait_sent(timeout=10)
    assert raised.value.job_ids == [message.message_id]
    assert "127.0.0.1" in str(raised.value) and "s3cret" not in str(raised.value)
    job = store.get(message.message_id)
    assert job.state == JobState.FAILED and "not sent" in job.last_error  # `engine retry` sends it again
    broker.wait_sent()  # each failure is reported once
    broker.close()


def test_connect_timeouts_are_bounded_unless_the_url_sets_them():
    assert RabbitmqBroker(url="amqp://localhost/").parameters.socket_timeout == SOCKET_TIMEOUT_S
    assert RabbitmqBroker(url="amqp://localhost/?socket_timeout=7").parameters.socket_timeout == 7


# -- queue depths ------------------------------------------------------------------------------


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


# -- held messages -----------------------------------------------------------------------------


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


# -- quorum queues -----------------------------------------------------------------------------


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


#: A user's script: 100 sends, then the broker closed; it prints when close() returned.
SEND_AND_CLOSE = """
import sys, time
import dramatiq
from engine.app import build_broker
from engine.settings import Settings

broker = build_broker(Settings(store_url=sys.argv[1], broker_url=sys.argv[2]))
actor = dramatiq.actor(lambda n: None, broker=broker, actor_name="noop", queue_name=sys.argv[3])
for n in range(100):
    actor.send(n)
broker.close()
print(time.time(), flush=True)
"""


@pytest.mark.sends_behind
def test_a_script_that_sends_and_closes_the_broker_exits_at_once_with_every_job_sent(tmp_path, amqp_url, queue, spy):
    # when a script sends 100 jobs and closes the broker
    done = subprocess.run(
        [sys.executable, "-c", SEND_AND_CLOSE, f"sqlite:///{tmp_path}/engine.db", amqp_url, queue],
        capture_output=True, text=True, timeout=60,
    )
    exited_at = time.time()

    # then it exits within a second of close(), which returned once RabbitMQ had confirmed them
    assert done.returncode == 0, done.stderr
    assert exited_at - float(done.stdout.split()[-1]) < 1.0
    assert "not sent" not in done.stderr and "ERROR" not in done.stderr, done.stderr
    assert spy(queue) == 100


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


@pytest.mark.sends_behind
def test_a_flush_drops_the_sends_still_on_their_way(tmp_path, amqp_url, queue, spy):
    broker, _, actor = sender_of_noops(tmp_path, amqp_url, queue)
    broker.declare_queue(queue)

    # when jobs are sent without waiting and the queues flushed at once
    for n in range(1000):
        actor.send(n)
    broker.flush_all()

    # then none of them lands after the purge
    broker.wait_sent()
    assert spy(queue) == 0
    broker.close()
