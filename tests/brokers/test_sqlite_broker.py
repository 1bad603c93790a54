"""The embedded SQLite broker on real database files: delivery, due times, priorities, leases,
dead letters, wake-ups across processes, and the transaction it shares with before_enqueue."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import dramatiq
import pytest
from dramatiq import Message, Middleware, Worker
from dramatiq.middleware import MiddlewareError
from sqlalchemy import func, select

from engine.brokers import SQLiteBroker
from engine.store.schema import jobs, messages
from engine.store import Store
from tests.support.processes import start_process

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/engine.db")
    store.upgrade()
    yield store
    store.close()


@pytest.fixture
def brokers(store):
    """Makes brokers on the test's store (each one a process, as far as leases go); closes them."""
    made = []

    def make(**options):
        broker = SQLiteBroker(store, middleware=options.pop("middleware", []), **options)
        broker.declare_queue("default")
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


@pytest.fixture
def broker(brokers):
    return brokers()


@pytest.fixture
def consumers():
    """Opens consumers (`open(broker, prefetch=1, timeout=ms)`); closes them."""
    opened = []

    def open_(broker, *, prefetch=1, timeout=2000):
        consumer = broker.consume("default", prefetch=prefetch, timeout=timeout)
        opened.append(consumer)
        return consumer

    yield open_
    for consumer in opened:
        consumer.close()


@contextmanager
def running_worker(broker):
    worker = Worker(broker, worker_timeout=100, worker_threads=2)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def new_message(**options) -> Message:
    return Message(queue_name="default", actor_name="noop", args=(), kwargs={}, options=options)


def rows(store):
    with store.reading() as connection:
        return connection.execute(select(messages).order_by(messages.c.id)).all()


# -- with a Worker ---------------------------------------------------------------------------


def test_a_worker_processes_sent_messages_and_acks_delete_their_rows(store, brokers):
    broker = brokers(middleware=None)  # Dramatiq's default middleware
    seen = []
    add = dramatiq.actor(lambda x, y: seen.append(x + y), actor_name="add", broker=broker)

    with running_worker(broker):
        for i in range(5):
            add.send(i, 1)
        broker.join("default", timeout=5000)

    assert sorted(seen) == [1, 2, 3, 4, 5]
    assert rows(store) == []


