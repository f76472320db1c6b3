"""Submissions and queries: the group commit with idempotency, a task and
its runs, pages of tasks, and the user's moves (cancel, redrive)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from typing import cast as typed

from sqlalchemy import Connection, Select, String, cast, delete, insert, literal, select, update

from scheduling.errors import (
    BatchRejected,
    ChronorayError,
    IdempotencyConflict,
    ScriptNotFound,
    TaskNotCancellable,
    TaskNotFound,
    TaskNotRetryable,
)
from scheduling.lifecycle import CANCEL, REDRIVE, after_redrive
from scheduling.models import FINAL_STATUSES, NewTask, SubmitResult, Task, TaskStatus, trusted
from scheduling.timeline import bucket_of
from storage import schema
from storage.repository import TaskQuery
from storage.schema import tasks
from storage.sql import rows, scripts


def add_tasks(
    conn: Connection,
    new_tasks: Sequence[NewTask],
    *,
    now: datetime,
    atomic: bool = False,
    fresh: bool = False,
) -> list[SubmitResult | ChronorayError]:
    """Every valid submission in this transaction. An item that fails on its
    own (unknown script, idempotency conflict) gets its error back; the
    others are stored. ``atomic``: one failure stores nothing and raises
    BatchRejected. A concurrent submission taking an idempotency key fails
    the transaction on the unique key (the caller retries). ``fresh``: the
    request ids were minted for this call, so no replay can have stored
    them and they are not looked up (the unique key still holds)."""
    results: list[SubmitResult | ChronorayError | None] = [None] * len(new_tasks)
    known = scripts.latest(conn, {(t.owner_id, t.script_name) for t in new_tasks})
    stored_requests = {} if fresh else _stored_requests(conn, new_tasks)
    new_rows, row_positions = [], []
    # A second item with the same request (a replay that landed in the same
    # group commit) answers with the first item's outcome.
    first_of: dict[object, int] = {}
    echoes: list[tuple[int, int]] = []
    for i, new in enumerate(new_tasks):
        if new.request_id in stored_requests:
            results[i] = SubmitResult(task=stored_requests[new.request_id], created=False)
            continue
        key = (new.owner_id, new.idempotency_key) if new.idempotency_key else None
        twin = first_of.get(new.request_id, first_of.get(key))
        if twin is not None:
            if new_tasks[twin].request_hash != new.request_hash:
                results[i] = IdempotencyConflict(
                    "idempotency key repeated in one batch with another request",
                    "idempotency_key",
                )
            else:
                echoes.append((i, twin))
            continue
        first_of[new.request_id] = i
        if key is not None:
            first_of[key] = i
        script = known.get((new.owner_id, new.script_name))
        if script is None:
            results[i] = ScriptNotFound(f"no script named {new.script_name!r}", "script")
            continue
        if new.idempotency_key is not None:
            replay = _idempotent_replay(conn, new)
            if replay is not None:
                results[i] = replay
                continue
        new_rows.append(_new_row(new, script_id=script.script_id, now=now))
        row_positions.append(i)
    failures = [(i, r) for i, r in enumerate(results) if isinstance(r, ChronorayError)]
    if atomic and failures:
        raise BatchRejected(failures)  # before any insert: nothing is written
    if new_rows:
        ids = _insert(conn, new_rows)
        for position, row, task_id in zip(row_positions, new_rows, ids, strict=True):
            # what was written, not read back: a second query cost a 1,000-task
            # batch a fifth of its time (contract test: equal to a read)
            task = _as_stored(row, task_id=task_id, script_name=new_tasks[position].script_name)
            results[position] = SubmitResult(task=task, created=True)
    for i, twin in echoes:
        first = results[twin]
        results[i] = (
            SubmitResult(task=first.task, created=False)
            if isinstance(first, SubmitResult)
            else first
        )
    return typed("list[SubmitResult | ChronorayError]", results)  # every position is filled


def _stored_requests(conn: Connection, new_tasks: Sequence[NewTask]) -> dict[str, Task]:
    """Tasks a replay of these submissions stored already (Ray resends a
    call to a restarted shard), by request id."""
    return {
        row.request_id: rows.task(row)
        for row in conn.execute(
            rows.with_script_name(*rows.TASK_COLUMNS).where(
                rows.among(conn, tasks.c.request_id, {t.request_id for t in new_tasks})
            )
        )
    }


def _as_stored(row: dict[str, Any], *, task_id: int, script_name: str) -> Task:
    """The task a new row (``_new_row``) becomes once inserted as ``task_id``.
    Built from the row directly: through ``rows.task`` (a namespace, then
    an attribute read and a copy per field) it was an eighth of the batch
    endpoint's CPU. The contract tests check it equals a read."""
    return trusted(
        Task,
        {
            "task_id": task_id,
            "owner_id": row["owner_id"],
            "script_id": row["script_id"],
            "script_name": script_name,
            "execute_at": row["execute_at"],
            "status": rows.STATUS_OF[row["status"]],
            "priority": row["priority"],
            "attempt": row["attempt"],
            "max_attempts": row["max_attempts"],
            "variables": row["variables"],  # the row's own copy (_new_row)
            "timeout_s": row["timeout_s"],
            "idempotency_key": row["idempotency_key"],
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "lease_expires_at": row["lease_expires_at"],
            "epoch": row["epoch"],
            "schedule_id": row["schedule_id"],
            "nominal_at": row["nominal_at"],
            "lost_count": 0,
        },
    )


