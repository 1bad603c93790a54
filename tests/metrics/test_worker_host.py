"""A real worker host (``engine worker``) serving its metrics while its workers are killed and
restarted: counters never go backwards, they agree with the store's attempts, and the
multiprocess directory holds no more files after many restarts."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections import Counter
from contextlib import suppress

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

import engine
from engine import JobState, Outcome
from engine.metrics.host import ARCHIVED_TYPES, MULTIPROC_DIR_VARIABLE
from engine.store.schema import jobs
from tests.support.processes import EngineProcess, wait_for, wait_for_state

pytestmark = pytest.mark.integration

FINISHED = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED}
READY = "Worker process is ready for action."
MONOTONIC_SUFFIXES = ("_total", "_count", "_sum", "_bucket")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Host:
    """An ``engine worker`` or ``engine run`` serving metrics on a free port, and what a test
    reads of it."""

    def __init__(self, process: EngineProcess) -> None:
        self.process = process
        found = wait_for(
            lambda: re.search(r"Serving metrics on (http://\S+)/metrics", process.output()), 30, "the metrics server"
        )
        self.url = found.group(1)

    def children(self) -> list[psutil.Process]:
        """Its live processes: workers, and with ``engine run`` the API and the scheduler."""
        live = []
        for child in psutil.Process(self.process.pid).children():
            with suppress(psutil.NoSuchProcess):  # a dead child reaped since it was listed
                if child.status() != psutil.STATUS_ZOMBIE:
                    live.append(child)
        return live

    def workers(self, count: int = 2) -> list[psutil.Process]:
        """Its `count` live worker processes, once each has said it is ready."""

        def ready() -> list[psutil.Process]:
            output = self.process.output()
            up = [child for child in self.children() if re.search(rf"\[{child.pid}\].*{READY}", output)]
            return up if len(up) == count else []

        return wait_for(ready, 30, f"{count} ready workers\n{self.process.output()[-3000:]}")

    def metrics_dir(self) -> str:
        return self.workers()[0].environ()[MULTIPROC_DIR_VARIABLE]

    def scrape(self) -> Samples:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def attempts_by_outcome(samples: Samples) -> Counter:
    counted: Counter = Counter()
    for (name, labels), count in samples.items():
        if name == "engine_attempts_total":
            counted[dict(labels)["outcome"]] += int(count)
    return +counted


def store_attempts_by_outcome() -> Counter:
    store = engine.get_store()
    with store.reading() as connection:
        ids = connection.execute(select(jobs.c.id)).scalars().all()
    return Counter(attempt.outcome.value for job_id in ids for attempt in store.list_attempts(job_id))


def run_jobs() -> None:
    """Jobs that succeed, retry then succeed, and fail, run to their end."""
    sent = [engine.submit("echo", n) for n in range(6)]
    sent += [engine.submit("flaky", 1) for _ in range(2)]
    sent += [engine.submit("hopeless") for _ in range(2)]
    for job in sent:
        wait_for_state(job.id, FINISHED, timeout=60)


def assert_agrees_with_the_store(host: Host) -> Samples:
    """The host's attempts, by outcome, are the store's (once the last ends are counted)."""
    wait_for(lambda: attempts_by_outcome(host.scrape()) == store_attempts_by_outcome(), 10, "the metrics to agree with the store")
    return host.scrape()


def assert_no_counter_went_back(before: Samples, after: Samples) -> None:
    for key, value in before.items():
        if key[0].endswith(MONOTONIC_SUFFIXES):
            assert after.get(key, 0) >= value, f"{key} went from {value} to {after.get(key)}"


def assert_only_live_processes_have_files(host: Host, directory: str) -> None:
    host.workers()  # all up again
    live = {str(child.pid) for child in host.children()}
    owners = [name.rsplit("_", 1)[1].removesuffix(".db") for name in os.listdir(directory) if name.endswith(".db")]
    assert set(owners) <= live | {"archive"}, sorted(os.listdir(directory))
    assert owners.count("archive") <= len(ARCHIVED_TYPES)


def submit_through_the_api(host: Host) -> None:
    api = re.search(r"API listening on (http://\S+)", host.process.output()).group(1)
    body = json.dumps({"actor": "echo", "args": [1]}).encode()
    request = urllib.request.Request(f"{api}/api/jobs", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        wait_for_state(json.loads(answer.read())["id"], FINISHED)


def kill_and_wait_for_restart(host: Host, victim: psutil.Process) -> None:
    victim.kill()
    wait_for(lambda: victim.pid not in {worker.pid for worker in host.workers()}, 30, f"worker {victim.pid} replaced")


@pytest.mark.parametrize(("mode", "command"), [("distributed", "worker"), ("embedded", "run")], indirect=["mode"])
def test_counters_survive_killed_workers_and_agree_with_the_store(engine_env, start_engine, command):
    engine_env["ENGINE_METRICS_PORT"] = "0"
    host = Host(start_engine(command, "--processes", "2", "--threads", "2"))
    directory = host.metrics_dir()
    run_jobs()
    first = assert_agrees_with_the_store(host)
    assert first[("engine_worker_restarts_total", ())] == 0

    # A worker killed while it runs a job: its attempt is abandoned, its job runs again.
    job = engine.submit("sleepy", 3)
    wait_for_state(job.id, {JobState.RUNNING})
    [running] = [a for a in engine.attempts(job.id) if a.finished_at is None]
    kill_and_wait_for_restart(host, psutil.Process(running.worker_pid))
    assert wait_for_state(job.id, FINISHED, timeout=60).state == JobState.SUCCEEDED
    run_jobs()
    second = assert_agrees_with_the_store(host)
    assert attempts_by_outcome(second)[Outcome.ABANDONED.value] == 1
    assert_no_counter_went_back(first, second)
    assert_only_live_processes_have_files(host, directory)

    # More deaths, each followed by jobs in every process: no file is left behind by the dead.
    for kills in range(2, 5):
        kill_and_wait_for_restart(host, host.workers()[0])
        run_jobs()
        third = assert_agrees_with_the_store(host)
        assert_no_counter_went_back(second, third)
        assert_only_live_processes_have_files(host, directory)
        assert third[("engine_worker_restarts_total", ())] == kills
        second = third

    if command == "run":  # its API process sends jobs: counted by the host
        submit_through_the_api(host)
        enqueued = ("engine_jobs_enqueued_total", (("actor", "echo"), ("queue", "default")))
        wait_for(lambda: host.scrape().get(enqueued) == 1, 10, "the API's job to be counted")

    # A new supervisor starts from a new, empty directory; the old one is gone.
    assert host.process.stop() == 0
    assert not os.path.exists(directory)
    again = Host(start_engine(command, "--processes", "2", "--threads", "2"))
    assert again.metrics_dir() != directory
    assert attempts_by_outcome(again.scrape()) == Counter()

