"""The contract between brokers and Tracking (`engine.tracked_broker`): each broker of the
engine satisfies it, and Tracking hands a broker what the contract says, through it alone."""

from __future__ import annotations

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker

from engine import JobState
from engine.app import build_middleware
from engine.brokers import RabbitmqBroker, SQLiteBroker
from engine.tracked_broker import TrackedBroker, collecting_row_writes, row_writes_collected, sending_now, sends_now
from engine.writer import Pending


@pytest.fixture
def brokers_of_the_engine(store):
    """The engine's two brokers on one store (the RabbitMQ one is not connected: it connects on use)."""
    made = [SQLiteBroker(store, middleware=[]), RabbitmqBroker(url="amqp://127.0.0.1/", store=store, middleware=[])]
    yield made
    for broker in made:
        broker.close()


def test_each_broker_of_the_engine_is_a_tracked_broker_with_the_store_it_was_handed(brokers_of_the_engine, store):
    for broker in brokers_of_the_engine:
        assert isinstance(broker, TrackedBroker)
        assert broker.store is store
        assert type(broker).queue_depths is not TrackedBroker.queue_depths  # its own report
        # both settle a message only once its attempt's end is recorded
        assert broker.settle_when_recorded(object(), Pending()) is True


def test_only_the_rabbitmq_broker_sends_behind(brokers_of_the_engine):
    sqlite, rabbitmq = brokers_of_the_engine
    assert not sqlite.sends_behind and rabbitmq.sends_behind


def test_sending_now_holds_inside_only():
    assert not sends_now()
    with sending_now():
        assert sends_now()
    assert not sends_now()


class HandedBroker(TrackedBroker, StubBroker):
    """A StubBroker under the contract that keeps what Tracking hands it."""

    def __init__(self, store, middleware) -> None:
        super().__init__(middleware=middleware)
        self.store = store
        self.end_records: dict[str, Pending[None]] = {}

    def settle_when_recorded(self, message, recorded) -> bool:
        self.end_records[message.message_id] = recorded
        return True

    def queue_depths(self) -> dict[str, dict[str, int]]:
        return {}


@pytest.fixture
def handed_broker(settings, store):
    broker = HandedBroker(store, build_middleware(settings, store))
    broker.emit_after("process_boot")
    yield broker
    broker.close()


def test_tracking_hands_the_row_write_of_a_message_sent_later_to_the_broker(handed_broker, store):
    actor = dramatiq.actor(lambda: None, broker=handed_broker, actor_name="later")

    # when the broker collects the row writes around an enqueue, as a broker that sends later does
    with collecting_row_writes() as row_writes:
        assert row_writes_collected() is row_writes
        message = actor.send()
    assert row_writes_collected() is None

    # then Tracking handed it the pending write of the job's row, which lands as queued
    [written] = row_writes
    written.result(timeout=5)
    assert store.get(message.message_id).state == JobState.QUEUED


def test_tracking_hands_the_end_record_of_an_attempt_to_the_broker(handed_broker, store):
    actor = dramatiq.actor(lambda: "done", broker=handed_broker, actor_name="ends")
    worker = Worker(handed_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        message = actor.send()
        handed_broker.join(actor.queue_name)
        worker.join()
    finally:
        worker.stop()

    # then the broker got the pending record of the attempt's end, which commits the job's end
    handed_broker.end_records[message.message_id].result(timeout=5)
    assert store.get(message.message_id).state == JobState.SUCCEEDED