# What may differ between new tasks: each goes as an array when it does, as
# one value when a chunk's rows agree on it (dumping an array costs psycopg
# about a microsecond per element). The rest of a new row is the same for all.
_PER_TASK = (
    "owner_id",
    "script_id",
    "execute_at",
    "bucket",
    "priority",
    "max_attempts",
    "variables",
    "timeout_s",
    "idempotency_key",
    "request_hash",
    "request_id",
)


def _insert(conn: Connection, new_rows: list[dict[str, Any]]) -> list[int]:
    """Insert the rows; their task ids, in their order. On PostgreSQL one
    ``INSERT … SELECT FROM unnest(…)`` per thousand rows, whose text does
    not depend on the rows: a multi-row VALUES list was parsed anew by
    psycopg on every execution (half of a 1,000-task batch's time)."""
    if conn.dialect.name != "postgresql":
        returned = conn.execute(
            insert(tasks).returning(tasks.c.task_id, sort_by_parameter_order=True), new_rows
        )
        return list(returned.scalars().all())
    ids_of: dict[str, int] = {}
    for chunk in rows.chunks(new_rows):
        first = chunk[0]
        values = {name: [r[name] for r in chunk] for name in first}  # each column once
        if values["nominal_at"] != values["execute_at"]:
            raise ValueError("a new task's nominal_at is its execute_at")
        same = [  # request_id never: each row's own, it matches ids to rows
            n
            for n in first
            if n not in ("nominal_at", "request_id") and values[n].count(first[n]) == len(chunk)
        ]
        if differing := [n for n in first if n not in same and n not in (*_PER_TASK, "nominal_at")]:
            raise ValueError(f"per-task columns missing from _PER_TASK: {differing}")
        varying = [name for name in _PER_TASK if name not in same]
        given = rows.rows_of(
            conn,
            *(
                ("variables", String, [json.dumps(v) for v in values["variables"]])  # cast below
                if name == "variables"
                else (name, tasks.c[name].type, values[name])
                for name in varying
            ),
        )
        selected = [
            cast(given.c.variables, tasks.c.variables.type)
            if name == "variables"
            else given.c[name]
            for name in varying
        ]
        selected += [literal(first[name], tasks.c[name].type) for name in same]
        nominal_at = selected[[*varying, *same].index("execute_at")]
        inserted = conn.execute(
            insert(tasks)
            .from_select(
                [*varying, *same, "nominal_at"], select(*selected, nominal_at.label("nominal_at"))
            )
            .returning(tasks.c.request_id, tasks.c.task_id)
        )
        ids_of.update((request_id, task_id) for request_id, task_id in inserted.all())
    return [ids_of[r["request_id"]] for r in new_rows]


def _new_row(new: NewTask, *, script_id: int, now: datetime) -> dict[str, Any]:
    return {
        "owner_id": new.owner_id,
        "script_id": script_id,
        "schedule_id": None,
        "nominal_at": new.execute_at,
        "buffered": False,
        "execute_at": new.execute_at,
        "bucket": bucket_of(new.execute_at),
        "status": TaskStatus.SCHEDULED.value,
        "priority": new.priority,
        "attempt": 1,
        "max_attempts": new.max_attempts,
        "variables": dict(new.variables),
        "timeout_s": new.timeout_s,
        "idempotency_key": new.idempotency_key,
        "request_hash": new.request_hash,
        "request_id": new.request_id,
        "lease_expires_at": None,
        "epoch": 0,
        "created_at": now,
        "updated_at": now,
    }


