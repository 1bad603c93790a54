"""A host's sum of its processes' metrics: dead processes archived, served over HTTP."""

from __future__ import annotations

import os
import socket
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics.host import MULTIPROC_DIR_VARIABLE, MetricsDirectory, MetricsServer, RestartCounter, registry_of
from engine.settings import Settings
from tests.support.processes import run_process

#: A process that counts as a worker process would, then exits: its pid on stdout.
COUNTING_PROCESS = """
import os
from dramatiq import Message
from engine.job import Outcome
from engine.metrics import process as metrics
from engine.writer import Pending
message = Message(queue_name="default", actor_name="counted", args=(), kwargs={}, options={})
for seconds in (0.002, 0.2, 20):
    done = Pending()
    metrics.attempt_started(message, 0)
    metrics.attempt_ended(message, Outcome.SUCCEEDED, 0, done)
    done.set_result(None)
metrics.ATTEMPT_DURATION.labels("counted", "default").observe(0.002)
metrics.job_enqueued(message)
print(os.getpid())
"""


def count_in_a_process(directory: MetricsDirectory) -> int:
    env = {**os.environ, MULTIPROC_DIR_VARIABLE: directory.path}
    done = run_process([sys.executable, "-c", COUNTING_PROCESS], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def samples(registry) -> dict[tuple[str, tuple], float]:
    from prometheus_client.exposition import generate_latest

    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def directory():
    directory = MetricsDirectory.fresh()
    yield directory
    directory.remove()


def test_dead_processes_are_archived_their_sums_kept_and_their_files_gone(directory):
    registry = registry_of(directory)
    attempts = ("engine_attempts_total", (("actor", "counted"), ("outcome", "succeeded"), ("queue", "default")))
    count_key = ("engine_attempt_duration_seconds_count", (("actor", "counted"), ("queue", "default")))
    small_key = ("engine_attempt_duration_seconds_bucket", (("actor", "counted"), ("le", "0.005"), ("queue", "default")))
    files = []
    for round_ in range(1, 4):
        pid = count_in_a_process(directory)
        before = samples(registry)  # the dead process's files, not yet archived
        directory.process_died(pid)
        after = samples(registry)

        # Archiving changes no sum; only the dead process's gauge is gone.
        assert after == {key: sample for key, sample in before.items() if key[0] != "engine_attempts_in_progress"}
        assert after[attempts] == 3 * round_
        assert after[count_key] == 4 * round_
        assert after[small_key] == 1 * round_  # buckets stay cumulative, not summed twice
        assert not [name for name in os.listdir(directory.path) if f"_{pid}." in name]
        files.append(directory.file_count())
    assert files[0] == files[-1]  # one archive per type, however many processes died


def test_a_live_process_gauge_goes_with_it(directory):
    env = {**os.environ, MULTIPROC_DIR_VARIABLE: directory.path}
    code = (
        "import os; from engine.metrics import process as m; "
        "m.IN_PROGRESS.labels('busy', 'default').inc(); print(os.getpid())"
    )
    pid = int(run_process([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout)
    gauge = ("engine_attempts_in_progress", (("actor", "busy"), ("queue", "default")))
    assert samples(registry_of(directory))[gauge] == 1

    directory.process_died(pid)

    assert gauge not in samples(registry_of(directory))


def test_the_server_answers_on_loopback_by_default_with_the_exposition_and_health():
    assert Settings().metrics_host == "127.0.0.1" and Settings().metrics_port is None
    restarts = RestartCounter()
    restarts.restarts = 2
    server = MetricsServer(Settings(metrics_port=0), registry_of(restarts)).start()
    try:
        assert server.server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert "engine_worker_restarts_total 2.0" in answer.read().decode()
        with urllib.request.urlopen(f"{server.url}/healthz", timeout=10) as answer:
            assert answer.read() == b"ok\n"
    finally:
        server.close()


def test_a_supervisor_whose_metrics_port_is_taken_says_so_and_starts_nothing(tmp_path):
    taken = socket.create_server(("127.0.0.1", 0))
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGINE_")}
    env.update(ENGINE_STORE_URL=f"sqlite:///{tmp_path}/engine.db", ENGINE_METRICS_PORT=str(taken.getsockname()[1]))
    try:
        done = run_process(
            [sys.executable, "-m", "engine.cli", "worker"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
    finally:
        taken.close()
    assert done.returncode == 2
    assert "cannot serve metrics on 127.0.0.1" in done.stderr and "Started worker" not in done.stderr
