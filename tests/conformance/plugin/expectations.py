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
DESELECTED: dict[str, Listed] = {}

#: Tests that run and fail.
EXPECTED_FAILURES: dict[str, Listed] = {}


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
