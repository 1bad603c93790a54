"""Fixtures of the RabbitMQ broker's tests, against a real RabbitMQ: brokers and in-process
workers on a vhost of this test session, a queue of each test's own, a count of what RabbitMQ
holds, and the URL of a RabbitMQ that is down.

A send is made at once, in RabbitMQ when it returns, unless the test is marked ``sends_behind``.
"""

from __future__ import annotations

import socket
import uuid
from typing import Callable, Iterator

import pika
import pytest
from dramatiq import Worker

import engine.app
from engine.brokers import RabbitmqBroker
from engine.tracked_broker import sending_now

from tests.integration.conftest import AMQP_HOST, amqp_vhost  # noqa: F401 (a fixture)
from tests.support.processes import wait_for


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


@pytest.fixture
def down_url() -> str:
    """The URL of a RabbitMQ that is down: its port refuses connections."""
    return f"amqp://guest:s3cret@127.0.0.1:{free_port()}/prod"


def consuming(worker: Worker, queue: str) -> bool:
    """Whether the worker has connected the consumers of the queue and of its delay queue."""
    threads = [worker.consumers.get(name) for name in (queue, f"{queue}.DQ")]
    return all(thread is not None and thread.consumer is not None for thread in threads)


def free_port() -> int:
    """A local port nothing listens on: connections to it are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
