"""No password from the broker or store URL, and no API token, appears anywhere in a whole run's
output: the logs of ``engine worker`` and ``dramatiq engine.actors`` against RabbitMQ and
PostgreSQL and of an embedded ``engine run``, at DEBUG, and the CLI's output and errors.

The secrets are random and distinctive, with characters that must be percent-encoded. The run
makes them travel: a job is given the broker URL as its argument, logs it and fails with it;
the store and the broker are unreachable (a closed port, a vhost that does not exist), and a
setting is malformed. That they were masked, not merely absent, is checked too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import pytest

from tests.integration.conftest import AMQP_HOST
from tests.support.processes import DRAMATIQ_COMMAND, ENGINE_COMMAND, EngineProcess, run_process, wait_for

#: Characters that a URL must percent-encode, so that both forms of a password are looked for.
AWKWARD = ":@/%"


def new_secret() -> str:
    return f"s3-{uuid.uuid4().hex}{AWKWARD}"


@pytest.fixture
def rabbit_user(amqp_vhost) -> Iterator[tuple[str, str]]:
    """A RabbitMQ user with a random password, allowed everything on the test vhost."""
    name, password = f"engine-test-{uuid.uuid4().hex[:8]}", new_secret()
    for command in (["add_user", name, password], ["set_permissions", "-p", amqp_vhost, name, ".*", ".*", ".*"]):
        subprocess.run(["rabbitmqctl", *command], check=True, capture_output=True, timeout=60)
    yield name, password
    subprocess.run(["rabbitmqctl", "delete_user", name], capture_output=True, timeout=60)


class Run:
    """Everything the engine printed during the test, gathered to be searched."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path, self.env = tmp_path, env
        self.processes: list[EngineProcess] = []
        self.outputs: list[str] = []

    def start(self, *args: str, command: tuple[str, ...] = ENGINE_COMMAND, **env: str) -> EngineProcess:
        path = self.tmp_path / f"engine-{len(self.processes)}.log"
        process = EngineProcess(list(args), {**self.env, **env}, path, command=command)
        self.processes.append(process)
        return process

    def command(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        done = run_process(
            [sys.executable, "-m", "engine.cli", *args], env={**os.environ, **self.env, **env},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        self.outputs += [done.stdout, done.stderr]
        return done

    def everything(self) -> str:
        for process in self.processes:
            process.stop()
        return "\n".join([*self.outputs, *(process.output() for process in self.processes)])


@pytest.fixture
def run(tmp_path) -> Iterator[Run]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGINE_")}
    env.update(ENGINE_ACTOR_MODULES="tests.support.actors", ENGINE_LOG_LEVEL="DEBUG", ENGINE_SHUTDOWN_TIMEOUT_S="10")
    gathered = Run(tmp_path, env)
    yield gathered
    for process in gathered.processes:
        process.stop()


def assert_never_shown(secret: str, output: str) -> None:
    for form in (secret, quote(secret, safe=""), secret.removesuffix(AWKWARD)):
        assert form not in output, f"{form!r} is in the output:\n" + "\n".join(line for line in output.splitlines() if form in line)


def test_no_password_of_the_broker_or_store_url_appears_in_a_distributed_run(run, rabbit_user, amqp_vhost, pg_url):
    user, password = rabbit_user
    broker_url = f"amqp://{user}:{quote(password, safe='')}@{AMQP_HOST}:5672/{amqp_vhost}"
    store_url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{quote(password, safe='')}@")
    run.env.update(ENGINE_BROKER_URL=broker_url, ENGINE_STORE_URL=store_url)

    # A job that logs the broker URL and fails with it, in a worker that logs JSON, in one that
    # logs text, and in one of Dramatiq's own CLI that logs JSON.
    workers = []
    for command, args, log_json in [
        (ENGINE_COMMAND, ["worker", "-p", "1", "-t", "1"], "1"),
        (ENGINE_COMMAND, ["worker", "-p", "1", "-t", "1"], "0"),
        (DRAMATIQ_COMMAND, ["engine.actors", "--processes", "1", "--threads", "2"], "1"),
    ]:
        workers.append(run.start(*args, command=command, ENGINE_LOG_JSON=log_json))
        submitted = run.command("submit", "chatty_failure", broker_url, "--wait")
        assert submitted.returncode == 1, submitted.stderr  # it failed, as it should
        workers[-1].stop()
    assert run.command("jobs", "--status", "failed").returncode == 0
    # The store on a closed port, RabbitMQ without the vhost, a malformed URL.
    closed_port = re.sub(r"@([^/:]+):\d+/", r"@\1:1/", store_url)
    no_vhost = broker_url.rsplit("/", 1)[0] + "/no-such-vhost"
    assert run.command("worker", "-p", "1", ENGINE_STORE_URL=closed_port).returncode == 2
    unreachable = run.start("engine.actors", "--processes", "1", command=DRAMATIQ_COMMAND, ENGINE_STORE_URL=closed_port)
    assert unreachable.process.wait(timeout=60) == 2
    assert "dramatiq engine.actors: (psycopg.OperationalError) connection failed" in unreachable.output()
    assert run.command("submit", "echo", "1", ENGINE_STORE_URL=closed_port).returncode == 2
    assert run.command("submit", "echo", "1", ENGINE_BROKER_URL=no_vhost).returncode == 2
    assert run.command("status", "x", ENGINE_BROKER_URL=broker_url.replace("amqp://", "http://")).returncode == 2
    lost = run.start("worker", "-p", "1", ENGINE_BROKER_URL=no_vhost)
    wait_for(lambda: "no-such-vhost not found" in lost.output(), 30, "the worker to fail to connect")

    output = run.everything()
    assert_never_shown(password, output)
    # Masked, not merely never logged: the URL went through the logs and the error output.
    assert all(f"says amqp://{user}:***@" in worker.output() for worker in workers)
    assert "got 'http://" + f"{user}:***@" in output
    assert [json.loads(line) for line in workers[0].output().splitlines()]
    # Dramatiq's parent process logs its own lines in its own format (see engine.actors).
    of_workers = [line for line in workers[2].output().splitlines() if "[dramatiq.MainProcess]" not in line]
    assert [json.loads(line) for line in of_workers]


def test_no_api_token_appears_in_an_embedded_run(run, tmp_path):
    token = new_secret()
    run.env.update(ENGINE_STORE_URL=f"sqlite:///{tmp_path}/engine.db", ENGINE_API_TOKEN=token, ENGINE_API_PORT="0")
    engine_run = run.start("run", "-p", "1", "-t", "1")
    url = wait_for(lambda: re.search(r"API listening on (http://\S+)", engine_run.output()), 30, "the API").group(1)

    def call(path: str, bearer: str, body: object = None) -> int:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url + path, data=data, headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert call("/api/jobs", bearer=token, body={"actor": "chatty_failure", "args": [f"the token is {token}"]}) == 202
    assert call("/api/jobs", bearer="wrong " + token[::-1]) == 401
    assert call("/api/jobs?status=nonsense", bearer=token) == 422
    wait_for(lambda: "Retries exceeded" in engine_run.output(), 30, "the job to fail")

    output = run.everything()
    assert_never_shown(token, output)
    assert "the token is ***" in output
