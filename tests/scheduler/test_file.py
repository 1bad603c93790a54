"""The schedules file, the built-in retention schedule and the ledger's retention."""

from __future__ import annotations

import pytest

import engine
from engine.errors import ConfigError
from engine.settings import Settings
from scheduler.__main__ import RETENTION_SCHEDULE, apply_configured_schedules
from scheduler.definition import Origin
from scheduler.ledger import FireOutcome, Ledger

ACTORS = ["echo", "purge_jobs"]


def _apply(tmp_path, text: str, **settings) -> Ledger:
    path = tmp_path / "schedules.toml"
    path.write_text(text)
    ledger = Ledger(engine.get_store())
    apply_configured_schedules(ledger, Settings(schedules_file=path, **settings), ACTORS)
    return ledger


def test_the_file_owns_its_schedules_and_a_removed_one_is_deleted(embedded, tmp_path):
    engine.set_schedule("from-api", "echo", "0 * * * *")
    ledger = _apply(tmp_path, '[schedules.a]\nactor = "echo"\ncron = "0 3 * * *"\n[schedules.b]\nactor = "echo"\ncron = "5 3 * * *"\n')
    assert {each.schedule.name: each.origin for each in ledger.list()} == {
        "a": Origin.FILE, "b": Origin.FILE, "from-api": Origin.API, RETENTION_SCHEDULE: Origin.BUILTIN,
    }  # fmt: skip
    _apply(tmp_path, '[schedules.a]\nactor = "echo"\ncron = "0 4 * * *"\n')
    assert {each.schedule.name: each.schedule.cron for each in ledger.list()} == {
        "a": "0 4 * * *", "from-api": "0 * * * *", RETENTION_SCHEDULE: "17 3 * * *",
    }  # fmt: skip


def test_a_file_with_a_bad_entry_is_refused_whole_naming_each(embedded, tmp_path):
    text = (
        '[schedules.good]\nactor = "echo"\ncron = "0 3 * * *"\n'
        '[schedules.typo]\nactor = "ecco"\ncron = "0 3 * * *"\n'
        '[schedules.zone]\nactor = "echo"\ncron = "0 3 * * *"\ntimezone = "Mars/Olympus"\n'
    )
    with pytest.raises(ConfigError) as refused:
        _apply(tmp_path, text)
    assert "2 bad schedule(s), nothing applied" in str(refused.value)
    assert "schedule 'typo': actor: unknown actor 'ecco'" in str(refused.value)
    assert "schedule 'zone': timezone: unknown time zone 'Mars/Olympus'" in str(refused.value)
    assert engine.list_schedules() == []


def test_a_file_that_is_not_toml_is_refused(embedded, tmp_path):
    with pytest.raises(ConfigError, match="ENGINE_SCHEDULES_FILE"):
        _apply(tmp_path, "[schedules.a\n")


def test_retention_is_scheduled_by_default_and_zero_turns_it_off(embedded, tmp_path):
    ledger = _apply(tmp_path, "")
    [retention] = ledger.list()
    assert (retention.schedule.actor, retention.schedule.kwargs) == ("purge_jobs", {"older_than_days": 30})
    _apply(tmp_path, "", retention_days=0)
    assert ledger.list() == []


def test_the_ledger_is_trimmed_but_keeps_each_schedule_latest_fire(embedded):
    ledger = Ledger(engine.get_store())
    with ledger.store.transaction() as connection:
        for name, fire_time in (("a", 100.0), ("a", 200.0), ("a", 300.0), ("b", 100.0)):
            ledger.claim(connection, name, fire_time, FireOutcome.MISSED)
    assert ledger.purge_fires(older_than=1000.0) == 2
    assert ledger.last_fire_times() == {"a": 300.0, "b": 100.0}
