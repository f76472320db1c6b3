"""Backfill windows and the schedule audit, decided purely."""

from datetime import datetime, timedelta, timezone

import pytest

from scheduling.audit import Occurrence, Start, audit, fires_in_window
from scheduling.cron import CronSchedule
from scheduling.errors import InvalidInput
from scheduling.figures import lag_series, percentile
from scheduling.models import FailureClass, TaskStatus

UTC = timezone.utc
T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def run(task_id, attempt, start_s, failure=None):
    return Start(attempt, T0 + timedelta(seconds=start_s), succeeded=failure is None)


def test_a_window_holds_its_start_but_not_its_end():
    every10 = CronSchedule("*/10 * * * *")
    fires = fires_in_window(every10, T0, T0 + timedelta(hours=1), cap=100)
    assert fires == [T0 + timedelta(minutes=10 * i) for i in range(6)]


def test_a_window_beyond_the_cap_is_refused_after_cap_steps():
    every_minute = CronSchedule("* * * * *")
    with pytest.raises(InvalidInput) as refused:
        fires_in_window(every_minute, T0, T0 + timedelta(days=3650), cap=1000)
    assert refused.value.field == "to" and "1000" in refused.value.detail
    with pytest.raises(InvalidInput):
        fires_in_window(every_minute, T0, T0, cap=10)


def test_audit_finds_missed_late_and_duplicated_and_nothing_in_a_healthy_run():
    expected = [T0 + timedelta(minutes=i) for i in range(5)]
    now = T0 + timedelta(minutes=10)
    healthy = [
        Occurrence(i, at, TaskStatus.SUCCEEDED, [run(i, 1, i * 60 + 0.01)])
        for i, at in enumerate(expected)
    ]
    assert audit(expected, healthy, late_after_s=60, now=now).healthy

    found = [
        healthy[0],
        Occurrence(1, expected[1], TaskStatus.SKIPPED),  # the misfire policy skipped it
        # expected[2]: no occurrence at all
        Occurrence(3, expected[3], TaskStatus.SUCCEEDED, [run(3, 1, 180 + 95)]),  # 95 s late
        Occurrence(4, expected[4], TaskStatus.SUCCEEDED, [run(4, 1, 240), run(4, 2, 250)]),
        Occurrence(
            9, T0 + timedelta(seconds=30), TaskStatus.SUCCEEDED, [run(9, 1, 30)]
        ),  # a trigger
    ]
    result = audit(expected, found, late_after_s=60, now=now)
    kinds = [(f.nominal_at, f.kind) for f in result.findings]
    assert kinds == [
        (expected[1], "missed"),
        (expected[2], "missed"),
        (expected[3], "late"),
        (expected[4], "duplicated"),
    ]
    assert result.expected == 5 and result.ran == 3
    assert result.findings[2].lag_s == pytest.approx(95)


def test_a_retry_after_a_failure_is_not_a_duplicate_and_work_on_its_way_is_not_missed():
    at = [T0]
    retried = Occurrence(
        1, T0, TaskStatus.SUCCEEDED, [run(1, 1, 1, FailureClass.EXIT_CODE), run(1, 2, 5)]
    )
    assert audit(at, [retried], late_after_s=60, now=T0 + timedelta(minutes=5)).healthy
    running = Occurrence(1, T0, TaskStatus.RUNNING)
    assert audit(at, [running], late_after_s=60, now=T0 + timedelta(hours=1)).healthy
    waiting = Occurrence(1, T0, TaskStatus.SCHEDULED)
    assert audit(at, [waiting], late_after_s=60, now=T0 + timedelta(seconds=5)).healthy
    stuck = audit(at, [waiting], late_after_s=60, now=T0 + timedelta(minutes=5))
    assert [f.kind for f in stuck.findings] == ["missed"]
    skipped = Occurrence(1, T0, TaskStatus.SKIPPED)  # final: missed at once, not "on its way"
    just_now = audit(at, [skipped], late_after_s=60, now=T0 + timedelta(seconds=5))
    assert [f.kind for f in just_now.findings] == ["missed"]


def test_lag_series_bins_and_percentiles():
    assert percentile([], 50) is None
    assert percentile([5, 1, 3], 50) == 3 and percentile(list(range(1, 101)), 99) == 99
    starts = [(T0 + timedelta(seconds=s), lag) for s, lag in [(10, 2.0), (20, 4.0), (400, 9.0)]]
    bins = lag_series(starts, since=T0, until=T0 + timedelta(minutes=15), bin_s=300)
    assert [(b.fires, b.p50_ms, b.p99_ms) for b in bins] == [
        (2, 2.0, 4.0),
        (1, 9.0, 9.0),
        (0, None, None),
    ]
