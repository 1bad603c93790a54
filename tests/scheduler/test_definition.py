"""A schedule is checked when it is defined: each bad field is refused with its reason."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from scheduler.definition import InvalidSchedule, Schedule

GOOD = {"name": "nightly-report", "actor": "echo", "cron": "0 3 * * *"}


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("name", "Nightly Report", "a-z, 0-9"),
        ("name", "x" * 101, "1 to 100"),
        ("name", "", "1 to 100"),
        ("actor", "no_such_actor", "unknown actor 'no_such_actor'; known actors: echo"),
        ("cron", "0 3 * *", "expected 5 fields"),
        ("cron", "61 3 * * *", "higher than the maximum value (59)"),
        ("cron", "0 3 * * 9", "day of week '9'"),
        ("cron", "every day", "expected 5 fields"),
        ("timezone", "Europe/Atlantis", "unknown time zone 'Europe/Atlantis'"),
        ("args", [object()], "must be JSON values"),
        ("kwargs", {"at": datetime.now()}, "must be JSON values"),
        ("kwargs", {"ratio": float("nan")}, "must be JSON values"),
        ("misfire", "twice", "'once' or 'skip'"),
        ("misfire_grace_s", -1, "greater than or equal to 0"),
        ("priority", 11, "less than or equal to 10"),
        ("every", "day", "unknown field"),
    ],
    ids=lambda value: str(value)[:20],
)
def test_a_bad_field_is_refused_naming_it_and_why(field, value, reason):
    with pytest.raises(InvalidSchedule) as refused:
        Schedule.define(known_actors=["echo"], **{**GOOD, field: value})
    assert refused.value.field == field
    assert reason in refused.value.reason
    assert str(refused.value).startswith(f"schedule {refused.value.name!r}: {field}: ")


def test_the_actor_is_checked_only_against_the_actors_given():
    assert Schedule.define(**{**GOOD, "actor": "defined_elsewhere"}).actor == "defined_elsewhere"


def test_weekdays_are_numbered_as_in_cron_sunday_first():
    # APScheduler 3 numbers weekdays from Monday; cron users mean Sunday by 0 and 7.
    after = datetime(2025, 6, 1, 12, tzinfo=timezone.utc)  # a Sunday, after 03:00
    for cron, expected_weekday in (("0 3 * * 0", "Sunday"), ("0 3 * * 7", "Sunday"), ("0 3 * * 1", "Monday")):
        [first] = Schedule.define(**{**GOOD, "cron": cron}).next_fire_times(1, after=after)
        assert first.strftime("%A") == expected_weekday
    weekdays = Schedule.define(**{**GOOD, "cron": "0 3 * * 1-5"}).next_fire_times(5, after=after)
    assert [each.strftime("%a") for each in weekdays] == ["Mon", "Tue", "Wed", "Thu", "Fri"]


def test_six_fields_put_seconds_first():
    times = Schedule.define(**{**GOOD, "cron": "*/15 * * * * *"}).next_fire_times(3, after=datetime(2025, 1, 1, tzinfo=timezone.utc))
    assert [each.second for each in times] == [15, 30, 45]


def _utc(schedule: Schedule, after: datetime, count: int) -> list[str]:
    return [each.astimezone(timezone.utc).strftime("%m-%d %H:%M") for each in schedule.next_fire_times(count, after=after)]


def test_berlin_spring_forward_fires_a_gap_time_an_hour_later_by_the_clock():
    # 2025-03-30: 02:00 CET becomes 03:00 CEST, so 02:30 does not exist that day. By hand:
    # 29th 02:30 CET = 01:30 UTC; 30th the gap time fires at 01:30 UTC (03:30 CEST); 31st
    # 02:30 CEST = 00:30 UTC.
    daily = Schedule.define(**{**GOOD, "cron": "30 2 * * *", "timezone": "Europe/Berlin"})
    assert _utc(daily, datetime(2025, 3, 29, tzinfo=timezone.utc), 3) == ["03-29 01:30", "03-30 01:30", "03-31 00:30"]


def test_berlin_fall_back_fires_a_repeated_time_twice():
    # 2025-10-26: 03:00 CEST becomes 02:00 CET, so 02:30 comes twice: 00:30 and 01:30 UTC.
    daily = Schedule.define(**{**GOOD, "cron": "30 2 * * *", "timezone": "Europe/Berlin"})
    assert _utc(daily, datetime(2025, 10, 25, 12, tzinfo=timezone.utc), 3) == ["10-26 00:30", "10-26 01:30", "10-27 01:30"]


def test_new_york_hourly_across_both_transitions():
    hourly = Schedule.define(**{**GOOD, "cron": "0 * * * *", "timezone": "America/New_York"})
    # 2025-03-09 02:00 EST -> 03:00 EDT: 01:00 EST (06:00 UTC), then 03:00 EDT (07:00 UTC),
    # the 02:00 of the gap fired at that same instant, once.
    assert _utc(hourly, datetime(2025, 3, 9, 5, 30, tzinfo=timezone.utc), 3) == ["03-09 06:00", "03-09 07:00", "03-09 08:00"]
    # 2025-11-02 02:00 EDT -> 01:00 EST: 01:00 comes twice (05:00 and 06:00 UTC).
    assert _utc(hourly, datetime(2025, 11, 2, 4, 30, tzinfo=timezone.utc), 3) == ["11-02 05:00", "11-02 06:00", "11-02 07:00"]


def test_a_nine_am_schedule_follows_the_zone_offset_change():
    # 09:00 in New York is 14:00 UTC in winter (EST) and 13:00 UTC in summer (EDT).
    morning = Schedule.define(**{**GOOD, "cron": "0 9 * * *", "timezone": "America/New_York"})
    assert _utc(morning, datetime(2025, 3, 8, tzinfo=timezone.utc), 2) == ["03-08 14:00", "03-09 13:00"]
