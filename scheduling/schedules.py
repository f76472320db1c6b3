"""Schedules: what happens when an occurrence comes due, decided purely.

The shard asks ``plan_occurrence`` inside the transaction that fires the
occurrence, with what that transaction sees (other occurrences in flight or
waiting), so the decision cannot race.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from scheduling.cron import CronSchedule


class MisfirePolicy(str, enum.Enum):
    SKIP = "skip"  # run nothing that was missed; go on from the next future time
    FIRE_ONCE = "fire_once"  # run the latest missed time once (default)
    FIRE_ALL = "fire_all"  # run every missed time within the catch-up window, up to a count


class OverlapPolicy(str, enum.Enum):
    ALLOW = "allow"  # run alongside the previous run
    SKIP = "skip"  # do not run while the previous run is in flight (default)
    BUFFER_ONE = "buffer_one"  # wait for the previous run; at most one waits
    CANCEL_PREVIOUS = "cancel_previous"  # stop the previous run, run this one


@dataclass(frozen=True, kw_only=True)
class NewSchedule:
    owner_id: int
    script_name: str
    cron: str
    timezone: str = "UTC"
    variables: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 3
    timeout_s: float = 300.0
    misfire_policy: MisfirePolicy = MisfirePolicy.FIRE_ONCE
    overlap_policy: OverlapPolicy = OverlapPolicy.SKIP
    jitter_s: float = 0.0  # each occurrence runs up to this much after its time
    start_at: datetime | None = None
    end_at: datetime | None = None
    paused: bool = False

    @property
    def cron_schedule(self) -> CronSchedule:
        return CronSchedule(self.cron, self.timezone)


@dataclass(frozen=True, kw_only=True)
class Schedule(NewSchedule):
    schedule_id: int
    next_fire_at: datetime | None
    missed_fires: int
    skipped_fires: int
    deleted: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, kw_only=True)
class MisfireRules:
    grace_s: float = 30.0  # later than this after its time, an occurrence has misfired
    catch_up_window_s: float = 3600.0  # fire_all looks back no further
    max_catch_up: int = 100  # fire_all runs at most this many


def first_fire(new: NewSchedule, *, now: datetime) -> datetime | None:
    """The first fire after now, or at/after ``start_at`` (inclusive)."""
    if new.start_at and new.start_at > now:
        start = new.start_at - timedelta(microseconds=1)
    else:
        start = now
    return bounded(new, new.cron_schedule.next_after(start))


def bounded(schedule: NewSchedule, at: datetime | None) -> datetime | None:
    if at is None or (schedule.end_at is not None and at > schedule.end_at):
        return None
    return at


def jittered(schedule_id: int, nominal: datetime, jitter_s: float) -> datetime:
    """The run time of an occurrence: its nominal time plus a delay in
    [0, jitter_s) that depends only on (schedule, time), so a re-planned
    occurrence keeps its instant."""
    if jitter_s <= 0:
        return nominal
    digest = hashlib.sha256(f"{schedule_id}:{nominal.isoformat()}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return nominal + timedelta(seconds=fraction * jitter_s)


class Action(str, enum.Enum):
    FIRE = "fire"
    SKIP = "skip"  # recorded as a skipped occurrence
    WAIT = "wait"  # buffered behind the run in flight


@dataclass(frozen=True, kw_only=True)
class OccurrencePlan:
    action: Action
    fire_at: tuple[datetime, ...] = ()  # nominal times to run now: this occurrence's first
    missed: int = 0  # nominal times dropped by the misfire policy
    skipped: int = 0  # dropped by the overlap policy
    cancel_previous: bool = False
    next_fire_at: datetime | None = None  # the occurrence to materialise next


def plan_occurrence(
    schedule: Schedule,
    *,
    nominal: datetime,
    now: datetime,
    in_flight: int,
    waiting_before: int,
    rules: MisfireRules,
    buffered: bool = False,
) -> OccurrencePlan:
    """``in_flight``: other occurrences queued or running; ``waiting_before``:
    other occurrences already buffered (due, not fired); ``buffered``: this
    one waited behind a run on purpose, so it is not a misfire."""
    cron = schedule.cron_schedule
    late = not buffered and (now - nominal).total_seconds() > rules.grace_s
    times = [nominal]
    if late:
        times += cron.fires_between(nominal, now, limit=rules.max_catch_up + 1)
    # On time: the very next nominal time (even if it is due already). Late:
    # the first time after now; what lies between was handled above.
    following = bounded(schedule, cron.next_after(max(now, times[-1]) if late else nominal))

    if schedule.paused or schedule.deleted:
        return OccurrencePlan(action=Action.SKIP, skipped=1, next_fire_at=None)

    if not late:
        fire = [nominal]
        missed = 0
    elif schedule.misfire_policy is MisfirePolicy.SKIP:
        return OccurrencePlan(action=Action.SKIP, missed=len(times), next_fire_at=following)
    elif schedule.misfire_policy is MisfirePolicy.FIRE_ONCE:
        fire = [times[-1]]
        missed = len(times) - 1
    else:
        window_start = now - timedelta(seconds=rules.catch_up_window_s)
        in_window = [t for t in times if t >= window_start][-rules.max_catch_up :]
        fire = in_window or [times[-1]]
        missed = len(times) - len(fire)

    if in_flight:
        policy = schedule.overlap_policy
        if policy is OverlapPolicy.SKIP:
            return OccurrencePlan(
                action=Action.SKIP, skipped=len(fire), missed=missed, next_fire_at=following
            )
        if policy is OverlapPolicy.BUFFER_ONE:
            if waiting_before:
                return OccurrencePlan(
                    action=Action.SKIP, skipped=len(fire), missed=missed, next_fire_at=following
                )
            return OccurrencePlan(
                action=Action.WAIT,
                fire_at=(fire[-1],),
                missed=missed + len(fire) - 1,
                next_fire_at=following,
            )
        if policy is OverlapPolicy.CANCEL_PREVIOUS:
            return OccurrencePlan(
                action=Action.FIRE,
                fire_at=(fire[-1],),
                missed=missed + len(fire) - 1,
                cancel_previous=True,
                next_fire_at=following,
            )
    return OccurrencePlan(
        action=Action.FIRE, fire_at=tuple(fire), missed=missed, next_fire_at=following
    )
