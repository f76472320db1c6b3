"""CRON maths, pure: next fire times of an expression in an IANA zone.

Rules (README "CRON schedules"):
- 5 fields (minute hour day-of-month month day-of-week), or 6 with a leading
  seconds field (``*/2 * * * * *``, as in Quartz/Spring). Aliases @yearly,
  @annually, @monthly, @weekly, @daily, @midnight, @hourly.
- When both day-of-month and day-of-week are restricted, a day matches if
  either does (Vixie cron's OR).
- Times are matched on the zone's wall clock and fired as UTC instants. A
  wall time that does not exist (spring forward) fires once, at the first
  instant after the gap; a wall time that exists twice (fall back) fires once,
  at its first occurrence.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter

from scheduling.clock import require_aware
from scheduling.errors import InvalidInput

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
UTC = timezone.utc
MAX_YEARS_BETWEEN_FIRES = 8  # long enough for Feb 29; "Feb 30" never matches


def zone_of(name: str, field: str = "timezone") -> ZoneInfo:
    try:
        if not name or name != name.strip() or ".." in name:
            raise ValueError
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"unknown IANA time zone {name[:64]!r}", field) from None


@functools.lru_cache(maxsize=4096)
def parsed_expression(expression: str) -> tuple[str, bool]:
    """The expression as croniter reads it and whether it has seconds;
    InvalidInput when croniter refuses it. Cached: pages and audits ask
    for the same few expressions over and over."""
    text = " ".join(expression.split())
    text = ALIASES.get(text.lower(), text)
    count = len(text.split(" "))
    if count not in (5, 6):
        raise InvalidInput("expected 5 fields, or 6 with leading seconds", "cron")
    try:
        croniter(text, datetime(2000, 1, 1), second_at_beginning=count == 6)
    except (CroniterBadCronError, CroniterError, ValueError, KeyError) as exc:
        raise InvalidInput(f"invalid cron expression: {exc}", "cron") from None
    return text, count == 6


@dataclass(frozen=True)
class CronSchedule:
    """An expression bound to a zone; ``next_after`` is the whole API."""

    expression: str
    zone_name: str = "UTC"

    def __post_init__(self) -> None:
        self.zone  # noqa: B018 - validates the zone name
        self._fields()

    @property
    def zone(self) -> ZoneInfo:
        return zone_of(self.zone_name)

    def _fields(self) -> tuple[str, bool]:
        return parsed_expression(self.expression)

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire instant strictly after ``after`` (UTC), or None when
        the expression never matches again."""
        return next(self.instants_after(after), None)

    def instants_after(self, after: datetime) -> Iterator[datetime]:
        """Every fire instant after ``after``, in order, from one walker.
        Wall times are walked after the wall time of ``after``; in a repeated
        hour some map to instants not after the last one, which are skipped.
        croniter gives up after MAX_YEARS_BETWEEN_FIRES without a match."""
        require_aware(after, "after")
        text, seconds = self._fields()
        zone = self.zone
        wall = after.astimezone(zone).replace(tzinfo=None)
        walker = croniter(
            text,
            wall,
            ret_type=datetime,
            second_at_beginning=seconds,
            max_years_between_matches=MAX_YEARS_BETWEEN_FIRES,
        )
        last = after
        while True:
            try:
                candidate = walker.get_next(datetime)
            except CroniterBadDateError:
                return
            instant = wall_to_instant(candidate, zone)
            if instant > last:  # a repeated or skipped hour maps some walls back
                last = instant
                yield instant

    def upcoming(self, after: datetime, count: int) -> list[datetime]:
        return list(itertools.islice(self.instants_after(after), count))

    def fires_between(self, after: datetime, until: datetime, *, limit: int) -> list[datetime]:
        """Fire instants in (after, until], at most ``limit`` (the latest ones
        are kept when there are more)."""
        fires: list[datetime] = []
        for nxt in self.instants_after(after):
            if nxt > until:
                break
            fires.append(nxt)
            if len(fires) > 4 * limit:
                del fires[:-limit]
        return fires[-limit:] if limit else []


def wall_to_instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """A naive wall-clock time in ``zone`` as a UTC instant: the first
    occurrence of an ambiguous time, the end of the gap for a missing one."""
    first = wall.replace(tzinfo=zone, fold=0)
    instant = first.astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) == wall:
        return instant  # exists (fold=0 is its first occurrence when ambiguous)
    # In a gap: fold=1 reads the wall time with the offset after the jump,
    # fold=0 with the one before; the transition lies between the two.
    low = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    high = instant
    if low > high:
        low, high = high, low
    before = low.astimezone(zone).utcoffset()
    while (high - low) > timedelta(seconds=1):
        mid = low + (high - low) / 2
        if mid.astimezone(zone).utcoffset() == before:
            low = mid
        else:
            high = mid
    return high.replace(microsecond=0)


def validate_schedule(
    expression: str, zone_name: str, *, now: datetime, min_interval_s: float
) -> CronSchedule:
    """A schedule must fire at least once more, and not more often than
    ``min_interval_s`` (checked over its next few fires)."""
    schedule = CronSchedule(expression, zone_name)
    fires = schedule.upcoming(now, 6)
    if not fires:
        raise InvalidInput("the expression never fires", "cron")
    gaps = [(b - a).total_seconds() for a, b in zip(fires, fires[1:], strict=False)]
    if gaps and min(gaps) < min_interval_s:
        raise InvalidInput(f"fires more often than every {min_interval_s:g} s", "cron")
    return schedule
