"""BatchScheduling: the threads of a worker run under SCHED_BATCH."""

from __future__ import annotations

import os
import sys

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker

from engine.app import build_middleware
from engine.middleware.scheduling import BatchScheduling

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")


@pytest.fixture
def default_policy():
    """This thread under the default policy: a worker booted here by an earlier test (with the
    engine's middleware) left it under SCHED_BATCH."""
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    yield
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def test_the_threads_of_a_worker_run_under_sched_batch(default_policy):
    broker = StubBroker(middleware=[BatchScheduling()])
    policies: list[int] = []

    @dramatiq.actor(broker=broker)
    def policy() -> None:
        policies.append(os.sched_getscheduler(0))

    worker = Worker(broker, worker_threads=2, worker_timeout=50)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    worker.start()
    try:
        policy.send()
        broker.join(policy.queue_name)
        worker.join()
    finally:
        worker.stop()

    assert policies == [os.SCHED_BATCH]


def test_the_policy_is_a_setting(settings, store):
    def middleware(**changes: object) -> list[type]:
        return [type(each) for each in build_middleware(settings.model_copy(update=changes), store)]

    assert BatchScheduling in middleware(sched_batch=True)
    assert BatchScheduling not in middleware(sched_batch=False)
