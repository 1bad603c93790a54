"""The `engine` command as a user meets it: clear one-line errors, never a stack trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture
def run_cli(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGINE_")}
    env.update(ENGINE_STORE_URL=f"sqlite:///{tmp_path}/engine.db", ENGINE_ACTOR_MODULES="tests.support.actors")
    env["PYTHONPATH"] = os.getcwd()

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
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
