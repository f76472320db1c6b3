"""The console's figures (a user's tasks by status, the queue by priority,
the last hour's starts) and its sign-in sessions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select

from scheduling.models import TaskStatus
from storage.repository import ConsoleSession
from storage.schema import console_sessions, runs, tasks


def status_counts(conn: Connection, owner_id: int) -> dict[str, int]:
    found = conn.execute(
        select(tasks.c.status, func.count())
        .where(tasks.c.owner_id == owner_id)
        .group_by(tasks.c.status)
    ).all()
    counts = {s.value: 0 for s in TaskStatus}
    counts.update({status: n for status, n in found})
    return counts


def queued_by_priority(conn: Connection, owner_id: int) -> dict[int, int]:
    found = conn.execute(
        select(tasks.c.priority, func.count())
        .where(tasks.c.owner_id == owner_id, tasks.c.status == TaskStatus.QUEUED.value)
        .group_by(tasks.c.priority)
        .order_by(tasks.c.priority.desc())
    ).all()
    return {priority: n for priority, n in found}


def recent_starts(
    conn: Connection, owner_id: int, *, since: datetime
) -> list[tuple[datetime, float, str]]:
    """(start, fire lag in ms, tier) of each attempt started since ``since``."""
    found = conn.execute(
        select(runs.c.started_at, runs.c.due_at, runs.c.tier)
        .join(tasks, tasks.c.task_id == runs.c.task_id)
        .where(runs.c.started_at >= since, tasks.c.owner_id == owner_id)
        .order_by(runs.c.started_at)
    ).all()
    return [
        (r.started_at, (r.started_at - r.due_at).total_seconds() * 1000.0, r.tier) for r in found
    ]


def add_session(conn: Connection, session: ConsoleSession) -> None:
    conn.execute(delete(console_sessions).where(console_sessions.c.expires_at < session.created_at))
    conn.execute(insert(console_sessions).values(**session.__dict__))


def get_session(conn: Connection, session_hash: str, *, now: datetime) -> ConsoleSession | None:
    row: Any = conn.execute(
        select(console_sessions).where(
            console_sessions.c.session_hash == session_hash,
            console_sessions.c.expires_at > now,
        )
    ).first()
    return None if row is None else ConsoleSession(**row._mapping)


def end_session(conn: Connection, session_hash: str) -> None:
    conn.execute(delete(console_sessions).where(console_sessions.c.session_hash == session_hash))
