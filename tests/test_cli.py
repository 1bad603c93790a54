"""The `engine` command as a user meets it: clear one-line errors, never a stack trace."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.processes import run_process, start_process, wait_for

#: The console script a user runs, not ``python -m engine.cli`` (which puts the cwd on sys.path).
ENGINE = str(Path(sys.executable).with_name("engine"))

#: A user's own module, in the directory where they run `engine`.
USER_JOBS = """
import engine


@engine.actor
def greet(name):
    return f"hello {name}"


@engine.actor
def refuse(name):
    raise engine.PermanentError(f"[{name}] is not welcome")  # brackets, as rich markup has
"""


@pytest.fixture
def run_cli(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGINE_")}
    env.update(ENGINE_STORE_URL=f"sqlite:///{tmp_path}/engine.db", ENGINE_ACTOR_MODULES="tests.support.actors")
    env["PYTHONPATH"] = os.getcwd()

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return run_process(
            [sys.executable, "-m", "engine.cli", *args],
            env={**env, **extra_env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def test_submit_records_a_job_that_status_and_jobs_show(run_cli):
    submitted = run_cli("submit", "echo", '{"x": 1}', "--json")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["state"] == "queued" and job["args"] == [{"x": 1}]

    status = run_cli("status", job["id"], "--json")
    listed = run_cli("jobs", "--json")

    assert json.loads(status.stdout)["id"] == job["id"]
    assert [j["id"] for j in json.loads(listed.stdout)["jobs"]] == [job["id"]]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["submit", "no_such_actor"], {}, "unknown actor 'no_such_actor'"),
        (["submit", "echo", "--kwarg", "bad"], {}, "--kwarg takes name=value"),
        (["status", "no-such-id"], {}, "no job with id 'no-such-id'"),
        (["retry", "no-such-id"], {}, "no job with id 'no-such-id'"),
        (["jobs", "--cursor", "garbage"], {}, "malformed cursor"),
        (["jobs"], {"ENGINE_API_PORT": "eighty"}, "ENGINE_API_PORT"),
        (["jobs"], {"ENGINE_BROKER_URL": "redis://localhost"}, "ENGINE_BROKER_URL: expected an amqp://"),
        (["jobs"], {"ENGINE_STORE_URL": "mysql://db"}, "ENGINE_STORE_URL: expected sqlite:///"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(run_cli, args, env, expected):
    done = run_cli(*args, **env)

    assert done.returncode == 2
    assert expected in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


def test_bad_input_loses_no_other_job(run_cli):
    kept = json.loads(run_cli("submit", "echo", "1", "--json").stdout)

    run_cli("submit", "no_such_actor")
    run_cli("submit", "echo", "--kwarg", "x")

    assert [j["id"] for j in json.loads(run_cli("jobs", "--json").stdout)["jobs"]] == [kept["id"]]


# -- a user's project: its own modules, no PYTHONPATH ---------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A directory holding the user's package ``myapp``: a module of actors and a broken one."""
    root = tmp_path_factory.mktemp("project")
    (root / "myapp").mkdir()
    (root / "myapp" / "__init__.py").write_text("")
    (root / "myapp" / "jobs.py").write_text(USER_JOBS)
    (root / "myapp" / "broken.py").write_text("raise RuntimeError('no database configured')\n")
    return root


@pytest.fixture(scope="module")
def project_env(project) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGINE_")}
    env.pop("PYTHONPATH", None)
    # ENGINE_API_PORT=0: `engine run` serves the API on any free port, not on another test's.
    return {**env, "ENGINE_STORE_URL": f"sqlite:///{project}/engine.db", "ENGINE_ACTOR_MODULES": "myapp.jobs", "ENGINE_API_PORT": "0"}


