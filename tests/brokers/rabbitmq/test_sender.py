"""The sender behind (engine/brokers/rabbitmq/sender.py) against a real RabbitMQ: sends from
outside a worker are recorded, then made without the caller waiting; they survive lost
connections and deleted queues, fail their jobs visibly when RabbitMQ stays down, and are all
made before a script that closes the broker exits."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import dramatiq
import pika
import pytest

from engine import JobsNotSent, JobState
from engine.brokers import RabbitmqBroker
from engine.store import Store

from tests.brokers.rabbitmq.support import rabbitmqctl, store_of, tracked_broker

pytestmark = pytest.mark.integration


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
