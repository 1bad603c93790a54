"""``engine metrics-server``: the metrics of workers started by ``dramatiq engine.actors``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import engine
from engine import JobState
from engine.metrics.host import MULTIPROC_DIR_VARIABLE
from tests.support.processes import EngineProcess, run_process, start_process, wait_for, wait_for_state

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["embedded"], indirect=True)
def test_it_serves_what_dramatiq_workers_count(engine_env, tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = {**os.environ, **engine_env, MULTIPROC_DIR_VARIABLE: str(directory), "ENGINE_METRICS_PORT": "0"}
    log = open(tmp_path / "dramatiq.log", "wb")
    workers = start_process(
        [sys.executable, "-m", "dramatiq", "engine.actors", "--processes", "1", "--threads", "2"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = EngineProcess(["metrics-server"], env, tmp_path / "metrics-server.log")
    try:
        url = wait_for(lambda: re.search(r"Serving metrics on (\S+)", server.output()), 30, "the server").group(1)
        job = engine.submit("echo", 1)
        assert wait_for_state(job.id, {JobState.SUCCEEDED}, timeout=30)

        def succeeded() -> float:
            with urllib.request.urlopen(url, timeout=10) as answer:
                families = text_string_to_metric_families(answer.read().decode())
            labels = {"actor": "echo", "queue": "default", "outcome": "succeeded"}
            found = [s.value for f in families for s in f.samples if s.name == "engine_attempts_total" and s.labels == labels]
            return found[0] if found else 0

        wait_for(lambda: succeeded() == 1, 10, "the attempt to be served")
    finally:
        assert server.stop() == 0
        workers.send_signal(signal.SIGTERM)
        workers.wait(timeout=30)
        log.close()


def test_it_needs_the_directory_and_a_port(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != MULTIPROC_DIR_VARIABLE}
    command = [sys.executable, "-m", "engine.cli", "metrics-server"]

    unset = run_process(command, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    no_port = run_process(
        command, env={**env, MULTIPROC_DIR_VARIABLE: str(tmp_path)}, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )

    assert unset.returncode == 2 and MULTIPROC_DIR_VARIABLE in unset.stderr
    assert no_port.returncode == 2 and "ENGINE_METRICS_PORT" in no_port.stderr
