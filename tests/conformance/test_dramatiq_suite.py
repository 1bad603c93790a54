"""The conformance run: Dramatiq's own tests on the engine's brokers, one test per combination
of broker (RabbitMQ + PostgreSQL, embedded SQLite) and middleware (Dramatiq's default, the
engine's). See docs/dramatiq-conformance.md.

The four runs start together, each in two pytest processes (see `suite.PARTS`) with a RabbitMQ
vhost and a PostgreSQL database of their own, and each test waits for its own. A test fails when a test of Dramatiq's fails that
is not listed in `expectations.EXPECTED_FAILURES`, and when a listed one passes.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

import pika
import psycopg
import pytest

from tests.integration.conftest import AMQP_HOST, PG_ADMIN_URL, REQUIRE_SERVICES

from . import suite
from .plugin import expectations

#: ENGINE_CONFORMANCE_REPORTS=DIR keeps each run's JUnit XML report and output in DIR.

#: How long one run may take, at most (its tests are bounded one by one as well).
RUN_TIMEOUT_S = 600


def _unavailable(message: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (CI must run the conformance run, not skip it)", pytrace=False)
    pytest.skip(message)


class _Runs:
    """The four runs, started at once; each combination's services, deleted at the end."""

    def __init__(self, root: Path, reports: Path) -> None:
        self.root, self.reports = root, reports
        self.processes: dict[str, subprocess.Popen] = {}
        self.unavailable: dict[str, str] = {}
        self.vhosts: list[str] = []
        self.databases: list[str] = []

    def start_all(self) -> None:
        for combination in expectations.COMBINATIONS:
            try:
                # Each part its own: the parts' workers must not take each other's messages.
                environments = {part: self._services(combination) for part in suite.PARTS}
            except (pika.exceptions.AMQPError, psycopg.Error, OSError, subprocess.SubprocessError) as error:
                self.unavailable[combination] = f"RabbitMQ or PostgreSQL is not reachable: {error}"
                continue
            for part, environment in environments.items():
                self.processes[f"{combination}-{part}"] = suite.start(
                    combination, part, self.root, self.report(combination, part), environment
                )

    def report(self, combination: str, part: str) -> Path:
        return self.reports / f"{combination}-{part}.xml"

    def wait(self, combination: str) -> suite.Outcome:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for part in suite.PARTS:
            process = self.processes[f"{combination}-{part}"]
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                pytest.fail(f"the {combination} run took more than {RUN_TIMEOUT_S} s:\n{self.output(combination)}")
        try:
            return suite.read_reports(combination, [self.report(combination, part) for part in suite.PARTS])
        except ValueError as error:
            pytest.fail(f"{error}\n{self.output(combination)}")

    def output(self, combination: str, tail: int = 3000) -> str:
        """The end of each part's output."""
        logs = [self.report(combination, part).with_suffix(".log") for part in suite.PARTS]
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}" for log in logs if log.exists())

    def _services(self, combination: str) -> dict[str, str]:
        if combination not in expectations.RABBITMQ:
            return {}
        vhost = f"engine-conformance-{uuid.uuid4().hex[:8]}"
        pika.BlockingConnection(pika.ConnectionParameters(AMQP_HOST, connection_attempts=1)).close()
        for command in (["add_vhost", vhost], ["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]):
            subprocess.run(["rabbitmqctl", *command], check=True, capture_output=True, timeout=60)
        self.vhosts.append(vhost)
        database = f"engine_conformance_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{database}"')
        self.databases.append(database)
        return {
            "ENGINE_CONFORMANCE_AMQP_URL": f"amqp://guest:guest@{AMQP_HOST}:5672/{vhost}",
            "ENGINE_CONFORMANCE_PG_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database,
        }

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for vhost in self.vhosts:
            subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)
        if self.databases:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
                for database in self.databases:
                    admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[_Runs]:
    try:
        root = suite.dramatiq_tests()
    except suite.SuiteUnavailable as error:
        _unavailable(str(error))
    kept = os.environ.get("ENGINE_CONFORMANCE_REPORTS")
    reports = Path(kept) if kept else tmp_path_factory.mktemp("dramatiq-conformance")
    reports.mkdir(parents=True, exist_ok=True)
    started = _Runs(root, reports)
    try:
        started.start_all()
        yield started
    finally:
        started.close()


def _listing(outcome: suite.Outcome, tests: list[str], with_messages: bool = True) -> str:
    return "\n".join(f"  {test}" + (f"\n      {outcome.messages[test]}" if with_messages else "") for test in tests)


@pytest.mark.conformance
@pytest.mark.parametrize("combination", expectations.COMBINATIONS)
def test_dramatiq_suite_passes_apart_from_listed_failures(runs: _Runs, combination: str) -> None:
    if combination in runs.unavailable:
        _unavailable(runs.unavailable[combination])
    outcome = runs.wait(combination)
    print(outcome.summary())
    if outcome.passed_sometimes:
        print(f"listed as timing-bound, passed this time:\n{_listing(outcome, outcome.passed_sometimes, False)}")
    problems: list[str] = []
    if outcome.failed_unexpected:
        problems.append(f"failed, and not listed in expectations.py:\n{_listing(outcome, outcome.failed_unexpected)}")
    if outcome.passed_unexpectedly:
        problems.append(
            "listed in expectations.py as failing, but passed (take them off the list, and off "
            f"docs/dramatiq-conformance.md):\n{_listing(outcome, outcome.passed_unexpectedly, False)}"
        )
    if not outcome.passed:
        problems.append(f"no test passed: the run is broken\n{runs.output(combination)}")
    assert not problems, outcome.summary() + "\n" + "\n".join(problems)
