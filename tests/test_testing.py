"""engine.testing: a user's own actors, tested as jobs on Dramatiq's StubBroker."""

from __future__ import annotations

import dramatiq
import pytest
from dramatiq import Worker

import engine
import engine.app
from engine.testing import stub_broker


@pytest.fixture
def broker(tmp_path):
    broker = stub_broker(tmp_path, max_retries=1)
    yield broker
    broker.close()
    engine.app._broker = None
    dramatiq.set_broker(None)


def test_a_users_actor_runs_as_a_tracked_job_with_its_retries(broker, tmp_path):
    # given an actor that fails once, declared after the stub broker was made the engine's
    calls = []

    @engine.actor
    def flaky(n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("first try fails")
        return n * 2

    worker = Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        # when it is sent and run
        message = flaky.send(21)
        broker.join(flaky.queue_name, fail_fast=False)
        worker.join()
    finally:
        worker.stop()

    # then it succeeded on its second attempt, in the store made in the given directory
    assert engine.get(message.message_id).state == "succeeded"
    assert engine.result(message.message_id) == 42
    assert [attempt.outcome for attempt in engine.attempts(message.message_id)] == ["error-will-retry", "succeeded"]
    assert (tmp_path / "engine.db").exists()
