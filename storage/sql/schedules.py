"""Schedules: create and change them, fire their occurrences, and their history.

Firing runs inside the shard's claim transaction: the schedule row is locked
(FOR UPDATE on PostgreSQL; SQLite serialises writers), the policy decision
sees the other occurrences as this transaction does, and the next occurrence
is inserted under UNIQUE(schedule_id, nominal_at), so no race can fire or
create an occurrence twice.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    and_,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from scheduling.audit import Start
from scheduling.errors import ScheduleNotFound, ScriptNotFound
from scheduling.lifecycle import CANCEL, CLAIM, SKIP, STOP
from scheduling.models import TaskStatus
from scheduling.schedules import (
    Action,
    MisfirePolicy,
    MisfireRules,
    NewSchedule,
    OccurrencePlan,
    OverlapPolicy,
    Schedule,
    first_fire,
    jittered,
    plan_occurrence,
)
from scheduling.timeline import bucket_of
from storage.schema import UtcDateTime, newest_script, runs, schedules, scripts, shards, tasks
from storage.sql import rows
from storage.sql.rows import IN_FLIGHT


def live_schedules(owner_id: int) -> list[Any]:
    return [schedules.c.owner_id == owner_id, schedules.c.deleted.is_(False)]


@dataclass
class FireOutcome:
    fired: list[int] = field(default_factory=list)  # task ids now queued
    follow_ups: list[tuple[int, datetime]] = field(default_factory=list)  # occurrences to track
    cancelled: list[tuple[int, int]] = field(default_factory=list)  # (task, attempt) to stop


def schedule_from_row(row: Any) -> Schedule:
    return Schedule(
        schedule_id=row.schedule_id,
        owner_id=row.owner_id,
        script_name=row.script_name,
        cron=row.cron,
        timezone=row.timezone,
        variables=dict(row.variables),
        priority=row.priority,
        max_attempts=row.max_attempts,
        timeout_s=row.timeout_s,
        misfire_policy=MisfirePolicy(row.misfire_policy),
        overlap_policy=OverlapPolicy(row.overlap_policy),
        jitter_s=row.jitter_s,
        start_at=row.start_at,
        end_at=row.end_at,
        paused=row.paused,
        deleted=row.deleted,
        next_fire_at=row.next_fire_at,
        missed_fires=row.missed_fires,
        skipped_fires=row.skipped_fires,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _latest_script_id(conn: Connection, owner_id: int, name: str) -> int:
    script_id = conn.execute(newest_script(owner_id, name, scripts.c.script_id)).scalar()
    if script_id is None:
        raise ScriptNotFound(f"no script named {name!r}", "script")
    return int(script_id)


def insert_occurrence(
    conn: Connection,
    schedule: Schedule,
    nominal: datetime,
    *,
    now: datetime,
    status: TaskStatus = TaskStatus.SCHEDULED,
    **extra: Any,
) -> int | None:
    """One occurrence row; None when it exists already (the unique key)."""
    script_id = _latest_script_id(conn, schedule.owner_id, schedule.script_name)
    values = occurrence_values(
        schedule, nominal, script_id=script_id, now=now, status=status, **extra
    )
    try:
        with conn.begin_nested():
            return int(
                conn.execute(insert(tasks).values(**values).returning(tasks.c.task_id)).scalar_one()
            )
    except IntegrityError:
        return None


def occurrence_values(
    schedule: Schedule,
    nominal: datetime,
    *,
    script_id: int,
    now: datetime,
    status: TaskStatus = TaskStatus.SCHEDULED,
    **extra: Any,
) -> dict[str, Any]:
    values = {
        "owner_id": schedule.owner_id,
        "script_id": script_id,
        "schedule_id": schedule.schedule_id,
        "nominal_at": nominal,
        "execute_at": extra.pop(
            "execute_at", jittered(schedule.schedule_id, nominal, schedule.jitter_s)
        ),
        "status": status.value,
        "priority": schedule.priority,
        "attempt": 1,
        "max_attempts": schedule.max_attempts,
        "variables": dict(schedule.variables),
        "timeout_s": schedule.timeout_s,
        "idempotency_key": None,
        "request_hash": None,
        "buffered": False,
        "lease_expires_at": None,
        "epoch": 0,
        "created_at": now,
        "updated_at": now,
        **extra,
    }
    values.setdefault("bucket", bucket_of(values["execute_at"]))
    return values


def add_schedule(
    conn: Connection, new: NewSchedule, *, now: datetime
) -> tuple[Schedule, tuple[int, datetime] | None]:
    _latest_script_id(conn, new.owner_id, new.script_name)
    nxt = first_fire(new, now=now)
    schedule_id = conn.execute(
        insert(schedules)
        .values(
            owner_id=new.owner_id,
            script_name=new.script_name,
            cron=new.cron,
            timezone=new.timezone,
            variables=dict(new.variables),
            priority=new.priority,
            max_attempts=new.max_attempts,
            timeout_s=new.timeout_s,
            misfire_policy=new.misfire_policy.value,
            overlap_policy=new.overlap_policy.value,
            jitter_s=new.jitter_s,
            start_at=new.start_at,
            end_at=new.end_at,
            paused=new.paused,
            deleted=False,
            next_fire_at=None if new.paused else nxt,
            missed_fires=0,
            skipped_fires=0,
            created_at=now,
            updated_at=now,
        )
        .returning(schedules.c.schedule_id)
    ).scalar_one()
    schedule = get_schedule(conn, schedule_id, owner_id=None)
    if new.paused or nxt is None:
        return schedule, None
    task_id = insert_occurrence(conn, schedule, nxt, now=now)
    return schedule, None if task_id is None else (task_id, nxt)


def get_schedule(
    conn: Connection, schedule_id: int, *, owner_id: int | None, lock: bool = False
) -> Schedule:
    query = select(schedules).where(
        schedules.c.schedule_id == schedule_id, schedules.c.deleted.is_(False)
    )
    if owner_id is not None:
        query = query.where(schedules.c.owner_id == owner_id)
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise ScheduleNotFound(f"no schedule {schedule_id}", "schedule_id")
    return schedule_from_row(row)


def list_schedules(conn: Connection, owner_id: int) -> list[Schedule]:
    found = conn.execute(
        select(schedules).where(*live_schedules(owner_id)).order_by(schedules.c.schedule_id)
    ).all()
    return [schedule_from_row(r) for r in found]


def _cancel_pending(conn: Connection, schedule_id: int, now: datetime) -> None:
    conn.execute(
        update(tasks)
        .where(
            tasks.c.schedule_id == schedule_id,
            tasks.c.status.in_(rows.status_values(CANCEL.source)),
        )
        .values(status=CANCEL.target.value, updated_at=now)
    )


def change_schedule(
    conn: Connection, schedule_id: int, *, owner_id: int, changes: dict[str, Any], now: datetime
) -> tuple[Schedule, tuple[int, datetime] | None]:
    """Apply changes (paused, cron, timezone, …); the pending occurrence is
    replaced by one that follows the new definition."""
    schedule = replace(get_schedule(conn, schedule_id, owner_id=owner_id, lock=True), **changes)
    nxt = None if schedule.paused else first_fire(schedule, now=now)
    schedule = replace(schedule, next_fire_at=nxt, updated_at=now)
    values = {k: (v.value if hasattr(v, "value") else v) for k, v in changes.items()}
    conn.execute(
        update(schedules)
        .where(schedules.c.schedule_id == schedule_id)
        .values(**values, next_fire_at=nxt, updated_at=now)
    )
    _cancel_pending(conn, schedule_id, now)
    if nxt is None:
        return schedule, None
    task_id = insert_occurrence(conn, schedule, nxt, now=now)
    return schedule, (task_id, nxt) if task_id else None


def delete_schedule(conn: Connection, schedule_id: int, *, owner_id: int, now: datetime) -> None:
    get_schedule(conn, schedule_id, owner_id=owner_id, lock=True)
    conn.execute(
        update(schedules)
        .where(schedules.c.schedule_id == schedule_id)
        .values(deleted=True, next_fire_at=None, updated_at=now)
    )
    _cancel_pending(conn, schedule_id, now)


def trigger(
    conn: Connection, schedule_id: int, *, owner_id: int, now: datetime
) -> tuple[int, datetime]:
    """Run now, as an extra occurrence that obeys the overlap policy."""
    schedule = get_schedule(conn, schedule_id, owner_id=owner_id)
    task_id = insert_occurrence(conn, schedule, now, now=now)
    if task_id is None:  # a trigger at this very instant exists
        task_id = conn.execute(
            select(tasks.c.task_id).where(
                tasks.c.schedule_id == schedule_id, tasks.c.nominal_at == now
            )
        ).scalar_one()
    return task_id, now


def backfill(
    conn: Connection,
    schedule_id: int,
    *,
    owner_id: int,
    fires: Sequence[datetime],
    overlap: OverlapPolicy,
    now: datetime,
) -> list[tuple[int, datetime]]:
    """An occurrence for each nominal time that has none, due now; a time
    that has one (run, skipped, or backfilled before) is left alone, so a
    backfill sent twice creates nothing the second time."""
    schedule = get_schedule(conn, schedule_id, owner_id=owner_id, lock=True)
    created = []
    for nominal in fires:
        task_id = insert_occurrence(
            conn, schedule, nominal, now=now, execute_at=now, backfill_overlap=overlap.value
        )
        if task_id is not None:
            created.append((task_id, now))
    return created


def occurrences_between(
    conn: Connection, schedule_ids: Sequence[int], *, start: datetime, end: datetime
) -> tuple[dict[int, list[tuple[int, datetime, TaskStatus]]], dict[int, list[Start]]]:
    """Occurrences of each schedule with a nominal time in [start, end)
    (the unique key's index), and their attempts' starts."""
    if not schedule_ids:
        return {}, {}
    found = conn.execute(
        select(tasks.c.schedule_id, tasks.c.task_id, tasks.c.nominal_at, tasks.c.status).where(
            tasks.c.schedule_id.in_(list(schedule_ids)),
            tasks.c.nominal_at >= start,
            tasks.c.nominal_at < end,
        )
    ).all()
    by_schedule: dict[int, list[tuple[int, datetime, TaskStatus]]] = {}
    for r in found:
        by_schedule.setdefault(r.schedule_id, []).append(
            (r.task_id, r.nominal_at, TaskStatus(r.status))
        )
    starts: dict[int, list[Start]] = {}
    task_ids = [r.task_id for r in found]
    for i in range(0, len(task_ids), 5000):
        for r in conn.execute(
            select(runs.c.task_id, runs.c.attempt, runs.c.started_at, runs.c.failure).where(
                runs.c.task_id.in_(task_ids[i : i + 5000])
            )
        ):
            starts.setdefault(r.task_id, []).append(
                Start(r.attempt, r.started_at, succeeded=r.failure is None)
            )
    return by_schedule, starts


def fire_occurrences(
    conn: Connection,
    task_ids: Sequence[int],
    *,
    shard: int,
    epoch: int,
    lease_until: datetime,
    now: datetime,
    rules: MisfireRules,
) -> FireOutcome:
    outcome = FireOutcome()
    current_epoch = exists().where(shards.c.shard == shard, shards.c.epoch == epoch)
    rest = _fire_on_time(
        conn,
        task_ids,
        current_epoch=current_epoch,
        epoch=epoch,
        lease_until=lease_until,
        now=now,
        rules=rules,
        outcome=outcome,
    )
    for task_id in rest:
        row = conn.execute(
            select(
                tasks.c.schedule_id,
                tasks.c.nominal_at,
                tasks.c.status,
                tasks.c.buffered,
                tasks.c.bucket,
                tasks.c.backfill_overlap,
            ).where(tasks.c.task_id == task_id)
        ).first()
        if row is None or row.status != TaskStatus.SCHEDULED.value:
            continue
        try:
            schedule = get_schedule(conn, row.schedule_id, owner_id=None, lock=True)
        except ScheduleNotFound:
            continue  # deleted: its pending occurrences were cancelled
        backfilled = row.backfill_overlap is not None
        if backfilled:  # asked for on purpose: never a misfire, runs while paused
            schedule = replace(
                schedule, paused=False, overlap_policy=OverlapPolicy(row.backfill_overlap)
            )
        others = and_(tasks.c.schedule_id == schedule.schedule_id, tasks.c.task_id != task_id)
        in_flight = conn.execute(
            select(func.count()).where(others, tasks.c.status.in_(IN_FLIGHT))
        ).scalar_one()
        waiting_before = conn.execute(
            select(func.count()).where(
                others,
                tasks.c.status == TaskStatus.SCHEDULED.value,
                tasks.c.nominal_at < row.nominal_at,
                tasks.c.execute_at <= now,
            )
        ).scalar_one()
        plan = plan_occurrence(
            schedule,
            nominal=row.nominal_at,
            now=now,
            in_flight=in_flight,
            waiting_before=waiting_before,
            rules=rules,
            buffered=row.buffered or backfilled,
        )
        # SKIP and CLAIM both move a scheduled occurrence: one condition serves both
        this = and_(
            tasks.c.task_id == task_id,
            rows.in_status(CLAIM.source),
            current_epoch,
        )
        if plan.action is Action.SKIP:
            if not conn.execute(
                update(tasks).where(this).values(status=SKIP.target.value, updated_at=now)
            ).rowcount:
                continue
        elif plan.action is Action.FIRE:
            if plan.cancel_previous:
                previous = conn.execute(
                    update(tasks)
                    .where(others, tasks.c.status.in_(rows.status_values(STOP.source)))
                    .values(status=STOP.target.value, lease_expires_at=None, updated_at=now)
                    .returning(tasks.c.task_id, tasks.c.attempt)
                ).all()
                outcome.cancelled += [(r.task_id, r.attempt) for r in previous]
            first, *more = plan.fire_at
            claim = {
                "status": CLAIM.target.value,
                "epoch": epoch,
                "lease_expires_at": lease_until,
                "updated_at": now,
            }
            if first != row.nominal_at:  # fire_once after a misfire runs the latest time
                # the bucket stays: the row remains in this shard's ranges, it reports here
                claim.update(nominal_at=first, execute_at=max(first, now))
            try:
                with conn.begin_nested():
                    changed = conn.execute(update(tasks).where(this).values(**claim)).rowcount
            except IntegrityError:  # that time has an occurrence already: run under our own
                for moved in ("nominal_at", "execute_at"):
                    claim.pop(moved, None)
                changed = conn.execute(update(tasks).where(this).values(**claim)).rowcount
            if not changed:
                continue
            outcome.fired.append(task_id)
            for nominal in more:  # fire_all: the other missed times, claimed at once
                extra_id = insert_occurrence(
                    conn,
                    schedule,
                    nominal,
                    now=now,
                    status=TaskStatus.QUEUED,
                    execute_at=max(nominal, now),
                    epoch=epoch,
                    lease_expires_at=lease_until,
                    bucket=row.bucket,  # in this shard's ranges: it reports here
                )
                if extra_id is not None:
                    outcome.fired.append(extra_id)
        else:  # Action.WAIT: stays scheduled, fires when the run in flight ends
            conn.execute(update(tasks).where(this).values(buffered=True, updated_at=now))
        if backfilled:  # beside the plan: it neither moves nor extends it
            if plan.skipped:
                conn.execute(
                    update(schedules)
                    .where(schedules.c.schedule_id == schedule.schedule_id)
                    .values(skipped_fires=schedules.c.skipped_fires + plan.skipped)
                )
            continue
        conn.execute(
            update(schedules)
            .where(schedules.c.schedule_id == schedule.schedule_id)
            .values(
                next_fire_at=plan.next_fire_at,
                missed_fires=schedules.c.missed_fires + plan.missed,
                skipped_fires=schedules.c.skipped_fires + plan.skipped,
                updated_at=now,
            )
        )
        if plan.next_fire_at is not None:
            next_id = insert_occurrence(conn, schedule, plan.next_fire_at, now=now)
            if next_id is not None:
                outcome.follow_ups.append((next_id, plan.next_fire_at))
    return outcome


def _fire_on_time(
    conn: Connection,
    task_ids: Sequence[int],
    *,
    current_epoch: Any,
    epoch: int,
    lease_until: datetime,
    now: datetime,
    rules: MisfireRules,
    outcome: FireOutcome,
) -> list[int]:
    """The common case for the whole batch in a few statements: occurrences
    whose plan is to fire at their own nominal time, one per schedule. Their
    schedules are locked (in id order), the others of each schedule counted
    in one query, and the claims, the schedules' next times and the next
    occurrences each written in one statement. Returns the occurrences left
    to the one-by-one path: anything else (late, buffered, overlapping, a
    backfill, paused, two of one schedule in the batch)."""
    found = conn.execute(
        select(
            tasks.c.task_id,
            tasks.c.schedule_id,
            tasks.c.nominal_at,
            tasks.c.buffered,
            tasks.c.backfill_overlap,
        ).where(
            rows.among(conn, tasks.c.task_id, task_ids),
            tasks.c.status == TaskStatus.SCHEDULED.value,
        )
    ).all()
    per_schedule = Counter(row.schedule_id for row in found)
    found = [r for r in found if per_schedule[r.schedule_id] == 1 and r.backfill_overlap is None]
    if not found:
        return list(task_ids)
    locked = {
        row.schedule_id: schedule_from_row(row)
        for row in conn.execute(
            select(schedules)
            .where(
                rows.among(conn, schedules.c.schedule_id, [r.schedule_id for r in found]),
                schedules.c.deleted.is_(False),
            )
            .order_by(schedules.c.schedule_id)
            .with_for_update()
        )
    }
    # every other occurrence the plan looks at: in flight, or due and waiting
    others: dict[int, list[Any]] = defaultdict(list)
    for other in conn.execute(
        select(tasks.c.task_id, tasks.c.schedule_id, tasks.c.status, tasks.c.nominal_at).where(
            rows.among(conn, tasks.c.schedule_id, list(locked)),
            or_(
                tasks.c.status.in_(IN_FLIGHT),
                and_(tasks.c.status == TaskStatus.SCHEDULED.value, tasks.c.execute_at <= now),
            ),
        )
    ):
        others[other.schedule_id].append(other)
    plans: dict[int, tuple[Schedule, OccurrencePlan]] = {}
    for row in found:
        schedule = locked.get(row.schedule_id)
        if schedule is None or schedule.paused:
            continue
        mine = [o for o in others[row.schedule_id] if o.task_id != row.task_id]
        plan = plan_occurrence(
            schedule,
            nominal=row.nominal_at,
            now=now,
            in_flight=sum(o.status in IN_FLIGHT for o in mine),
            waiting_before=sum(
                o.status == TaskStatus.SCHEDULED.value and o.nominal_at < row.nominal_at
                for o in mine
            ),
            rules=rules,
            buffered=row.buffered,
        )
        if (
            plan.action is Action.FIRE
            and plan.fire_at == (row.nominal_at,)
            and not plan.cancel_previous
        ):
            plans[row.task_id] = (schedule, plan)
    if not plans:
        return list(task_ids)
    claims = rows.rows_of(conn, ("task_id", BigInteger, list(plans)))
    fired = (
        conn.execute(
            update(tasks)
            .where(
                tasks.c.task_id == claims.c.task_id,
                rows.in_status(CLAIM.source),
                current_epoch,
            )
            .values(
                status=CLAIM.target.value, epoch=epoch, lease_expires_at=lease_until, updated_at=now
            )
            .returning(tasks.c.task_id)
        )
        .scalars()
        .all()
    )
    outcome.fired += fired
    moved = [plans[task_id] for task_id in fired]
    if moved:
        advanced = rows.rows_of(
            conn,
            ("schedule_id", BigInteger, [s.schedule_id for s, _ in moved]),
            ("next_fire_at", UtcDateTime, [p.next_fire_at for _, p in moved]),
            ("missed", Integer, [p.missed for _, p in moved]),
            ("skipped", Integer, [p.skipped for _, p in moved]),
        )
        conn.execute(
            update(schedules)
            .where(schedules.c.schedule_id == advanced.c.schedule_id)
            .values(
                next_fire_at=advanced.c.next_fire_at,
                missed_fires=schedules.c.missed_fires + advanced.c.missed,
                skipped_fires=schedules.c.skipped_fires + advanced.c.skipped,
                updated_at=now,
            )
        )
        _insert_next(conn, [(s, p.next_fire_at) for s, p in moved if p.next_fire_at], now, outcome)
    return [t for t in task_ids if t not in plans]


def _insert_next(
    conn: Connection,
    nexts: list[tuple[Schedule, datetime]],
    now: datetime,
    outcome: FireOutcome,
) -> None:
    """The schedules' next occurrences; one that exists already (the unique
    key) is left as it is. One statement on PostgreSQL."""
    if conn.dialect.name != "postgresql":
        for schedule, nominal in nexts:
            next_id = insert_occurrence(conn, schedule, nominal, now=now)
            if next_id is not None:
                outcome.follow_ups.append((next_id, nominal))
        return
    script_ids: dict[tuple[int, str], int] = {}
    values = []
    for schedule, nominal in nexts:
        key = (schedule.owner_id, schedule.script_name)
        if key not in script_ids:
            script_ids[key] = _latest_script_id(conn, *key)
        values.append(occurrence_values(schedule, nominal, script_id=script_ids[key], now=now))
    for chunk in rows.chunks(values):
        inserted = conn.execute(
            postgresql.insert(tasks)
            .values(chunk)
            .on_conflict_do_nothing(
                index_elements=["schedule_id", "nominal_at"],
                index_where=tasks.c.schedule_id.is_not(None),  # the key is a partial index
            )
            .returning(tasks.c.task_id, tasks.c.nominal_at)
        ).all()
        outcome.follow_ups += [(row.task_id, row.nominal_at) for row in inserted]


def waiting_occurrences(
    conn: Connection, schedule_ids: set[int], *, now: datetime
) -> list[tuple[int, datetime]]:
    """Occurrences buffered behind a run that has just ended."""
    if not schedule_ids:
        return []
    rows = conn.execute(
        select(tasks.c.task_id, tasks.c.execute_at).where(
            tasks.c.schedule_id.in_(schedule_ids),
            tasks.c.status == TaskStatus.SCHEDULED.value,
            tasks.c.execute_at <= now,
        )
    ).all()
    return [(r.task_id, r.execute_at) for r in rows]


def schedule_history(
    conn: Connection, schedule_id: int, *, owner_id: int, limit: int
) -> list[dict[str, Any]]:
    """Occurrences newest first, each with its runs: nominal time, status,
    and per attempt start, lag and outcome."""
    get_schedule(conn, schedule_id, owner_id=owner_id)
    found = conn.execute(
        select(tasks.c.task_id, tasks.c.nominal_at, tasks.c.status, tasks.c.attempt)
        .where(tasks.c.schedule_id == schedule_id)
        .order_by(tasks.c.nominal_at.desc())
        .limit(limit)
    ).all()
    by_task = rows.runs_of(conn, [r.task_id for r in found])
    return [
        {
            "task_id": r.task_id,
            "nominal_at": r.nominal_at,
            "status": TaskStatus(r.status),
            "attempt": r.attempt,
            "runs": by_task.get(r.task_id, []),
        }
        for r in found
    ]
