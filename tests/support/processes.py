"""Helpers for tests that run the engine in real processes: start, kill, wait, count side effects.

Every process a test starts goes through `start_process` or `run_process`, which bind it to the
test process: it is SIGKILLed when pytest dies, even by SIGKILL, so that no worker keeps
consuming after its test run (see `engine.lifetime`).
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import pytest

import engine.app
import engine.settings
from engine.job import Job, JobState
from engine.lifetime import dying_with_this_process

T = TypeVar("T")


def start_process(args: list[str], **popen: Any) -> subprocess.Popen:
    """`subprocess.Popen` of a process that dies with this one; call it from the main thread."""
    return subprocess.Popen(args, preexec_fn=dying_with_this_process(), **popen)


def run_process(args: list[str], **run: Any) -> subprocess.CompletedProcess:
    """`subprocess.run` of a process that dies with this one; call it from the main thread."""
    return subprocess.run(args, preexec_fn=dying_with_this_process(), **run)


#: How `EngineProcess` runs an ``engine`` command.
ENGINE_COMMAND = (sys.executable, "-m", "engine.cli")

#: Dramatiq's own CLI, as users may start workers: ``dramatiq engine.actors ...``.
DRAMATIQ_COMMAND = (str(Path(sys.executable).with_name("dramatiq")),)


class EngineProcess:
    """An ``engine`` command (or another `command`, such as `DRAMATIQ_COMMAND`) running in its
    own session, its output kept in a log file.

    Its session lets a test signal its whole process group; it dies with the test process, and
    its workers with it.
    """

    def __init__(
        self, args: list[str], env: dict[str, str], log_path: Path, command: tuple[str, ...] = ENGINE_COMMAND
    ) -> None:
        self.args, self.log_path = args, log_path
        self.log = open(log_path, "ab")
        self.process = start_process(
            [*command, *args],
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def wait_for_state(job_id: str, states: set[JobState], timeout: float = 30) -> Job:
    store = engine.app.get_store()

    def reached() -> Optional[Job]:
        job = store.get(job_id)
        return job if job.state in states else None

    return wait_for(reached, timeout, f"job {job_id} to reach {sorted(states)}")  # type: ignore[return-value]


def completions(env: dict[str, str], job_id: str) -> int:
    """How many times the job's body ran to the end."""
    counter = Path(env["ENGINE_TEST_SIDE_EFFECTS"]) / job_id
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def run_python(code: str, env: dict[str, str]) -> str:
    """Run `code` in a separate Python process with the engine's env; return its stdout."""
    done = run_process(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def point_engine_at(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this process's engine API use exactly `env`'s ENGINE_* settings, with a new broker
    on which the test actors are declared again."""
    for name in [name for name in os.environ if name.startswith("ENGINE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    engine.settings.get_settings.cache_clear()
    engine.app._broker = None
    # Reloaded in place, not imported anew: test modules hold references to it.
    if "tests.support.actors" in sys.modules:
        importlib.reload(sys.modules["tests.support.actors"])
    else:
        importlib.import_module("tests.support.actors")


def release_engine() -> None:
    """Close the broker and store that `point_engine_at` gave this process's engine API, and
    forget its settings, so that the next test starts from nothing."""
    if engine.app._broker is not None:
        engine.app.get_store().close()
        engine.app._broker.close()
    engine.app._broker = None
    engine.settings.get_settings.cache_clear()
