"""Misfire and overlap decisions for one due occurrence, with explicit time."""

from datetime import datetime, timedelta, timezone

import pytest

from scheduling.schedules import (
    Action,
    MisfirePolicy,
    MisfireRules,
    OverlapPolicy,
    Schedule,
    first_fire,
    plan_occurrence,
)

UTC = timezone.utc
T = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a whole minute
RULES = MisfireRules(grace_s=30, catch_up_window_s=120, max_catch_up=2)


def schedule(**kw):
    fields = dict(
        schedule_id=1,
        owner_id=1,
        script_name="s",
        cron="* * * * *",
        next_fire_at=T,
        missed_fires=0,
        skipped_fires=0,
        deleted=False,
        created_at=T,
        updated_at=T,
    )
    fields.update(kw)
    return Schedule(**fields)


def plan(sched, *, late_s=0.0, in_flight=0, waiting_before=0):
    return plan_occurrence(
        sched,
        nominal=T,
        now=T + timedelta(seconds=late_s),
        in_flight=in_flight,
        waiting_before=waiting_before,
        rules=RULES,
    )


def minutes(*offsets):
    return tuple(T + timedelta(minutes=m) for m in offsets)


@pytest.mark.parametrize(
    "policy, action, fire_at, missed, next_fire",
    [
        # on time (within grace): this occurrence, next is the following minute
        (MisfirePolicy.FIRE_ONCE, Action.FIRE, minutes(0), 0, 1),
        (MisfirePolicy.SKIP, Action.FIRE, minutes(0), 0, 1),
        (MisfirePolicy.FIRE_ALL, Action.FIRE, minutes(0), 0, 1),
    ],
)
def test_on_time(policy, action, fire_at, missed, next_fire):
    result = plan(schedule(misfire_policy=policy), late_s=20)
    assert (result.action, result.fire_at, result.missed) == (action, fire_at, missed)
    assert result.next_fire_at == T + timedelta(minutes=next_fire)


@pytest.mark.parametrize(
    "policy, action, fire_at, missed",
    [
        # 3.5 minutes down: 12:00, 12:01, 12:02, 12:03 were all missed
        (MisfirePolicy.SKIP, Action.SKIP, (), 4),
        (MisfirePolicy.FIRE_ONCE, Action.FIRE, minutes(3), 3),
        # window 120 s reaches back to 12:01:30, at most 2: 12:02 and 12:03
        (MisfirePolicy.FIRE_ALL, Action.FIRE, minutes(2, 3), 2),
    ],
)
def test_after_downtime(policy, action, fire_at, missed):
    result = plan(schedule(misfire_policy=policy), late_s=210)
    assert (result.action, result.fire_at, result.missed) == (action, fire_at, missed)
    assert result.next_fire_at == T + timedelta(minutes=4)


@pytest.mark.parametrize(
    "policy, in_flight, waiting, action, cancel, skipped",
    [
        (OverlapPolicy.ALLOW, 1, 0, Action.FIRE, False, 0),
        (OverlapPolicy.SKIP, 1, 0, Action.SKIP, False, 1),
        (OverlapPolicy.BUFFER_ONE, 1, 0, Action.WAIT, False, 0),
        (OverlapPolicy.BUFFER_ONE, 1, 1, Action.SKIP, False, 1),
        (OverlapPolicy.CANCEL_PREVIOUS, 1, 0, Action.FIRE, True, 0),
        (OverlapPolicy.SKIP, 0, 0, Action.FIRE, False, 0),
    ],
)
def test_overlap(policy, in_flight, waiting, action, cancel, skipped):
    result = plan(schedule(overlap_policy=policy), in_flight=in_flight, waiting_before=waiting)
    assert (result.action, result.cancel_previous, result.skipped) == (action, cancel, skipped)


def test_paused_and_bounded_schedules():
    assert plan(schedule(paused=True)).action is Action.SKIP
    assert plan(schedule(end_at=T + timedelta(seconds=30))).next_fire_at is None
    assert first_fire(schedule(start_at=T + timedelta(hours=1)), now=T) == T + timedelta(hours=1)
    assert first_fire(schedule(end_at=T - timedelta(hours=1)), now=T) is None
