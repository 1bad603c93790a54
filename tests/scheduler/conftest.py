"""Fixtures of the scheduler's tests: an embedded engine (a SQLite file and its broker) in this
process, with the test actors declared, and a scheduler to run on it."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

import engine
from scheduler.service import Scheduler

from tests.support.processes import point_engine_at, release_engine


@pytest.fixture
def embedded(tmp_path, monkeypatch) -> Iterator[dict[str, str]]:
    side_effects = tmp_path / "side-effects"
    side_effects.mkdir()
    env = {
        "ENGINE_STORE_URL": f"sqlite:///{tmp_path}/engine.db",
        "ENGINE_ACTOR_MODULES": "tests.support.actors",
        "ENGINE_TEST_SIDE_EFFECTS": str(side_effects),
    }
    point_engine_at(env, monkeypatch)
    yield env
    release_engine()


@pytest.fixture
def start_scheduler(embedded) -> Iterator[Callable[[], Scheduler]]:
    """Start schedulers in this process on the embedded engine; all are stopped after the test."""
    started: list[Scheduler] = []

    def start() -> Scheduler:
        scheduler = Scheduler(engine.get_broker(), engine.get_store(), poll_interval_s=0.2)
        scheduler.start()
        started.append(scheduler)
        return scheduler

    yield start
    for scheduler in started:
        scheduler.stop()