def engine_in(project: Path, env: dict[str, str], *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run the `engine` console script in `project`, its output piped."""
    return run_process(
        [ENGINE, *args], env={**env, **extra_env}, cwd=project, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def running_engine(project, project_env) -> Iterator[None]:
    """``engine run`` in the project directory, for the module's tests; stopped after them."""
    assert engine_in(project, project_env, "db", "upgrade").returncode == 0
    with open(project / "engine.log", "ab") as log:
        engine = start_process(
            [ENGINE, "run", "--processes", "1", "--threads", "2"],
            env=project_env,
            cwd=project,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    yield
    engine.terminate()
    try:
        engine.wait(timeout=30)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(engine.pid, signal.SIGKILL)
        engine.wait()


@pytest.fixture(scope="module")
def finished_jobs(project, project_env, running_engine) -> dict[str, str]:
    """The ids of a succeeded and a failed job of the user's actors, by state."""
    ids = {}
    for actor, state in (("greet", "succeeded"), ("refuse", "failed")):
        done = engine_in(project, project_env, "submit", actor, "bob", "--wait")
        assert state in done.stdout, done.stdout + done.stderr
        ids[state] = done.stdout.split()[0]  # "<id> queued", then the progress bar
    return ids


def test_submit_finds_the_users_module_in_the_current_directory(project, project_env, running_engine):
    done = engine_in(project, project_env, "submit", "greet", "alice", "--wait")

    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[0]
    status = json.loads(engine_in(project, project_env, "status", job_id, "--json").stdout)
    assert status["state"] == "succeeded" and status["actor"] == "greet"


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        ("myapp.broken", "RuntimeError: no database configured"),
        ("myapp.missing", "ModuleNotFoundError: No module named 'myapp.missing'"),
    ],
)
def test_an_actor_module_that_does_not_import_is_one_line_naming_it(project, project_env, running_engine, module, reason):
    done = engine_in(project, project_env, "submit", "greet", "alice", ENGINE_ACTOR_MODULES=module)

    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("error: cannot import actor module") and repr(module) in line and reason in line


def _without_styles(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def in_terminal(project: Path, env: dict[str, str], *args: str, columns: int) -> str:
    """The output of `engine` run on a terminal `columns` wide, without its colours."""
    leader, follower = pty.openpty()
    try:
        done = run_process(
            [ENGINE, *args],
            env={**env, "COLUMNS": str(columns)},
            cwd=project,
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        os.close(follower)
        assert done.returncode == 0, done.stderr
        output = b""
        with suppress(OSError):  # EIO once the terminal's other end is closed and read
            while chunk := os.read(leader, 65536):
                output += chunk
    finally:
        os.close(leader)
    return _without_styles(output.decode())


def narrow_output(project: Path, env: dict[str, str], where: str, *args: str) -> str:
    """The output of `engine` 30 columns wide, on a terminal or piped."""
    if where == "terminal":
        return in_terminal(project, env, *args, columns=30)
    done = engine_in(project, env, *args, COLUMNS="30")
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("command", ["jobs", "status"])
@pytest.mark.parametrize("where", ["piped", "terminal"])
def test_ids_and_states_are_never_cut_however_narrow_the_output(project, project_env, finished_jobs, command, where):
    outputs = []
    for state, job_id in finished_jobs.items():
        args = ["jobs", "--status", state] if command == "jobs" else ["status", job_id]
        output = narrow_output(project, project_env, where, *args)
        outputs.append(output)

        assert job_id in output and state in output, output
        assert "…" not in output, output
        if command == "status" and state == "failed":
            assert "[bob]" in output, output  # the error's text, not taken for markup
    if where == "piped":
        # One row a line, with no borders, for grep and awk.
        rows = [line.split() for line in outputs[0].splitlines() if finished_jobs["succeeded"] in line]
        assert rows and rows[0][0] == finished_jobs["succeeded"], outputs[0]


@pytest.fixture(scope="module")
def schedule_fired(project, project_env, running_engine) -> tuple[str, str]:
    """A long-named schedule that the running engine's scheduler fired (its job's id), then
    paused, and another paused one beside it."""
    name = "nightly-greeting-for-every-customer-account"
    for args in ([name, "greet", "* * * * * *", "bob"], [f"{name}-paused", "greet", "0 4 * * *", "eve", "--paused"]):
        done = engine_in(project, project_env, "schedules", "add", *args)
        assert done.returncode == 0, done.stderr

    def fired() -> list[dict]:
        return json.loads(engine_in(project, project_env, "schedules", "show", name, "--json").stdout)["fires"]

    wait_for(fired, 30, "a fire of the every-second schedule")
    assert engine_in(project, project_env, "schedules", "pause", name).returncode == 0
    [newest, *_] = fired()  # after the pause: no later fire than those `show` lists
    assert newest["outcome"] == "enqueued", newest
    return name, newest["job_id"]


@pytest.mark.parametrize("command", ["schedules", "schedules show"])
@pytest.mark.parametrize("where", ["piped", "terminal"])
def test_schedule_names_ids_and_states_are_never_cut_however_narrow_the_output(project, project_env, schedule_fired, command, where):
    name, job_id = schedule_fired
    args = ["schedules"] if command == "schedules" else ["schedules", "show", name]
    output = narrow_output(project, project_env, where, *args)

    assert "…" not in output, output
    if command == "schedules":
        assert name in output and f"{name}-paused" in output and "paused" in output and "enqueued" in output, output
    else:
        assert name in output and job_id in output and "enqueued" in output, output
    if where == "piped":
        rows = [line.split() for line in output.splitlines() if name in line or job_id in line]
        assert rows and (rows[0][0] == name or job_id in rows[0]), output
