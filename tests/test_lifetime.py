"""Processes bound with engine.lifetime die with the process that started them, even by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

from engine.lifetime import dying_with_this_process
from tests.support.processes import DRAMATIQ_COMMAND, start_process, wait_for

ROOT = Path(__file__).resolve().parents[1]

#: A stand-in for pytest: it starts ``engine worker`` as the integration tests do, says the
#: supervisor's pid, and waits to be killed.
TEST_RUN = """
import signal, sys
from pathlib import Path
from tests.support.processes import EngineProcess
engine = EngineProcess(["worker", "--processes", "2", "--threads", "1"], {}, Path(sys.argv[1]))
print(engine.pid, flush=True)
signal.pause()
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def engine_env(tmp_path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGINE_")}
    return {
        **env,
        "PYTHONPATH": str(ROOT),
        "ENGINE_STORE_URL": f"sqlite:///{tmp_path}/engine.db",
        "ENGINE_ACTOR_MODULES": "tests.support.actors",
    }


def test_an_engine_started_by_a_killed_test_run_dies_with_it(engine_env, tmp_path):
    # given a test run whose engine supervisor has started its workers
    test_run = start_process(
        [sys.executable, "-c", TEST_RUN, str(tmp_path / "engine.log")],
        env=engine_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    supervisor = psutil.Process(int(test_run.stdout.readline()))
    try:
        workers = wait_for(lambda: len(supervisor.children()) == 2 and supervisor.children(), 60, "two workers")
        engine_pids = [supervisor.pid, *(worker.pid for worker in workers)]

        # when the test run is killed, with no chance to clean up
        test_run.send_signal(signal.SIGKILL)
        test_run.wait(timeout=5)

        # then its supervisor and the supervisor's workers are gone too
        wait_for(lambda: not any(alive(pid) for pid in engine_pids), 10, "the engine processes to die")
    finally:
        test_run.kill()
        test_run.wait()
        with suppress(ProcessLookupError):
            os.killpg(supervisor.pid, signal.SIGKILL)  # what the binding failed to do


def test_a_bound_child_of_a_killed_parent_that_ran_it_to_the_end_dies_too(engine_env, tmp_path):
    # given a parent blocked in run_process, as a test waiting for a command is
    code = (
        "from tests.support.processes import run_process\n"
        "import sys\n"
        "run_process([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(60)'])\n"
    )
    parent = start_process([sys.executable, "-c", code], env=engine_env, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())

        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=5)

        wait_for(lambda: not alive(child), 5, "the child to die")
    finally:
        parent.kill()
        parent.wait()


def test_binding_a_child_outside_the_main_thread_is_refused():
    # The kernel would kill the child when that thread ends, not when the process does.
    errors: list[BaseException] = []

    def bind() -> None:
        try:
            dying_with_this_process()
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=bind)
    thread.start()
    thread.join()

    assert len(errors) == 1 and "main thread" in str(errors[0])


def test_a_dramatiq_cli_worker_dies_with_its_killed_parent(engine_env, tmp_path):
    # given `dramatiq engine.actors` with its worker process ready
    log_path = tmp_path / "dramatiq.log"
    with open(log_path, "wb") as log:
        dramatiq = start_process(
            [*DRAMATIQ_COMMAND, "engine.actors", "--processes", "1", "--threads", "1"],
            env=engine_env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    workers: list[psutil.Process] = []
    try:
        wait_for(lambda: b"ready for action" in log_path.read_bytes(), 60, "the worker to be ready")
        workers = psutil.Process(dramatiq.pid).children()
        worker = workers[0]

        # when the parent is killed, with no chance to stop its worker
        dramatiq.send_signal(signal.SIGKILL)
        dramatiq.wait(timeout=5)

        # then the worker does not go on consuming as an orphan
        wait_for(lambda: not alive(worker.pid), 10, "the worker to die")
    finally:
        dramatiq.kill()
        dramatiq.wait()
        for orphan in workers:  # what the binding failed to do
            with suppress(psutil.NoSuchProcess):
                orphan.kill()