def _idempotent_replay(conn: Connection, new: NewTask) -> SubmitResult | ChronorayError | None:
    row = conn.execute(
        rows.with_script_name(*rows.TASK_COLUMNS).where(
            tasks.c.owner_id == new.owner_id, tasks.c.idempotency_key == new.idempotency_key
        )
    ).first()
    if row is None:
        return None
    if row.request_hash != new.request_hash:
        return IdempotencyConflict(
            "idempotency key already used with a different request", "idempotency_key"
        )
    return SubmitResult(task=rows.task(row), created=False)


def get_task(conn: Connection, task_id: int, *, owner_id: int | None) -> Task:
    query = rows.with_script_name(*rows.TASK_COLUMNS).where(tasks.c.task_id == task_id)
    if owner_id is not None:
        query = query.where(tasks.c.owner_id == owner_id)
    row = conn.execute(query).first()
    if row is None:
        raise TaskNotFound(f"no task {task_id}", "task_id")
    return rows.task(row)


def list_tasks(conn: Connection, query: TaskQuery) -> list[Task]:
    return [rows.task(row) for row in conn.execute(list_query(query)).all()]


def list_query(query: TaskQuery) -> Select[Any]:
    """A page of one user's tasks, newest first (ix_tasks_owner_task)."""
    conditions = [tasks.c.owner_id == query.owner_id]
    if query.statuses:
        conditions.append(tasks.c.status.in_(sorted(s.value for s in query.statuses)))
    if query.script_name is not None:
        conditions.append(schema.scripts.c.name == query.script_name)
    if query.schedule_id is not None:
        conditions.append(tasks.c.schedule_id == query.schedule_id)
    if query.due_from is not None:
        conditions.append(tasks.c.execute_at >= query.due_from)
    if query.due_before is not None:
        conditions.append(tasks.c.execute_at < query.due_before)
    if query.below_id is not None:
        conditions.append(tasks.c.task_id < query.below_id)
    page: Select[Any] = (
        rows.with_script_name(*rows.TASK_COLUMNS)
        .where(*conditions)
        .order_by(tasks.c.task_id.desc())
        .limit(query.limit)
    )
    return page


def cancel_task(conn: Connection, task_id: int, *, owner_id: int | None, now: datetime) -> Task:
    """Cancel a task that has not fired; cancelling a cancelled task again is
    answered with it."""
    task = get_task(conn, task_id, owner_id=owner_id)
    if task.status is CANCEL.target:
        return task
    changed = conn.execute(
        update(tasks)
        .where(tasks.c.task_id == task_id, rows.in_status(CANCEL.source))
        .values(status=CANCEL.target.value, updated_at=now)
    ).rowcount
    if not changed:
        raise TaskNotCancellable(
            f"task {task_id} is {task.status.value}; only scheduled tasks can be cancelled",
            "task_id",
        )
    return get_task(conn, task_id, owner_id=owner_id)


def redrive(
    conn: Connection, task_id: int, *, owner_id: int | None, attempts: int, now: datetime
) -> Task:
    """Give a dead task ``attempts`` more attempts (``after_redrive``)."""
    task = get_task(conn, task_id, owner_id=owner_id)
    outcome = after_redrive(
        attempt=task.attempt, attempts=attempts, priority=task.priority, now=now
    )
    changed = conn.execute(
        update(tasks)
        .where(
            tasks.c.task_id == task_id,
            tasks.c.attempt == task.attempt,
            rows.in_status(REDRIVE.source),
        )
        .values(
            status=outcome.status.value,
            attempt=outcome.attempt,
            max_attempts=outcome.max_attempts,
            execute_at=outcome.execute_at,
            bucket=bucket_of(now),
            lease_expires_at=None,
            updated_at=now,
        )
    ).rowcount
    if not changed:
        raise TaskNotRetryable(
            f"task {task_id} is {task.status.value}; only dead tasks can be retried", "task_id"
        )
    return get_task(conn, task_id, owner_id=owner_id)


def purge_finished(conn: Connection, *, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` finished tasks, with their runs, that were due
    and last changed before ``before``; the rows are locked without waiting
    (a row someone holds is left for the next batch). Scans the
    (status, bucket) index."""
    finished = rows.status_values(FINAL_STATUSES)
    ids = list(
        conn.execute(
            select(tasks.c.task_id)
            .where(
                tasks.c.status.in_(finished),
                tasks.c.bucket < bucket_of(before),
                tasks.c.updated_at < before,
            )
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars()
    )
    if not ids:
        return 0
    conn.execute(delete(schema.runs).where(schema.runs.c.task_id.in_(ids)))
    return int(
        conn.execute(
            delete(tasks).where(tasks.c.task_id.in_(ids), rows.in_status(FINAL_STATUSES))
        ).rowcount
    )
