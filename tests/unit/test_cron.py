"""CRON maths: a table over time zones and DST changes, validation."""

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from scheduling.cron import CronSchedule, validate_schedule, wall_to_instant
from scheduling.errors import InvalidInput

UTC = timezone.utc


def walls(expression, zone, after_utc, count):
    schedule = CronSchedule(expression, zone)
    return [
        f.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S%z")
        for f in schedule.upcoming(after_utc, count)
    ]


@pytest.mark.parametrize(
    "expression, zone, after, expected",
    [
        # spring forward: 02:30 does not exist that day; it fires once at the gap's end
        (
            "30 2 * * *",
            "Europe/Berlin",
            datetime(2026, 3, 28, 12, tzinfo=UTC),
            ["2026-03-29 03:00:00+0200", "2026-03-30 02:30:00+0200"],
        ),
        (
            "30 2 * * *",
            "America/New_York",
            datetime(2026, 3, 7, 12, tzinfo=UTC),
            ["2026-03-08 03:00:00-0400", "2026-03-09 02:30:00-0400"],
        ),
        (
            "30 2 * * *",
            "Australia/Sydney",
            datetime(2026, 10, 3, 0, tzinfo=UTC),
            ["2026-10-04 03:00:00+1100", "2026-10-05 02:30:00+1100"],
        ),
        # every quarter of the missing hour collapses into one fire
        (
            "*/15 2 * * *",
            "Europe/Berlin",
            datetime(2026, 3, 28, 23, tzinfo=UTC),
            ["2026-03-29 03:00:00+0200", "2026-03-30 02:00:00+0200"],
        ),
        # fall back: the repeated 02:30 fires once, at its first occurrence
        (
            "30 2 * * *",
            "Europe/Berlin",
            datetime(2026, 10, 24, 12, tzinfo=UTC),
            ["2026-10-25 02:30:00+0200", "2026-10-26 02:30:00+0100"],
        ),
        (
            "30 1 * * *",
            "America/New_York",
            datetime(2026, 10, 31, 12, tzinfo=UTC),
            ["2026-11-01 01:30:00-0400", "2026-11-02 01:30:00-0500"],
        ),
        (
            "30 2 * * *",
            "Australia/Sydney",
            datetime(2026, 4, 4, 0, tzinfo=UTC),
            ["2026-04-05 02:30:00+1100", "2026-04-06 02:30:00+1000"],
        ),
        # zones whose clocks change at midnight: 00:00 does not exist / exists twice
        (
            "0 0 * * *",
            "America/Santiago",
            datetime(2026, 9, 5, 12, tzinfo=UTC),
            ["2026-09-06 01:00:00-0300", "2026-09-07 00:00:00-0300"],
        ),
        (
            "0 0 * * *",
            "America/Santiago",
            datetime(2026, 4, 3, 12, tzinfo=UTC),
            ["2026-04-04 00:00:00-0300", "2026-04-05 00:00:00-0400"],
        ),
        # no DST at all
        (
            "0 0 * * *",
            "Asia/Kolkata",
            datetime(2026, 3, 28, 12, tzinfo=UTC),
            ["2026-03-29 00:00:00+0530", "2026-03-30 00:00:00+0530"],
        ),
        (
            "30 2 * * *",
            "Asia/Kolkata",
            datetime(2026, 10, 24, 12, tzinfo=UTC),
            ["2026-10-25 02:30:00+0530", "2026-10-26 02:30:00+0530"],
        ),
    ],
)
def test_daily_fires_across_dst(expression, zone, after, expected):
    assert walls(expression, zone, after, 2) == expected


@pytest.mark.parametrize(
    "zone, after, day",
    [
        ("Europe/Berlin", datetime(2026, 10, 24, 20, tzinfo=UTC), "2026-10-25"),
        ("America/New_York", datetime(2026, 10, 31, 22, tzinfo=UTC), "2026-11-01"),
        ("Australia/Sydney", datetime(2026, 4, 4, 10, tzinfo=UTC), "2026-04-05"),
        ("America/Santiago", datetime(2026, 4, 4, 0, tzinfo=UTC), "2026-04-04"),
    ],
)
def test_hourly_across_fall_back_fires_each_wall_hour_once(zone, after, day):
    fires = CronSchedule("0 * * * *", zone).upcoming(after, 30)
    local = [f.astimezone(ZoneInfo(zone)) for f in fires]
    hours_that_day = [t.hour for t in local if t.strftime("%Y-%m-%d") == day]
    assert hours_that_day == sorted(set(hours_that_day))  # none twice
    assert set(range(min(hours_that_day), max(hours_that_day) + 1)) == set(
        hours_that_day
    )  # none skipped
    assert fires == sorted(set(fires))


@pytest.mark.parametrize(
    "zone, after, day, missing_hour",
    [
        ("Europe/Berlin", datetime(2026, 3, 28, 20, tzinfo=UTC), "2026-03-29", 2),
        ("America/New_York", datetime(2026, 3, 7, 22, tzinfo=UTC), "2026-03-08", 2),
        ("Australia/Sydney", datetime(2026, 10, 3, 10, tzinfo=UTC), "2026-10-04", 2),
    ],
)
def test_hourly_across_spring_forward_skips_only_the_hour_that_does_not_exist(
    zone, after, day, missing_hour
):
    fires = CronSchedule("0 * * * *", zone).upcoming(after, 30)
    hours = [
        f.astimezone(ZoneInfo(zone)).hour
        for f in fires
        if f.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d") == day
    ]
    assert missing_hour not in hours and hours == sorted(set(hours))
    assert len(fires) == len(set(fires))


def test_seconds_field_aliases_and_day_or():
    after = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert [f.second for f in CronSchedule("*/2 * * * * *").upcoming(after, 3)] == [2, 4, 6]
    assert CronSchedule("@hourly").next_after(after) == after + timedelta(hours=1)
    assert CronSchedule("@daily", "Asia/Kolkata").next_after(after) == datetime(
        2026, 3, 1, 18, 30, tzinfo=UTC
    )
    # day 13 OR a Friday: 2026-03-06 is a Friday before the 13th
    assert CronSchedule("0 0 13 * 5").next_after(after) == datetime(2026, 3, 6, tzinfo=UTC)


def test_never_and_rare():
    after = datetime(2026, 3, 1, tzinfo=UTC)
    assert CronSchedule("0 0 30 2 *").next_after(after) is None
    assert CronSchedule("0 0 29 2 *").next_after(after) == datetime(2028, 2, 29, tzinfo=UTC)


@pytest.mark.parametrize(
    "expression, zone, field",
    [
        ("0 0 30 2 *", "UTC", "cron"),
        ("61 * * * *", "UTC", "cron"),
        ("* * *", "UTC", "cron"),
        ("not a cron", "UTC", "cron"),
        ("0 * * * *", "Mars/Olympus", "timezone"),
        ("0 * * * *", "../etc/passwd", "timezone"),
        ("* * * * * *", "UTC", "cron"),  # every second: below the minimum interval
    ],
)
def test_validation_names_the_field(expression, zone, field):
    with pytest.raises(InvalidInput) as error:
        validate_schedule(expression, zone, now=datetime(2026, 3, 1, tzinfo=UTC), min_interval_s=2)
    assert error.value.field == field


def test_wall_to_instant_in_a_half_hour_dst_zone():
    zone = ZoneInfo("Australia/Lord_Howe")  # moves by 30 minutes
    assert wall_to_instant(datetime(2026, 10, 4, 2, 15), zone) == datetime(
        2026, 10, 3, 15, 30, tzinfo=UTC
    )
