"""engine.logging: JSON lines, the job's fields on every line logged during a job (the user's
own loguru and stdlib lines too), and the stdlib loggers of Dramatiq, pika and APScheduler
routed through loguru at sane levels.

The job runs in a real worker on an embedded store, its output read from its log: one of
``engine worker``, and one of Dramatiq's own CLI, ``dramatiq engine.actors``, which gets the
same logging from importing `engine.actors`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import dramatiq
import pytest

import engine
from engine import JobState
from tests.support.processes import (
    DRAMATIQ_COMMAND,
    ENGINE_COMMAND,
    EngineProcess,
    point_engine_at,
    release_engine,
    run_process,
    wait_for_state,
)

#: What the job says, on two lines (a multi-line message is one JSON line still), with a URL's
#: password, which is masked in every line (`SHOWN`).
SAID = "hello\nworld from amqp://engine:hunter22@rabbit/jobs"
SHOWN = "hello\nworld from amqp://engine:***@rabbit/jobs"

#: The start of a process that logs as the engine's do.
SETUP = "from engine.logging import setup_logging; from engine.settings import Settings; setup_logging(Settings())\n"

#: The two ways to start a worker: the command and its arguments.
WORKERS = {
    "engine worker": (ENGINE_COMMAND, ["worker", "-p", "1", "-t", "1"]),
    "dramatiq engine.actors": (DRAMATIQ_COMMAND, ["engine.actors", "--processes", "1", "--threads", "2"]),
}

#: A line of the parent process of ``dramatiq``, in Dramatiq's format: that process never imports
#: `engine.actors`, so nothing there sets up the engine's logging (see `engine.actors`).
DRAMATIQ_PARENT_LINE = re.compile(r"\[[^]]+\] \[PID \d+\] \[MainThread\] \[dramatiq\.MainProcess\] \[(\w+)\] (.*)")

#: What that process logs when it starts.
DRAMATIQ_STARTS = ("INFO", f"Dramatiq {dramatiq.__version__!r} is booting up.")


@pytest.fixture
def embedded_env(tmp_path, monkeypatch) -> Iterator[dict[str, str]]:
    """ENGINE_ variables of an embedded engine in tmp_path, applied to this process too."""
    env = {
        "ENGINE_STORE_URL": f"sqlite:///{tmp_path}/engine.db",
        "ENGINE_ACTOR_MODULES": "tests.support.actors",
        "ENGINE_SHUTDOWN_TIMEOUT_S": "10",
    }
    point_engine_at(env, monkeypatch)
    yield env
    release_engine()


@pytest.fixture(params=sorted(WORKERS))
def failed_job_output(request, embedded_env, tmp_path) -> Callable[..., tuple[str, str]]:
    """Runs `chatty_failure` to its end in a worker (of each kind) with `env`; its id and the
    worker's output."""
    command, args = WORKERS[request.param]

    def run(**env: str) -> tuple[str, str]:
        worker = EngineProcess(args, {**embedded_env, **env}, tmp_path / "worker.log", command=command)
        try:
            job = engine.submit("chatty_failure", SAID)
            wait_for_state(job.id, {JobState.FAILED})
        finally:
            assert worker.stop() == 0, worker.output()
        return job.id, worker.output()

    return run


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line of a worker's output as JSON, or it raises; but the lines of the parent process
    of ``dramatiq``, which must be just the two it logs at start and stop."""
    of_dramatiq_parent, others = split_dramatiq_parent(output)
    assert of_dramatiq_parent in ([], [DRAMATIQ_STARTS, ("INFO", "Sending signal 'SIGTERM' to subprocesses...")]), output
    return [json.loads(line) for line in others]


def split_dramatiq_parent(output: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The (level, message) of each line of the parent process of ``dramatiq``, and the other lines."""
    parent, others = [], []
    for line in output.splitlines():
        found = DRAMATIQ_PARENT_LINE.fullmatch(line)
        if found:
            parent.append((found.group(1), found.group(2)))
        else:
            others.append(line)
    return parent, others


