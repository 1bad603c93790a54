"""What the conformance run of Dramatiq's test suite expects, per combination of broker and
middleware: the modules and tests not run (and why), and the tests known to fail (and why).

A test id is ``<module>::<test name>[<parameters>]``, as in Dramatiq's tests directory. Every
failure is of one kind:

- ``harness``: the test relies on something of Dramatiq's test setup, not of a broker (a
  StubBroker-only helper, a timing only an in-memory broker meets);
- ``difference``: the engine behaves otherwise on purpose, as documented in
  docs/dramatiq-conformance.md;
- ``bug``: the engine is wrong; the doc says where it is tracked.

A listed failure that passes fails the run as well (the list must stay true), except those
marked ``sometimes``: timing-bound tests that pass on a quiet machine, reported but not failed.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

RABBITMQ_DRAMATIQ = "rabbitmq-dramatiq"
RABBITMQ_ENGINE = "rabbitmq-engine"
SQLITE_DRAMATIQ = "sqlite-dramatiq"
SQLITE_ENGINE = "sqlite-engine"
COMBINATIONS = (RABBITMQ_DRAMATIQ, RABBITMQ_ENGINE, SQLITE_DRAMATIQ, SQLITE_ENGINE)
RABBITMQ = (RABBITMQ_DRAMATIQ, RABBITMQ_ENGINE)
SQLITE = (SQLITE_DRAMATIQ, SQLITE_ENGINE)
ENGINE_MIDDLEWARE = (RABBITMQ_ENGINE, SQLITE_ENGINE)
DRAMATIQ_MIDDLEWARE = (RABBITMQ_DRAMATIQ, SQLITE_DRAMATIQ)

HARNESS, DIFFERENCE, BUG = "harness", "difference", "bug"


class Listed(NamedTuple):
    """Where an entry applies, and why."""

    combinations: tuple[str, ...]
    reason: str
    kind: str = HARNESS
    #: The test may pass (timing): its passing is reported, not failed.
    sometimes: bool = False


#: Modules of Dramatiq's tests directory that are not run at all.
MODULES_NOT_RUN: dict[str, Listed] = {
    name: Listed(COMBINATIONS, reason)
    for reason, names in {
        "another broker: Redis is not one of the engine's": ["test_redis.py"],
        "tests StubBroker itself (its join, dead_letters, prefetch); test_rabbitmq.py has the same for RabbitMQ": [
            "test_stub_broker.py"
        ],
        "the dramatiq command line (its process handling, --watch, pid files), not a broker": [
            "test_cli.py",
            "test_watch.py",
            "test_pidfile.py",
        ],
        "rate limiters and barriers on Redis, memcached or their stub backend, not a broker": [
            "test_barrier.py",
            "test_bucket_rate_limiter.py",
            "test_concurrent_rate_limiter.py",
            "test_window_rate_limiter.py",
        ],
        "pure functions and data types of Dramatiq (no broker involved)": [
            "test_canteen.py",
            "test_common.py",
            "test_encoders.py",
            "test_types.py",
        ],
    }.items()
    for name in names
} | {
    "test_rabbitmq.py": Listed(SQLITE, "RabbitMQ's own broker tests (connections, channels, queue names)"),
}

#: Tests of the modules that run, deselected.
DESELECTED: dict[str, Listed] = {
    "test_rabbitmq.py::test_rabbitmq_workers_handle_rabbit_failures_gracefully": Listed(
        COMBINATIONS,
        "stops and starts the RabbitMQ node (rabbitmqctl stop_app): never on a machine whose RabbitMQ others use;"
        " reconnection is tested by tests/brokers/rabbitmq/ (test_pool.py, test_sender.py)",
    ),
    "test_broker.py::test_broker_uses_rabbitmq_if_not_set": Listed(
        COMBINATIONS, "Dramatiq's global default broker (dramatiq.get_broker()), not one of the engine's"
    ),
    "test_results.py::test_messages_without_actor_not_crashing_lookup_options": Listed(
        COMBINATIONS, "needs Redis (redis_result_backend)"
    ),
}

#: StubBroker's join, unlike any other broker's, raises the exception of a message that was
#: dead-lettered while it waited.
_JOIN_RAISES = "StubBroker.join raises the actor's exception in the joining thread; other brokers' join only waits"
#: StubBroker's queues are Python queues that the test reads and writes.
_STUB_QUEUES = "reads or writes StubBroker.queues, the stub's in-memory queues"
#: Messages are delivered by another thread (RabbitMQ's consumer, SQLite's claims) after send returns.
_DELIVERY_TIMING = (
    "counts prefetched messages right after send(): StubBroker hands them over at once, a real broker"
    " a few milliseconds later"
)
_PRIVATE_DECLARE = (
    "patches Dramatiq's private RabbitmqBroker._declare_queue, which the engine's broker does not call:"
    " it declares queues on its pooled channels and retries a failed send for 3 s (SEND_TIMEOUT)"
)

#: Tests that run and fail.
EXPECTED_FAILURES: dict[str, Listed] = {
    # -- harness: what only Dramatiq's StubBroker does
    **{
        f"test_actors.py::{name}": Listed(COMBINATIONS, _JOIN_RAISES)
        for name in (
            "test_actors_can_be_assigned_time_limits",
            "test_actor_messages_can_be_assigned_time_limits",
            "test_actors_can_be_assigned_message_age_limits",
            "test_actor_messages_can_be_assigned_message_age_limits",
            "test_workers_log_rate_limit_exceeded_errors_differently",
        )
    },
    "test_actors.py::test_messages_belonging_to_missing_actors_are_rejected": Listed(
        COMBINATIONS, "StubBroker.join(fail_fast=True) and StubBroker.dead_letters; test_rabbitmq.py has the same test"
    ),
    **{
        f"test_actors.py::{name}": Listed(COMBINATIONS, _STUB_QUEUES)
        for name in (
            "test_actors_can_be_sent_messages",
            "test_worker_handles_non_numeric_eta_and_logs_warning",
            "test_worker_handles_none_eta",
        )
    },
    "test_worker.py::test_workers_process_messages_in_order": Listed(COMBINATIONS, _DELIVERY_TIMING, sometimes=True),
    "test_actors.py::test_actors_can_prioritize_work": Listed(
        COMBINATIONS,
        "timing: the worker orders by actor priority only the messages it has prefetched; the paused"
        " consumer had taken a low-priority one before it saw the pause, and the worker thread runs it"
        " before the others are in",
        sometimes=True,
    ),
    **{
        f"test_composition.py::{name}[stub]": Listed(
            COMBINATIONS,
            "timing: five 100 ms jobs in a group within 0.5 s, sends, runs and results included, on a busy"
            " two-core machine",
            sometimes=True,
        )
        for name in ("test_groups_execute_jobs_in_parallel", "test_groups_execute_inner_groups")
    },
    # -- deliberate differences
    **{
        f"test_broker.py::{name}": Listed(
            ENGINE_MIDDLEWARE,
            "the engine's stack does not start with AgeLimit (CurrentMessage, Heartbeat, Resend, Cancellation"
            " and Tracking come first); add_middleware(before=/after=AgeLimit) does put it next to AgeLimit",
            DIFFERENCE,
        )
        for name in (
            "test_broker_middleware_can_be_added_before_other_middleware",
            "test_broker_middleware_can_be_added_after_other_middleware",
        )
    },
    **{
        f"test_rabbitmq.py::{name}": Listed(RABBITMQ, _PRIVATE_DECLARE, DIFFERENCE)
        for name in (
            "test_rabbitmq_broker_stops_retrying_declaring_queues_when_max_attempts_reached",
            "test_rabbitmq_broker_retries_declaring_queues_when_connection_related_errors_occur",
        )
    },
    "test_rabbitmq.py::test_rabbitmq_broker_connections_are_lazy": Listed(
        RABBITMQ,
        "reads Dramatiq's private thread-local broker.state.connection: the engine's consumers and"
        " senders do not use a connection per thread (it is lazy all the same)",
        DIFFERENCE,
    ),
    "test_rabbitmq.py::test_rabbitmq_broker_reconnects_after_enqueue_failure": Listed(
        RABBITMQ,
        "closes broker.connection and expects a send to reopen it: the engine's sends go through its"
        " pool of connections, never through the calling thread's own, which stays closed until"
        " `del broker.connection` (docs/dramatiq-conformance.md)",
        DIFFERENCE,
    ),
    "test_rabbitmq.py::test_rabbitmq_broker_enqueueing_message_re_declares_queues_when_declared_queue_disappears": Listed(
        RABBITMQ,
        "deletes a queue behind the broker's back and expects the next send to declare it again: the"
        " engine declares a queue once per process, and a message RabbitMQ returns as unroutable is"
        " left to the resend of unsent jobs (docs/dramatiq-conformance.md)",
        DIFFERENCE,
    ),
    # -- bugs
    **{
        test: Listed(
            (combination,),
            f"fails in some runs ({symptom}); not diagnosed yet, reported to the lead",
            BUG,
            sometimes=True,
        )
        for test, combination, symptom in (
            (
                "test_results.py::test_actors_can_store_results[stub]",
                RABBITMQ_DRAMATIQ,
                "ResultTimeout: no result of a no-op job within 10 s",
            ),
            (
                "test_rabbitmq.py::test_rabbitmq_broker_can_enqueue_messages_with_priority",
                RABBITMQ_ENGINE,
                "ConnectionClosed: ConnectionRefusedError from a RabbitMQ that was up",
            ),
        )
    },
}


def test_id(node_id: str) -> str:
    """``tests/test_actors.py::test_x[a]`` (a pytest node id) -> ``test_actors.py::test_x[a]``."""
    return node_id.rsplit("/", 1)[-1]


def _applying(listed: dict[str, Listed], key: str, combination: str) -> Optional[Listed]:
    entry = listed.get(key)
    return entry if entry is not None and combination in entry.combinations else None


def module_skipped(module: str, combination: str) -> Optional[Listed]:
    return _applying(MODULES_NOT_RUN, module, combination)


def deselected(test: str, combination: str) -> Optional[Listed]:
    return _applying(DESELECTED, test, combination)


def expected_failure(test: str, combination: str) -> Optional[Listed]:
    return _applying(EXPECTED_FAILURES, test, combination)
