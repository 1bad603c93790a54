"""The supervisor with real worker processes on a real embedded store (a SQLite file).

The supervisor runs as ``engine worker`` will run it, in its own session so that a test can
signal it, or its whole process group as a Ctrl-C would, and clean up everything it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import Callable, Iterator

import dramatiq
import psutil
import pytest

import engine
import engine.app
import engine.settings
from engine import JobState
from engine.supervisor import cpus_to_pin
from engine.worker import EXIT_CONFIG, EXIT_KILLED
from tests.support.processes import point_engine_at, run_process, start_process, wait_for

ROOT = Path(__file__).resolve().parents[1]
SUPERVISOR = (
    "import sys; from engine.settings import get_settings; from engine.supervisor import run_workers; "
    "sys.exit(run_workers(get_settings(), processes={processes}, threads=2))"
)
READY = "Worker process is ready for action."
#: Long enough that a supervisor returning well before it has not had to kill anyone.
SHUTDOWN_TIMEOUT_S = 20



def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class SupervisorProcess:
    """The supervisor in its own session, its output (and its workers') in a log file."""

    def __init__(self, env: dict[str, str], cwd: Path, processes: int) -> None:
        self.log_path = cwd / "supervisor.log"
        self.log = open(self.log_path, "wb")
        self.process = start_process(
            [sys.executable, "-c", SUPERVISOR.format(processes=processes)],
            env=env,
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def worker_pids(self) -> list[int]:
        """The supervisor's live children."""
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [child.pid for child in children if alive(child.pid)]

    def wait_ready(self, count: int, timeout: float = 20) -> list[int]:
        """The pids of `count` live workers that have said they are ready."""

        def ready() -> list[int]:
            output = self.output()
            pids = [pid for pid in self.worker_pids() if re.search(rf"\[{pid}\].*{READY}", output)]
            return pids if len(pids) == count else []

        return wait_for(ready, timeout, f"{count} workers to be ready\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        """Kill whatever is left of its process group."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture
def engine_env(tmp_path) -> dict[str, str]:
    """ENGINE_ variables of an embedded engine in tmp_path: a SQLite store, no broker URL."""
    return {
        "ENGINE_STORE_URL": f"sqlite:///{tmp_path}/engine.db",
        "ENGINE_ACTOR_MODULES": "tests.support.actors",
        "ENGINE_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S),
    }


def process_env(engine_env: dict[str, str], **overrides: str) -> dict[str, str]:
    """This process's environment without its ENGINE_ variables, plus the test's."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGINE_")}
    # The repository first: it holds tests.support, and it is the engine under test.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**env, **engine_env, **overrides}


@pytest.fixture
def start_supervisor(tmp_path, engine_env) -> Iterator[Callable[..., SupervisorProcess]]:
    """Start a supervisor in tmp_path (away from any .env file); `**env` overrides variables."""
    started: list[SupervisorProcess] = []

    def start(processes: int = 2, **env: str) -> SupervisorProcess:
        supervisor = SupervisorProcess(process_env(engine_env, **env), tmp_path, processes)
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        supervisor.close()


@pytest.fixture
def client(monkeypatch, tmp_path, engine_env) -> Iterator[None]:
    """This process as a client of the same store: `engine.submit` and `engine.get` work."""
    monkeypatch.chdir(tmp_path)
    point_engine_at(engine_env, monkeypatch)
    yield
    engine.get_broker().close()
    engine.app._broker = None
    dramatiq.set_broker(None)
    engine.settings.get_settings.cache_clear()


def test_a_job_runs_in_a_supervised_worker(start_supervisor, client):
    supervisor = start_supervisor()
    pids = supervisor.wait_ready(2)

    job = engine.submit("echo", {"x": 1})

    wait_for(lambda: engine.get(job.id).state == JobState.SUCCEEDED, 15, "the job to succeed")
    assert engine.result(job.id) == {"x": 1}
    [attempt] = engine.attempts(job.id)
    assert attempt.worker_pid in pids


def cpus_of_threads(pid: int) -> list[int]:
    """The CPUs that any thread of the process may run on."""
    return sorted({cpu for thread in psutil.Process(pid).threads() for cpu in os.sched_getaffinity(thread.id)})


@pytest.mark.parametrize("mode", ["on", "off"])
def test_workers_are_pinned_to_one_cpu_each_round_robin_when_asked(start_supervisor, mode):
    supervisor = start_supervisor(processes=2, ENGINE_PIN_CPUS=mode)
    pids = supervisor.wait_ready(2)

    cpus = sorted(os.sched_getaffinity(0))
    affinities = sorted(cpus_of_threads(pid) for pid in pids)
    if mode == "on":
        assert affinities == sorted([cpus[index % len(cpus)]] for index in range(2))
    else:
        assert affinities == [cpus, cpus]


def test_auto_pins_only_when_there_are_at_least_as_many_workers_as_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    assert cpus_to_pin("auto", len(cpus)) == cpus
    assert cpus_to_pin("auto", len(cpus) - 1) is None
    assert cpus_to_pin("on", 1) == cpus and cpus_to_pin("off", 64) is None


def test_a_killed_worker_is_replaced_while_its_sibling_keeps_running(start_supervisor):
    supervisor = start_supervisor()
    killed, sibling = supervisor.wait_ready(2)

    os.kill(killed, signal.SIGKILL)

    [replacement] = wait_for(
        lambda: [pid for pid in supervisor.worker_pids() if pid not in (killed, sibling)], 2, "a replacement worker"
    )
    assert sibling in supervisor.worker_pids()
    assert sorted(supervisor.wait_ready(2)) == sorted([sibling, replacement])
    assert f"(pid {killed}) was killed by SIGKILL" in supervisor.output()


def test_workers_die_with_their_supervisor_even_when_it_is_killed(start_supervisor):
    supervisor = start_supervisor()
    pids = supervisor.wait_ready(2)

    supervisor.process.kill()
    supervisor.process.wait(timeout=5)

    wait_for(lambda: not any(alive(pid) for pid in pids), 3, "the orphaned workers to die")


def test_a_worker_whose_supervisor_is_already_gone_exits_at_once(engine_env, tmp_path):
    # Its parent is this process, not the pid it was told: the supervisor died before the
    # worker could ask to die with it.
    done = run_process(
        [sys.executable, "-m", "engine.worker", "--threads", "1", "--parent-pid", "1"],
        env=process_env(engine_env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=15,
    )

    assert done.returncode == EXIT_KILLED
    assert READY not in done.stderr


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(lambda pid: os.kill(pid, signal.SIGTERM), id="SIGTERM to the supervisor"),
        pytest.param(lambda pid: os.killpg(pid, signal.SIGINT), id="Ctrl-C to the process group"),
    ],
)
def test_a_stop_signal_lets_running_jobs_finish_then_returns_0(start_supervisor, client, stop):
    supervisor = start_supervisor()
    pids = supervisor.wait_ready(2)
    job = engine.submit("sleepy", 1.5)
    wait_for(lambda: engine.get(job.id).state == JobState.RUNNING, 15, "the job to start")

    stop(supervisor.process.pid)

    # Well within the shutdown timeout: the workers stopped by themselves, nobody was killed.
    assert supervisor.process.wait(timeout=SHUTDOWN_TIMEOUT_S / 2) == 0
    assert engine.get(job.id).state == JobState.SUCCEEDED
    assert not any(alive(pid) for pid in pids)
    assert "SIGKILL" not in supervisor.output()


def test_a_crash_loop_backs_off(start_supervisor):
    supervisor = start_supervisor(processes=1, ENGINE_ACTOR_MODULES="tests.support.crashing")
    downtimes: list[float] = []  # from a worker's death to the start of its replacement
    current, died_at = None, None
    deadline = time.monotonic() + 15
    while len(downtimes) < 2 and time.monotonic() < deadline:
        pid = next(iter(supervisor.worker_pids()), None)
        now = time.monotonic()
        if pid is None and current is not None and died_at is None:
            died_at = now
        elif pid is not None and pid != current:
            if current is not None:
                downtimes.append(now - died_at if died_at is not None else 0.0)
            current, died_at = pid, None
        time.sleep(0.01)

    # Restarted after 0.5 s, then 1 s: not at once, and longer each time.
    assert len(downtimes) == 2, supervisor.output()
    assert downtimes[0] >= 0.4 and downtimes[1] >= 0.9, downtimes
    assert supervisor.process.poll() is None  # a crash loop is no reason to give up


def test_a_worker_that_cannot_start_as_configured_stops_the_supervisor(start_supervisor):
    supervisor = start_supervisor(ENGINE_ACTOR_MODULES="tests.support.no_such_module")

    assert supervisor.process.wait(timeout=15) == EXIT_CONFIG
    output = supervisor.output()
    assert "Traceback" not in output
    messages = [line for line in output.splitlines() if line.startswith("engine worker:")]
    # One line per worker started, at most: none was restarted.
    assert 1 <= len(messages) <= 2, output
    assert all("tests.support.no_such_module" in line and "ENGINE_ACTOR_MODULES" in line for line in messages)


def test_a_malformed_setting_is_reported_in_one_line(engine_env, tmp_path):
    done = run_process(
        [sys.executable, "-m", "engine.worker", "--threads", "1"],
        env=process_env(engine_env, ENGINE_BROKER_URL="http://nope"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=15,
    )

    assert done.returncode == EXIT_CONFIG
    [line] = done.stderr.splitlines()
    assert line.startswith("engine worker: ") and "ENGINE_BROKER_URL" in line and "http://nope" in line


def test_a_malformed_setting_stops_the_supervisor_before_any_worker(start_supervisor):
    supervisor = start_supervisor(ENGINE_BROKER_URL="http://nope")

    assert supervisor.process.wait(timeout=15) != 0
    assert "ENGINE_BROKER_URL" in supervisor.output()
    assert "Started worker" not in supervisor.output()


# -- engine run: the API, a scheduler and the workers ------------------------------------------------

API_ADDRESS = re.compile(r"API listening on (http://[\d.]+:\d+)")


def get_json(url: str) -> tuple[int, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, json.loads(response.read())


def children_by_kind(pid: int) -> dict[str, int]:
    """The live children of `pid`, by the module they run (``engine.worker``, ``scheduler``, ``api``)."""
    found = {}
    for child in psutil.Process(pid).children():
        with suppress(psutil.NoSuchProcess):
            command = child.cmdline()
            if alive(child.pid) and "-m" in command:
                found[command[command.index("-m") + 1]] = child.pid
    return found


@pytest.fixture
def engine_run(tmp_path, engine_env) -> Iterator[subprocess.Popen]:
    """``engine run`` in tmp_path, in its own session, the API on any free port."""
    log = open(tmp_path / "engine.log", "wb")
    process = start_process(
        [sys.executable, "-m", "engine.cli", "run", "--processes", "1", "--threads", "1"],
        env=process_env(engine_env, ENGINE_API_PORT="0"),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield process
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    log.close()


def test_engine_run_serves_the_api_restarts_it_and_stops_everything_on_one_sigterm(engine_run, tmp_path):
    log = tmp_path / "engine.log"
    addresses = lambda: API_ADDRESS.findall(log.read_text(errors="replace"))  # noqa: E731
    [url] = wait_for(addresses, 30, "the API's address in the log")
    assert get_json(f"{url}/healthz")[0] == 200
    status, page = get_json(f"{url}/api/jobs")
    assert status == 200 and page == {"jobs": [], "next_cursor": None}
    children = wait_for(lambda: children_by_kind(engine_run.pid) if len(children_by_kind(engine_run.pid)) == 3 else None, 20, "three children")
    assert set(children) == {"engine.worker", "scheduler", "api"}

    os.kill(children["api"], signal.SIGKILL)

    wait_for(lambda: len(addresses()) == 2, 30, f"the restarted API\n{log.read_text()}")
    # The same socket, inherited from the supervisor: the restarted API keeps the port.
    assert addresses() == [url, url]
    assert get_json(f"{url}/healthz")[0] == 200
    restarted = children_by_kind(engine_run.pid)
    assert restarted["api"] != children["api"] and restarted["engine.worker"] == children["engine.worker"]

    engine_run.send_signal(signal.SIGTERM)

    assert engine_run.wait(timeout=SHUTDOWN_TIMEOUT_S / 2) == 0
    assert not any(alive(pid) for pid in restarted.values())
    assert "killing it" not in log.read_text()  # each stopped by itself


def test_two_engine_runs_side_by_side_each_serve_their_own_api(tmp_path, engine_env):
    started = []
    try:
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
            env = process_env(engine_env, ENGINE_STORE_URL=f"sqlite:///{tmp_path / name}/engine.db", ENGINE_API_PORT="0")
            log = tmp_path / name / "engine.log"
            with open(log, "wb") as out:
                process = start_process(
                    [sys.executable, "-m", "engine.cli", "run", "--processes", "1", "--threads", "1"],
                    env=env, cwd=tmp_path / name, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            started.append((process, log))
        urls = [wait_for(lambda: API_ADDRESS.findall(log.read_text()), 30, f"the API of {log}")[0] for _process, log in started]
        assert urls[0] != urls[1]
        assert all(get_json(f"{url}/healthz")[0] == 200 for url in urls)
    finally:
        for process, _log in started:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_engine_run_reports_a_taken_api_port_in_one_line_and_starts_nothing(tmp_path, engine_env):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = run_process(
            [sys.executable, "-m", "engine.cli", "run"],
            env=process_env(engine_env, ENGINE_API_PORT=str(port)),
            cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr
    assert "Started worker" not in done.stdout + done.stderr