def test_every_line_of_a_failing_job_is_one_json_object_with_the_job_s_fields(failed_job_output):
    job_id, output = failed_job_output(ENGINE_LOG_JSON="1")

    lines = json_lines(output)
    of_the_job = [line for line in lines if "job_id" in line]
    assert of_the_job, output
    for line in of_the_job:
        assert (line["job_id"], line["actor"], line["queue"]) == (job_id, "chatty_failure", "default"), line
        assert line["attempt"] in (1, 2), line
    # The user's own lines, through loguru and the stdlib, and the failure with its traceback:
    # once per attempt, each carrying its attempt's number.
    for logger_name, level, message in [
        ("tests.support.actors", "INFO", f"loguru says {SHOWN}"), ("tests.user", "WARNING", f"logging says {SHOWN}"),
    ]:  # fmt: skip
        said = [line["attempt"] for line in of_the_job if (line["logger"], line["level"], line["message"]) == (logger_name, level, message)]
        assert said == [1, 2], lines
    failures = [line for line in of_the_job if line["level"] == "ERROR" and "exception" in line]
    assert [line["attempt"] for line in failures] == [1, 2], lines
    assert all(f"ValueError: failed after saying {SHOWN}" in line["exception"] for line in failures)
    assert all(line["exception"].startswith("Traceback (most recent call last):") for line in failures)
    # Nothing about the job is logged without its fields, and the password nowhere.
    unbound = [line for line in lines if "job_id" not in line and (job_id in json.dumps(line) or "world from" in json.dumps(line))]
    assert unbound == []
    assert "hunter22" not in output


def test_a_text_line_of_a_job_shows_its_actor_attempt_queue_and_id(failed_job_output):
    job_id, output = failed_job_output()

    lines = output.splitlines()
    for attempt in (1, 2):
        prefix = f"[chatty_failure#{attempt}@default {job_id}] "
        for said in ("tests.support.actors - loguru says hello", "tests.user - logging says hello"):
            assert sum(prefix + said in line for line in lines) == 1, output
        assert sum(prefix + "dramatiq.worker.WorkerThread - Failed to process message" in line for line in lines) == 1
    assert output.count("Traceback (most recent call last):") == 2
    assert "│" not in output  # loguru's variable values, which could hold secrets, are not shown


def test_a_configuration_error_in_a_dramatiq_worker_is_one_masked_json_line_and_exit_code_2(embedded_env, tmp_path):
    # A module that does not import, named like a URL with a password: its error quotes it.
    named_like_a_url = "amqp://engine:hunter22@rabbit/jobs"
    command, args = WORKERS["dramatiq engine.actors"]
    env = {**embedded_env, "ENGINE_LOG_JSON": "1", "ENGINE_ACTOR_MODULES": named_like_a_url}
    worker = EngineProcess(args, env, tmp_path / "worker.log", command=command)

    assert worker.process.wait(timeout=60) == 2
    worker.stop()  # closes its log
    of_dramatiq_parent, others = split_dramatiq_parent(worker.output())
    assert of_dramatiq_parent[0] == DRAMATIQ_STARTS
    assert re.fullmatch(r"Worker with PID \d+ exited unexpectedly \(code 2\)\. Shutting down\.\.\.", of_dramatiq_parent[1][1])
    [error] = [line for line in map(json.loads, others) if line["level"] == "CRITICAL"]
    assert error["message"] == (
        "dramatiq engine.actors: cannot import actor module 'amqp://engine:***@rabbit/jobs' (ENGINE_ACTOR_MODULES): "
        "ModuleNotFoundError: No module named 'amqp://engine:***@rabbit/jobs'"
    )
    assert "hunter22" not in worker.output() and "Traceback" not in worker.output()


