"""generate_report as a job: recent jobs counted per state and per actor, written as JSON."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from sqlalchemy import update

import engine
from engine import JobState, Outcome
from engine.store.schema import jobs
from engine.settings import get_settings


@pytest.fixture(autouse=True)
def generate_report(declare):
    return declare("actors.generate_report").generate_report


@pytest.fixture
def output_dir_setting(tmp_path, monkeypatch):
    """ENGINE_OUTPUT_DIR pointing into tmp_path, read afresh by get_settings()."""
    monkeypatch.setenv("ENGINE_OUTPUT_DIR", str(tmp_path / "engine-output"))
    get_settings.cache_clear()
    yield tmp_path / "engine-output"
    get_settings.cache_clear()


def test_the_report_counts_recent_jobs_per_state_and_actor(tmp_path, store, wait_done):
    # given jobs of two actors, one failing, and a job created two days ago
    @engine.actor
    def ok(seconds):
        time.sleep(seconds)

    @engine.actor(max_retries=0)
    def boom():
        raise ValueError("boom")

    old = engine.submit("ok", 0)
    for seconds in (0, 0, 0.2):
        engine.submit("ok", seconds)
    failed = engine.submit("boom")
    wait_done()
    with store.transaction() as connection:
        connection.execute(update(jobs).where(jobs.c.id == old.id).values(created_at=time.time() - 2 * 86_400))

    # when a report of the last 24 hours is generated
    job = engine.submit("generate_report", hours=24, output_dir=str(tmp_path / "out"))
    wait_done()

    # then it is written where asked, leaves out the old job, and counts the report job itself as running
    assert engine.get(job.id).state == JobState.SUCCEEDED
    result = engine.result(job.id)
    path = Path(result["path"])
    assert path.parent == tmp_path / "out"
    assert re.fullmatch(r"report-\d{8}T\d{6}\.\d{6}Z\.json", path.name)
    report = json.loads(path.read_text())
    assert result["totals"] == report["totals"] == {
        "scheduled": 0,
        "queued": 0,
        "running": 1,
        "succeeded": 3,
        "failed": 1,
        "canceled": 0,
    }
    assert report["hours"] == 24
    actors = report["actors"]
    assert set(actors) == {"ok", "boom", "generate_report"}
    assert {key: actors["ok"][key] for key in ("count", "succeeded", "failed", "failure_rate")} == {
        "count": 3,
        "succeeded": 3,
        "failed": 0,
        "failure_rate": 0.0,
    }
    # nearest rank over 3 attempts: p50 is a quick one, p95 the 0.2 s one
    assert actors["ok"]["duration_ms"]["p50"] < 150 and actors["ok"]["duration_ms"]["p95"] >= 200
    assert (actors["boom"]["failed"], actors["boom"]["failure_rate"]) == (1, 1.0)
    assert actors["boom"]["duration_ms"]["p50"] == engine.attempts(failed.id)[0].duration_ms
    # the running report has no finished job and no ended attempt yet
    assert actors["generate_report"] == {
        "count": 1,
        "succeeded": 0,
        "failed": 0,
        "failure_rate": None,
        "duration_ms": {"p50": None, "p95": None},
    }
    done = engine.get(job.id)
    assert done.progress_percent == 100.0 and done.progress_message == f"report written to {path}"
    assert not list(path.parent.glob("*.partial"))


def test_by_default_reports_go_under_the_output_dir_setting(output_dir_setting, wait_done):
    first = engine.submit("generate_report")
    second = engine.submit("generate_report")
    wait_done()

    paths = {Path(engine.result(job.id)["path"]) for job in (first, second)}
    assert {path.parent for path in paths} == {output_dir_setting / "reports"}
    assert len(paths) == 2  # named to the microsecond: two reports do not overwrite each other
    assert all(path.is_file() for path in paths)


@pytest.mark.parametrize("hours", [0, -1])
def test_a_window_that_is_not_positive_fails_at_once(hours, tmp_path, wait_done):
    job = engine.submit("generate_report", hours=hours, output_dir=str(tmp_path))
    wait_done()

    failed = engine.get(job.id)
    assert failed.state == JobState.FAILED and "hours must be a positive number" in failed.last_error
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.FAILED]
    assert not list(tmp_path.glob("report-*"))
