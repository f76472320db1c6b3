"""The shard's work: incarnations (epochs), due tasks, the fenced claim, the
start gate, results, and the sweeps that hand over what was not handed over.

Each status change applies a move decided in ``scheduling.lifecycle`` and is
conditional on what the writer believes (status, attempt, epoch), so a stale
writer changes nothing and a replayed call is harmless."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    String,
    and_,
    bindparam,
    exists,
    insert,
    select,
    update,
)

from scheduling.errors import Unavailable
from scheduling.lifecycle import (
    CLAIM,
    RESULT_SOURCE,
    START,
    SUCCEED,
    RetryPolicy,
    after_attempt,
    may_have_started,
    running_lease,
)
from scheduling.models import RunResult, TaskSpec, TaskStatus
from scheduling.schedules import MisfireRules
from scheduling.tiers import TierTable
from scheduling.timeline import Wheel, bucket_of
from storage.repository import Claimed, OutcomeHook
from storage.schema import UtcDateTime, runs, shards, tasks
from storage.sql import rows, schedules

log = logging.getLogger(__name__)

# The start gate moves an attempt once, so a result is decided again at
# most once; a third round is slack.
RESULT_ROUNDS = 3


def start_shard(conn: Connection, shard: int, *, now: datetime) -> int:
    """A new incarnation's epoch. Two incarnations inserting the first row
    race on the key (the caller retries)."""
    epoch = conn.execute(
        update(shards)
        .where(shards.c.shard == shard)
        .values(epoch=shards.c.epoch + 1, started_at=now)
        .returning(shards.c.epoch)
    ).scalar()
    if epoch is None:
        conn.execute(insert(shards).values(shard=shard, epoch=1, started_at=now))
        return 1
    return int(epoch)


def shard_epoch(conn: Connection, shard: int) -> int | None:
    """The newest incarnation's epoch: an owner holding an older one has
    been superseded and claims nothing."""
    epoch = conn.execute(select(shards.c.epoch).where(shards.c.shard == shard)).scalar()
    return None if epoch is None else int(epoch)


def _owned_by(wheel: Wheel, shard: int) -> Any:
    """``Wheel.owner_in_bucket`` in SQL."""
    range_ = tasks.c.bucket // wheel.range_s
    if wheel.slices > 1:
        range_ = range_ + tasks.c.task_id % wheel.slices
    return range_ % wheel.num_shards == shard


def due_tasks(
    conn: Connection, *, wheel: Wheel, shard: int, before: datetime, limit: int
) -> list[tuple[int, datetime]]:
    found = conn.execute(
        select(tasks.c.task_id, tasks.c.execute_at)
        .where(
            tasks.c.status.in_(rows.status_values(CLAIM.source)),
            tasks.c.bucket <= bucket_of(before),
            tasks.c.execute_at <= before,
            _owned_by(wheel, shard),
        )
        .order_by(tasks.c.execute_at)
        .limit(limit)
    ).all()
    return [(row.task_id, row.execute_at) for row in found]


def claim(
    conn: Connection,
    task_ids: Sequence[int],
    *,
    shard: int,
    epoch: int,
    lease_until: datetime,
    now: datetime,
    rules: MisfireRules,
) -> Claimed:
    """The CLAIM move, fenced by the shard's epoch: a superseded incarnation
    claims nothing. One-shot tasks in one conditional update that returns
    their specs; schedule occurrences one by one under their policies."""
    if not task_ids:
        return Claimed([])
    # One-shot tasks (the bulk) are claimed and returned as specs in one
    # statement; only what it left may be a schedule occurrence.
    moved = conn.execute(
        rows.prebuilt(conn, _claim_one_shot),
        {
            "ids": list(task_ids),
            "claim_shard": shard,
            "claim_epoch": epoch,
            "lease_until": lease_until,
            "now": now,
        },
    ).all()
    # SQLite's RETURNING cannot carry the script's columns (rows.SPEC_RETURNING)
    claimed = (
        moved
        if conn.dialect.name == "postgresql"
        else _spec_rows(conn, [row.task_id for row in moved])
    )
    fired = schedules.FireOutcome()
    left = set(task_ids).difference(row.task_id for row in claimed)
    occurrence_ids = (
        sorted(
            conn.execute(
                select(tasks.c.task_id).where(
                    rows.among(conn, tasks.c.task_id, left), tasks.c.schedule_id.is_not(None)
                )
            ).scalars()
        )
        if left
        else []
    )
    if occurrence_ids:
        fired = schedules.fire_occurrences(
            conn,
            occurrence_ids,
            shard=shard,
            epoch=epoch,
            lease_until=lease_until,
            now=now,
            rules=rules,
        )
    found = [*claimed, *_spec_rows(conn, fired.fired)]
    found.sort(key=lambda row: row.execute_at)
    return Claimed(
        [rows.spec(row, shard=shard) for row in found], fired.follow_ups, fired.cancelled
    )


def _spec_rows(conn: Connection, ids: Sequence[int]) -> Sequence[Any]:
    """The rows ``rows.spec`` maps, of these tasks."""
    if not ids:
        return []
    return conn.execute(
        rows.with_script_name(*rows.SPEC_COLUMNS).where(rows.among(conn, tasks.c.task_id, ids))
    ).all()


def _claim_one_shot(dialect: str) -> Any:
    current_epoch = exists().where(
        shards.c.shard == bindparam("claim_shard"), shards.c.epoch == bindparam("claim_epoch")
    )
    return (
        update(tasks)
        .where(
            rows.among_bound(dialect, tasks.c.task_id, "ids"),
            tasks.c.schedule_id.is_(None),
            rows.in_status(CLAIM.source),
            current_epoch,
        )
        .values(
            status=CLAIM.target.value,
            epoch=bindparam("claim_epoch"),
            lease_expires_at=bindparam("lease_until", type_=UtcDateTime),
            updated_at=bindparam("now", type_=UtcDateTime),
        )
        .returning(*(rows.SPEC_RETURNING if dialect == "postgresql" else [tasks.c.task_id]))
    )


def mark_running(
    conn: Connection, specs: Sequence[TaskSpec], *, lease_grace_s: float, now: datetime
) -> list[tuple[int, int]]:
    """The start gate: the START move for exactly these (task, attempt,
    epoch), in one statement. Returns the attempts that moved; any other
    attempt belongs to someone else (a newer attempt, a cancel) and its
    script must not start."""
    started: list[tuple[int, int]] = []
    unique = {(spec.task_id, spec.attempt, spec.epoch): spec for spec in specs}
    for chunk in rows.chunks(list(unique.values())):
        leases = [running_lease(spec, lease_grace_s=lease_grace_s, now=now) for spec in chunk]
        moved = rows.execute_with_rows(conn, _start_gate, _gate_rows(chunk, leases), {"now": now})
        moved_keys = {(row.task_id, row.attempt) for row in moved}
        started += [key for key in dict.fromkeys(s.key for s in chunk) if key in moved_keys]
    return started


def gate_is_one_statement(dialect: str, specs: Sequence[TaskSpec]) -> bool:
    """Whether ``mark_running`` of these is a single statement (then it
    needs no transaction around it): one chunk on PostgreSQL."""
    return dialect == "postgresql" and len(specs) <= rows.CHUNK


def _gate_rows(
    specs: Sequence[TaskSpec], leases: list[datetime]
) -> list[tuple[str, Any, list[Any]]]:
    return [
        ("task_id", BigInteger, [spec.task_id for spec in specs]),
        ("attempt", Integer, [spec.attempt for spec in specs]),
        ("epoch", Integer, [spec.epoch for spec in specs]),
        ("lease", UtcDateTime, leases),
    ]


def warm_up(conn: Connection, *, now: datetime) -> None:
    """Build the run path's writes (the start gate, a success, another
    result) and run each once on no rows: an executor's first runs then
    start and end without paying for it (a new executor's first start gate
    and result took 30-150 ms each, while its runs' lead is 50 ms). On
    PostgreSQL: elsewhere the statements are built per call."""
    if conn.dialect.name != "postgresql":
        return
    rows.execute_with_rows(conn, _start_gate, _gate_rows([], []), {"now": now})
    rows.execute_with_rows(conn, _success_write, _success_rows([]), {"now": now})
    rows.execute_with_rows(conn, _result_write, _result_rows([]), {"now": now})


def _same_attempt(given: Any) -> tuple[Any, ...]:
    """The rows of ``given``'s attempts: the same task, attempt and epoch."""
    return (
        tasks.c.task_id == given.c.task_id,
        tasks.c.attempt == given.c.attempt,
        tasks.c.epoch == given.c.epoch,
    )


def _start_gate(gate: Any) -> Any:
    return (
        update(tasks)
        .where(*_same_attempt(gate), rows.in_status(START.source))
        .values(
            status=START.target.value,
            lease_expires_at=gate.c.lease,
            updated_at=bindparam("now", type_=UtcDateTime),
        )
        .returning(tasks.c.task_id, tasks.c.attempt)
    )


def record_results(
    conn: Connection,
    results: Sequence[RunResult],
    *,
    policy: RetryPolicy,
    now: datetime,
    tiers: TierTable | None = None,
    on_outcome: OutcomeHook | None = None,
) -> list[tuple[int, datetime]]:
    """Apply each attempt's outcome (``after_attempt``) where the row still
    matches it (attempt, epoch, in flight), in one statement, and log the
    runs in another. Returns what to watch next: tasks put back for a retry,
    and schedule occurrences that were waiting for a run that has now ended.

    Two results for one task (a late report of an earlier attempt beside
    the current one's) go in successive statements, in the order given, as
    they would one by one."""
    watch: list[tuple[int, datetime]] = []
    ended_schedules: set[int] = set()
    rounds: list[list[RunResult]] = []
    seen: dict[int, int] = {}
    for result in results:
        turn = seen.get(result.task_id, 0)
        seen[result.task_id] = turn + 1
        if turn == len(rounds):
            rounds.append([])
        rounds[turn].append(result)
    for one_per_task in rounds:
        for chunk in rows.chunks(one_per_task):
            # A decision holds only for the status it was made from: the
            # start gate may commit between the read and the write, and a
            # loss read as "queued" (free) is then a loss after the start.
            # Those are decided again from the row as it is now; the gate
            # moves an attempt once, so a second round is the most it takes.
            undecided = chunk
            for _ in range(RESULT_ROUNDS):
                undecided = _apply_results(
                    conn,
                    undecided,
                    policy=policy,
                    now=now,
                    tiers=tiers,
                    on_outcome=on_outcome,
                    watch=watch,
                    ended_schedules=ended_schedules,
                )
                if not undecided:
                    break
            else:  # rows that keep moving under the write: the caller retries later
                raise Unavailable(f"{len(undecided)} results overtaken {RESULT_ROUNDS} times")
    return watch + schedules.waiting_occurrences(conn, ended_schedules, now=now)


def results_are_one_statement(dialect: str, results: Sequence[RunResult]) -> bool:
    """Whether ``record_results`` of these writes in a single statement
    (then it needs no transaction around it): on PostgreSQL, successes of
    distinct tasks in one chunk go in ``_record_successes``' one statement;
    what may follow it only reads (``waiting_occurrences``)."""
    return (
        dialect == "postgresql"
        and len(results) <= rows.CHUNK
        and all(r.succeeded for r in results)
        and len({r.task_id for r in results}) == len(results)
    )


def _apply_results(
    conn: Connection,
    results: list[RunResult],
    *,
    policy: RetryPolicy,
    now: datetime,
    tiers: TierTable | None,
    on_outcome: OutcomeHook | None,
    watch: list[tuple[int, datetime]],
    ended_schedules: set[int],
) -> list[RunResult]:
    """Results of distinct tasks: on PostgreSQL the successes in one
    statement of their own (``_record_successes``); the rest read, decided,
    then one UPDATE for all and one INSERT of their runs. Returns the
    results whose task changed status between this read and the write while
    still on their attempt: to be decided again."""
    if conn.dialect.name == "postgresql":
        successes = [r for r in results if r.succeeded]
        if successes:
            _record_successes(
                conn, successes, now=now, on_outcome=on_outcome, ended=ended_schedules
            )
            results = [r for r in results if not r.succeeded]
            if not results:
                return []
    current = {
        row.task_id: row
        for row in conn.execute(
            select(
                tasks.c.task_id,
                tasks.c.status,
                tasks.c.attempt,
                tasks.c.epoch,
                tasks.c.max_attempts,
                tasks.c.schedule_id,
                tasks.c.lost_count,
                tasks.c.execute_at,
                tasks.c.bucket,
            ).where(tasks.c.task_id.in_([r.task_id for r in results]))
        )
    }
    decided = []
    for result in results:
        row = current.get(result.task_id)
        if row is None:
            continue
        outcome = after_attempt(
            attempt=result.attempt,
            max_attempts=row.max_attempts,
            priority=result.priority,
            failure=result.failure,
            policy=policy,
            now=now,
            lost_count=row.lost_count,
            tiers=tiers,
            started=may_have_started(result, TaskStatus(row.status)),
        )
        decided.append((result, outcome, row))
    if not decided:
        return []
    applied = _result_rows(decided)
    changed = {
        row.task_id for row in rows.execute_with_rows(conn, _result_write, applied, {"now": now})
    }
    run_rows = []
    overtaken = []
    for result, outcome, row in decided:
        if result.task_id not in changed and _was_current(
            result, attempt=row.attempt, epoch=row.epoch, status=row.status
        ):
            overtaken.append(result)
            continue
        if result.task_id not in changed:
            log.info(
                "stale result ignored",
                extra={"task_id": result.task_id, "attempt": result.attempt},
            )
            continue
        run_rows.append(rows.run_values(result))
        if on_outcome is not None:
            on_outcome(result, outcome.status, row.schedule_id)
        if outcome.status is TaskStatus.SCHEDULED and outcome.execute_at is not None:
            watch.append((result.task_id, outcome.execute_at))
        elif row.schedule_id is not None:
            ended_schedules.add(row.schedule_id)
    if run_rows:
        conn.execute(insert(runs), run_rows)
    return overtaken


def _result_rows(decided: list[tuple[RunResult, Any, Any]]) -> list[tuple[str, Any, list[Any]]]:
    """The result write's arrays for (result, its outcome, its row as read)."""
    # a retry moves; anything else keeps its time and bucket (which a
    # catch-up occurrence keeps in its claiming shard's range)
    due = [o.execute_at or row.execute_at for _, o, row in decided]
    buckets = [bucket_of(o.execute_at) if o.execute_at else row.bucket for _, o, row in decided]
    return [
        ("task_id", BigInteger, [r.task_id for r, _, _ in decided]),
        ("attempt", Integer, [r.attempt for r, _, _ in decided]),
        ("epoch", Integer, [r.epoch for r, _, _ in decided]),
        ("seen", String, [row.status for _, _, row in decided]),
        ("status", String, [o.status.value for _, o, _ in decided]),
        ("next_attempt", Integer, [o.attempt for _, o, _ in decided]),
        ("priority", Integer, [o.priority for _, o, _ in decided]),
        ("max_attempts", Integer, [o.max_attempts for _, o, _ in decided]),
        ("lost_count", Integer, [o.lost_count for _, o, _ in decided]),
        ("execute_at", UtcDateTime, due),
        ("bucket", BigInteger, buckets),
    ]


def _record_successes(
    conn: Connection,
    results: list[RunResult],
    *,
    now: datetime,
    on_outcome: OutcomeHook | None,
    ended: set[int],
) -> None:
    """Successes of distinct tasks in one statement that moves their rows
    and logs their runs: ``SUCCEED`` needs no read of the row, so a burst's
    results cost one round trip instead of a read, a write and an insert."""
    schedule_of = {
        row.task_id: row.schedule_id
        for row in rows.execute_with_rows(
            conn, _success_write, _success_rows(results), {"now": now}
        )
    }
    for result in results:
        if result.task_id not in schedule_of:
            log.info(
                "stale result ignored", extra={"task_id": result.task_id, "attempt": result.attempt}
            )
            continue
        if on_outcome is not None:
            on_outcome(result, SUCCEED.target, schedule_of[result.task_id])
        if schedule_of[result.task_id] is not None:
            ended.add(schedule_of[result.task_id])


# A runs row's columns as array parameters (``rows.run_values``'s keys).
_RUN_ARRAYS = [(column.name, column.type) for column in runs.c if column.name != "run_id"]


def _success_rows(results: list[RunResult]) -> list[tuple[str, Any, list[Any]]]:
    logged = [rows.run_values(result) for result in results]
    return [("epoch", Integer, [r.epoch for r in results])] + [
        (name, kind, [row[name] for row in logged]) for name, kind in _RUN_ARRAYS
    ]


def _success_write(given: Any) -> Any:
    done = (
        update(tasks)
        .where(*_same_attempt(given), rows.in_status(SUCCEED.source))
        .values(
            status=SUCCEED.target.value,
            priority=given.c.priority,
            lease_expires_at=None,
            updated_at=bindparam("now", type_=UtcDateTime),
        )
        .returning(tasks.c.task_id, tasks.c.attempt, tasks.c.schedule_id)
        .cte("done")
    )
    names = [name for name, _ in _RUN_ARRAYS]
    logged = (
        insert(runs)
        .from_select(
            names,
            select(*(given.c[name] for name in names)).join(
                done, and_(done.c.task_id == given.c.task_id, done.c.attempt == given.c.attempt)
            ),
        )
        .cte("logged")
    )
    return select(done.c.task_id, done.c.schedule_id).add_cte(logged)


def _result_write(applied: Any) -> Any:
    return (
        update(tasks)
        .where(
            *_same_attempt(applied),
            rows.in_status(RESULT_SOURCE),
            # the status the outcome was decided from
            rows.unindexed_status() == applied.c.seen,
        )
        .values(
            status=applied.c.status,
            attempt=applied.c.next_attempt,
            priority=applied.c.priority,
            max_attempts=applied.c.max_attempts,
            lost_count=applied.c.lost_count,
            execute_at=applied.c.execute_at,
            bucket=applied.c.bucket,
            lease_expires_at=None,
            updated_at=bindparam("now", type_=UtcDateTime),
        )
        .returning(tasks.c.task_id)
    )


def _was_current(result: RunResult, *, attempt: int, epoch: int, status: str) -> bool:
    """The task was on this result's attempt when read: if the write missed
    it, its status moved in between (a start gate), not its attempt."""
    return (
        attempt == result.attempt and epoch == result.epoch and TaskStatus(status) in RESULT_SOURCE
    )


def stale_queued(
    conn: Connection,
    *,
    wheel: Wheel,
    shard: int,
    now: datetime,
    lease_until: datetime,
    limit: int,
) -> list[TaskSpec]:
    """Queued attempts whose queue lease ran out (a hand-over that did not
    arrive, or a task still waiting for a slot): lease them again and
    return them, to be handed over again. No attempt is used: the
    dispatcher ignores one it holds, and the start gate lets one start."""
    stale = and_(
        tasks.c.status == TaskStatus.QUEUED.value,
        tasks.c.lease_expires_at < now,
        _owned_by(wheel, shard),
    )
    # Only what is handed over is leased again: the rest stays stale for the next sweep.
    chosen = select(tasks.c.task_id).where(stale).limit(limit).scalar_subquery()
    ids = (
        conn.execute(
            update(tasks)
            .where(tasks.c.task_id.in_(chosen), stale)
            .values(lease_expires_at=lease_until)
            .returning(tasks.c.task_id)
        )
        .scalars()
        .all()
    )
    return specs(conn, tasks.c.task_id.in_(ids), wheel) if ids else []


def queued_specs(conn: Connection, *, wheel: Wheel, shard: int, limit: int) -> list[TaskSpec]:
    return specs(
        conn,
        and_(tasks.c.status == TaskStatus.QUEUED.value, _owned_by(wheel, shard)),
        wheel,
        limit=limit,
    )


def long_queued(
    conn: Connection, *, wheel: Wheel, lease_ends_before: datetime, limit: int
) -> list[TaskSpec]:
    """Queued attempts, on any shard, whose queue lease ends before
    ``lease_ends_before``: leased long ago (by the index on status and
    lease), the oldest first. What a dispatcher compares with what it and
    its executors hold."""
    return specs(
        conn,
        and_(
            tasks.c.status == TaskStatus.QUEUED.value,
            tasks.c.lease_expires_at < lease_ends_before,
        ),
        wheel,
        limit=limit,
    )


def running_specs(conn: Connection, *, wheel: Wheel, limit: int) -> list[TaskSpec]:
    """Every attempt the database says is running, on any shard: what a
    dispatcher compares with what executors hold."""
    return specs(conn, tasks.c.status == TaskStatus.RUNNING.value, wheel, limit=limit)


def specs(
    conn: Connection, where: Any, wheel: Wheel, *, limit: int | None = None
) -> list[TaskSpec]:
    found = conn.execute(
        rows.with_script_name(*rows.SPEC_COLUMNS)
        .where(where)
        .order_by(tasks.c.execute_at)
        .limit(limit)
    ).all()
    return [rows.spec(row, shard=wheel.owner_in_bucket(row.task_id, row.bucket)) for row in found]