def test_a_program_that_imports_engine_actors_keeps_its_own_logging(embedded_env, tmp_path):
    code = (
        "import logging\n"
        "logging.basicConfig(format='app: %(name)s %(message)s')\n"
        "import engine.actors\n"
        "logging.getLogger('myapp').warning('sent')\n"
    )
    done = run_process(
        [sys.executable, "-c", code], env={**os.environ, "ENGINE_LOG_JSON": "1"}, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "app: myapp sent"
    assert not [line for line in done.stderr.splitlines() if line.startswith("{")]


def log_in_a_new_process(code: str, tmp_path: Path, **env: str) -> list[str]:
    """The stderr lines of `code`, run after `setup_logging` in a process of its own."""
    done = run_process(
        [sys.executable, "-c", SETUP + code], env={"PATH": "/usr/bin:/bin", **env}, cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_stdlib_loggers_go_through_loguru_and_pika_and_apscheduler_are_quiet_at_info(tmp_path):
    code = (
        "import logging\n"
        "for name in ('dramatiq.worker', 'pika.connection', 'apscheduler.scheduler', 'myapp'):\n"
        "    logging.getLogger(name).info('%s info', name)\n"
        "    logging.getLogger(name).warning('%s warning', name)\n"
    )
    lines = [json.loads(line) for line in log_in_a_new_process(code, tmp_path, ENGINE_LOG_JSON="1")]

    shown = {(line["logger"], line["level"]) for line in lines}
    assert shown == {
        ("dramatiq.worker", "INFO"), ("dramatiq.worker", "WARNING"), ("myapp", "INFO"), ("myapp", "WARNING"),
        ("pika.connection", "WARNING"), ("apscheduler.scheduler", "WARNING"),
    }  # fmt: skip
    assert all(line["function"] == "<module>" and line["process"] > 0 for line in lines)


def test_at_debug_pika_and_apscheduler_say_everything(tmp_path):
    code = "import logging\nfor name in ('pika', 'apscheduler.executors.default'):\n    logging.getLogger(name).debug('%s debug', name)\n"
    lines = log_in_a_new_process(code, tmp_path, ENGINE_LOG_JSON="1", ENGINE_LOG_LEVEL="debug")

    assert [json.loads(line)["message"] for line in lines] == ["pika debug", "apscheduler.executors.default debug"]


def test_a_json_line_is_flat_with_extras_and_a_masked_traceback(tmp_path):
    code = (
        "from loguru import logger\n"
        "try:\n"
        "    raise ConnectionError('lost amqp://engine:hunter22@rabbit/jobs\\nand more')\n"
        "except ConnectionError:\n"
        "    logger.bind(request_id='r1', level='not this one').exception('failed {}', 'here\\nand there')\n"
    )
    [line] = log_in_a_new_process(code, tmp_path, ENGINE_LOG_JSON="1")

    record: dict[str, Any] = json.loads(line)
    assert set(record) == {"time", "level", "message", "logger", "function", "line", "process", "thread", "exception", "request_id"}
    assert record["time"].endswith("Z") and record["time"][10] == "T"
    assert (record["level"], record["message"], record["request_id"]) == ("ERROR", "failed here\nand there", "r1")
    assert record["exception"].endswith("ConnectionError: lost amqp://engine:***@rabbit/jobs\nand more")
    assert "hunter22" not in line


def test_an_uncaught_exception_is_logged_masked_in_a_thread_and_in_the_main_one(tmp_path):
    code = (
        "import threading\n"
        "def fail():\n"
        "    raise ConnectionError('lost amqp://engine:hunter22@rabbit/jobs')\n"
        "thread = threading.Thread(target=fail, name='sender')\n"
        "thread.start(); thread.join()\n"
        "fail()\n"
    )
    done = run_process(
        [sys.executable, "-c", SETUP + code], env={"PATH": "/usr/bin:/bin", "ENGINE_LOG_JSON": "1"}, cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["level"], line["message"]) for line in lines] == [
        ("ERROR", "Uncaught ConnectionError in sender: the thread stops."),
        ("CRITICAL", "Uncaught ConnectionError: the process stops."),
    ]
    assert all(line["exception"].endswith("ConnectionError: lost amqp://engine:***@rabbit/jobs") for line in lines)
