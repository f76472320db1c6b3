"""Backfill windows and the schedule audit, decided purely: the expression
says which nominal times a window holds; the audit compares them with the
occurrences that were stored and the runs they had."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from scheduling.cron import CronSchedule
from scheduling.errors import InvalidInput
from scheduling.models import TaskStatus

ONE_TICK = timedelta(microseconds=1)


def fires_in_window(
    cron: CronSchedule, start: datetime, end: datetime, *, cap: int, field_name: str = "to"
) -> list[datetime]:
    """The nominal times in [start, end); more than ``cap`` is an
    InvalidInput (422) found after ``cap + 1`` steps, whatever the window."""
    if end <= start:
        raise InvalidInput("the window ends before it starts", field_name)
    fires: list[datetime] = []
    for at in cron.instants_after(start - ONE_TICK):
        if at >= end:
            break
        fires.append(at)
        if len(fires) > cap:
            raise InvalidInput(
                f"the window holds more than {cap} fire times; narrow it", field_name
            )
    return fires


@dataclass(frozen=True)
class Start:
    """What the audit needs of an attempt: when it started and whether it
    succeeded (not its output)."""

    attempt: int
    started_at: datetime | None
    succeeded: bool


@dataclass(frozen=True)
class Occurrence:
    """What storage holds for one nominal time of a schedule."""

    task_id: int
    nominal_at: datetime
    status: TaskStatus
    runs: Sequence[Start] = ()


@dataclass(frozen=True)
class AuditFinding:
    nominal_at: datetime
    kind: str  # missed | late | duplicated
    task_id: int | None = None
    lag_s: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class Audit:
    expected: int
    ran: int
    findings: list[AuditFinding] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    @property
    def healthy(self) -> bool:
        return not self.findings


def first_start(runs: Iterable[Start]) -> datetime | None:
    starts = [r.started_at for r in runs if r.started_at is not None]
    return min(starts) if starts else None


def audit(
    expected: Sequence[datetime],
    occurrences: Sequence[Occurrence],
    *,
    late_after_s: float,
    now: datetime,
) -> Audit:
    """Each expected time against its occurrence: missed (no occurrence, or
    one skipped or cancelled, or one still waiting long after its time),
    late (its first start more than ``late_after_s`` after the time),
    duplicated (started again after an attempt that succeeded, or two
    occurrences at one time). Occurrences at other times (triggers) are
    neither expected nor findings."""
    by_time: dict[datetime, list[Occurrence]] = {}
    for occ in occurrences:
        by_time.setdefault(occ.nominal_at, []).append(occ)
    findings: list[AuditFinding] = []
    ran = 0
    for at in expected:
        found = by_time.get(at, [])
        started = [o for o in found if first_start(o.runs) is not None]
        in_flight = [o for o in found if o.status in (TaskStatus.QUEUED, TaskStatus.RUNNING)]
        if started:
            ran += 1
        if len(started) > 1:
            findings.append(
                AuditFinding(at, "duplicated", started[1].task_id, detail="two occurrences started")
            )
        for occ in started:
            successes = sorted(
                (r for r in occ.runs if r.succeeded and r.started_at is not None),
                key=lambda r: r.attempt,
            )
            later = [r for r in occ.runs if successes and r.attempt > successes[0].attempt]
            if len(successes) > 1 or later:
                findings.append(
                    AuditFinding(
                        at, "duplicated", occ.task_id, detail="started again after success"
                    )
                )
        if not started:
            due_soon = (now - at).total_seconds() <= late_after_s
            waiting = [o for o in found if o.status is TaskStatus.SCHEDULED]
            if in_flight or (due_soon and waiting):
                continue  # on its way
            status = found[0].status.value if found else "no occurrence"
            findings.append(
                AuditFinding(at, "missed", found[0].task_id if found else None, detail=status)
            )
            continue
        start = first_start(started[0].runs)
        assert start is not None
        lag_s = (start - at).total_seconds()
        if lag_s > late_after_s:
            findings.append(AuditFinding(at, "late", started[0].task_id, lag_s=lag_s))
    return Audit(expected=len(expected), ran=ran, findings=findings)