def test_a_retried_message_runs_again_and_leaves_no_row(store, brokers):
    broker = brokers(middleware=None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first try fails")

    dramatiq.actor(flaky, broker=broker, max_retries=1, min_backoff=10, max_backoff=20).send()
    with running_worker(broker):
        broker.join("default", timeout=5000)

    assert len(calls) == 2
    assert rows(store) == []


def test_a_message_that_fails_for_good_is_dead_lettered(store, brokers):
    broker = brokers(middleware=None)

    def fail():
        raise RuntimeError("always")

    message = dramatiq.actor(fail, broker=broker, max_retries=0).send()
    with running_worker(broker):
        broker.join("default", timeout=5000)

    [row] = rows(store)
    assert row.message_id == message.message_id and row.dead_at is not None
    assert broker.queue_depths()["default"]["dead"] == 1


# -- with consumers ----------------------------------------------------------------------------


def test_messages_are_durable_across_broker_and_store_restarts(tmp_path, store, brokers, consumers):
    sent = brokers().enqueue(new_message())
    store.close()

    reopened = Store(f"sqlite:///{tmp_path}/engine.db")
    broker = SQLiteBroker(reopened, middleware=[])
    broker.declare_queue("default")
    try:
        assert next(consumers(broker)).message_id == sent.message_id
    finally:
        broker.close()
        reopened.close()


def test_a_delayed_message_is_delivered_at_its_due_time_not_before(broker, consumers):
    consumer = consumers(broker, timeout=100)
    sent_at = time.time()
    broker.enqueue(new_message(), delay=300)
    [row] = rows(broker.store)
    assert row.eta == pytest.approx(sent_at + 0.3, abs=0.05)
    assert "eta" not in Message.decode(row.body).options

    assert next(consumer) is None
    consumer.timeout = 2000
    assert next(consumer) is not None
    received_at = time.time()
    # The consumer sleeps until the due time, rather than until its next poll.
    assert row.eta <= received_at < row.eta + 0.5


def test_higher_broker_priority_is_delivered_first_then_oldest_first(broker, consumers):
    for label, priority in [("low", 0), ("high", 5), ("mid", 1), ("high-later", 5), ("none", None)]:
        broker.enqueue(new_message(label=label, broker_priority=priority))

    consumer = consumers(broker, prefetch=5)
    labels = [next(consumer).options["label"] for _ in range(5)]

    assert labels == ["high", "high-later", "mid", "low", "none"]


def test_a_consumer_holds_no_more_than_prefetch_unsettled_messages(broker, consumers):
    for i in range(3):
        broker.enqueue(new_message(i=i))
    consumer = consumers(broker, prefetch=2, timeout=100)

    first, second = next(consumer), next(consumer)
    assert next(consumer) is None
    assert sum(row.leased_until is not None for row in rows(broker.store)) == 2

    # An ack from a worker thread makes room for the consumer waiting on its full prefetch.
    threading.Timer(0.05, consumer.ack, [first]).start()
    consumer.timeout = 2000
    started = time.monotonic()
    third = next(consumer)
    assert time.monotonic() - started < 0.5
    assert [m.options["i"] for m in (first, second, third)] == [0, 1, 2]


def test_ack_deletes_the_row_and_nack_keeps_it_as_dead(broker, consumers):
    acked, nacked = broker.enqueue(new_message()), broker.enqueue(new_message())
    consumer = consumers(broker, prefetch=2)

    consumer.ack(next(consumer))
    consumer.nack(next(consumer))
    broker.store.writer.flush()  # acks and nacks are committed by the store's writer

    [row] = rows(broker.store)
    assert row.message_id == nacked.message_id != acked.message_id
    assert row.dead_at is not None
    assert next(consumers(broker, timeout=50)) is None  # dead letters are not delivered


def test_an_expired_lease_is_redelivered_and_flagged(brokers, consumers):
    dying, survivor = brokers(lease_s=0.2), brokers(lease_s=0.2)
    sent = dying.enqueue(new_message())
    first = next(consumers(dying))
    assert first.redelivered is False

    dying.close()  # its process "dies": no more renewals, no ack
    rescuer = consumers(survivor, timeout=50)
    assert next(rescuer) is None  # the lease is still running
    time.sleep(0.2)
    again = next(rescuer)

    assert again.message_id == sent.message_id
    assert again.redelivered is True


def test_renewed_leases_keep_a_long_held_message_from_redelivery(brokers, consumers):
    # Renewed every third of a lease: 0.5 s leaves a renewal 0.33 s of stall on a busy machine.
    holder, other = brokers(lease_s=0.5), brokers(lease_s=0.5)
    holder.enqueue(new_message())
    consumer = consumers(holder)
    held = next(consumer)

    poller = consumers(other, timeout=100)
    deadline = time.monotonic() + 2.0  # four leases long
    while time.monotonic() < deadline:
        assert next(poller) is None

    consumer.ack(held)
    holder.store.writer.flush()
    assert rows(holder.store) == []


def test_requeued_messages_are_deliverable_at_once_and_not_redelivered(brokers, consumers):
    first_broker, second_broker = brokers(), brokers()
    for _ in range(2):
        first_broker.enqueue(new_message())
    consumer = consumers(first_broker, prefetch=2)
    held = [next(consumer), next(consumer)]

    consumer.requeue(held)

    taker = consumers(second_broker, prefetch=2, timeout=100)
    taken = [next(taker), next(taker)]
    assert {m.message_id for m in taken} == {m.message_id for m in held}
    assert not any(m.redelivered for m in taken)


def test_closing_a_consumer_requeues_what_it_claimed_but_never_handed_out(broker, consumers):
    for _ in range(3):
        broker.enqueue(new_message())
    consumer = broker.consume("default", prefetch=3, timeout=100)
    next(consumer)  # claims all three, hands out one

    consumer.close()

    assert broker.queue_depths()["default"] == {"ready": 2, "delayed": 0, "running": 1, "dead": 0}


def test_settling_or_renewing_a_message_whose_row_is_gone_does_not_fail(brokers, consumers):
    broker = brokers(lease_s=0.03)
    broker.enqueue(new_message())
    broker.enqueue(new_message())
    consumer = consumers(broker, prefetch=2)
    first, second = next(consumer), next(consumer)

    broker.flush("default")
    time.sleep(0.05)  # a renewal of the vanished rows
    consumer.ack(first)
    consumer.requeue([second])
    broker.store.writer.flush()

    assert broker.leases.renewer.is_alive()
    assert rows(broker.store) == []


def test_queue_depths_count_each_state_per_declared_queue(broker, consumers):
    broker.declare_queue("empty")
    for _ in range(4):
        broker.enqueue(new_message())
    broker.enqueue(new_message(), delay=60_000)
    consumer = consumers(broker, prefetch=2)
    consumer.nack(next(consumer))
    next(consumer)
    broker.store.writer.flush()

    assert broker.queue_depths() == {
        "default": {"ready": 2, "delayed": 1, "running": 1, "dead": 1},
        "empty": {"ready": 0, "delayed": 0, "running": 0, "dead": 0},
    }


# -- the enqueue transaction ---------------------------------------------------------------------


class RecordsJobs(Middleware):
    """Writes the job row in before_enqueue, as Tracking does, and can then refuse the enqueue."""

    def __init__(self, store, refuse=False):
        self.store, self.refuse = store, refuse

    def before_enqueue(self, broker, message, delay):
        now = time.time()
        row = {
            "id": message.message_id,
            "actor": message.actor_name,
            "queue": message.queue_name,
            "args": "[]",
            "kwargs": "{}",
            "options": "{}",
            "priority": 0,
            "idempotency_key": None,
            "created_at": now,
            "scheduled_for": None,
        }
        self.store.record_enqueue(row, delayed=False)
        if self.refuse:
            raise MiddlewareError("refused")


def count(store, table):
    with store.reading() as connection:
        return connection.execute(select(func.count()).select_from(table)).scalar()


def test_rows_written_before_enqueue_commit_with_the_message(store, brokers):
    broker = brokers(middleware=[RecordsJobs(store)])

    broker.enqueue(new_message())

    assert count(store, jobs) == 1 and count(store, messages) == 1


def test_when_before_enqueue_raises_neither_the_job_nor_the_message_is_written(store, brokers):
    broker = brokers(middleware=[RecordsJobs(store, refuse=True)])

    with pytest.raises(MiddlewareError):
        broker.enqueue(new_message())

    assert count(store, jobs) == 0 and count(store, messages) == 0


# -- wake-ups ----------------------------------------------------------------------------------

SENDER = """
import sys, time
from dramatiq import Message
from engine.brokers import SQLiteBroker
from engine.store import Store
from tests.support.processes import start_process

broker = SQLiteBroker(Store(sys.argv[1]), middleware=[])
print("ready", flush=True)
for line in sys.stdin:
    sent_at = time.time()
    broker.enqueue(Message(queue_name="default", actor_name="noop", args=(), kwargs={}, options={}))
    print(sent_at, flush=True)
"""


def test_an_enqueue_in_this_process_wakes_an_idle_consumer_at_once(broker, consumers):
    consumer = consumers(broker, timeout=5000)
    threading.Timer(0.1, broker.enqueue, [new_message()]).start()

    started = time.monotonic()
    assert next(consumer) is not None
    # Without the wake-up it would come with the poll, a second after the consumer went idle.
    assert time.monotonic() - started < 0.5


def test_an_enqueue_in_another_process_wakes_an_idle_consumer_at_once(store, broker, consumers):
    consumer = consumers(broker, timeout=5000)
    sender = start_process(
        [sys.executable, "-c", SENDER, store.url], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )

    def send():
        sender.stdin.write("send\n")
        sender.stdin.flush()

    try:
        assert sender.stdout.readline().strip() == "ready"
        latencies = []
        for _ in range(3):
            # Sent 0.1 s into the consumer's idle wait: the poll alone would take another 0.9 s.
            threading.Timer(0.1, send).start()
            message = next(consumer)
            received_at = time.time()
            assert message is not None
            latencies.append(received_at - float(sender.stdout.readline()))
            consumer.ack(message)
    finally:
        sender.stdin.close()
        sender.wait(timeout=10)

    assert max(latencies) < 0.5, latencies
