"""The console's figures (a user's tasks by status, the queue by priority,
the last hour's starts) and its sign-in sessions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, tuple_

from scheduling import figures
from scheduling.figures import LagFigures
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


def lag_figures(
    conn: Connection, owner_id: int, *, since: datetime, until: datetime, bin_s: float
) -> LagFigures:
    """Attempts started in [since, until): count, lag p50/p99, and per bin.
    PostgreSQL aggregates (a dozen rows come back, not every start);
    elsewhere the starts are read and figured in Python."""
    window = [runs.c.started_at >= since, runs.c.started_at < until, tasks.c.owner_id == owner_id]
    joined = runs.join(tasks, tasks.c.task_id == runs.c.task_id)
    if conn.dialect.name != "postgresql":
        found = conn.execute(
            select(runs.c.started_at, runs.c.due_at).select_from(joined).where(*window)
        ).all()
        starts = [(r.started_at, (r.started_at - r.due_at).total_seconds() * 1000) for r in found]
        return figures.lag_figures(starts, since=since, until=until, bin_s=bin_s)
    # date_part is double precision (extract is numeric: several times slower)
    lag_ms = func.date_part("epoch", runs.c.started_at - runs.c.due_at) * 1000
    bin_of = func.floor(func.date_part("epoch", runs.c.started_at - since) / bin_s).label("bin")

    def p(q: float) -> Any:
        return func.percentile_disc(q).within_group(lag_ms)

    by_bin: dict[int | None, tuple[int, float | None, float | None]] = {}
    for r in conn.execute(  # each bin and, as bin NULL, the whole window
        select(bin_of, func.count().label("n"), p(0.5).label("p50"), p(0.99).label("p99"))
        .select_from(joined)
        .where(*window)
        .group_by(func.grouping_sets(bin_of, tuple_()))
    ):
        by_bin[None if r.bin is None else int(r.bin)] = (int(r.n), r.p50, r.p99)
    empty = (0, None, None)
    series = [
        figures.LagBin(start, *by_bin.get(i, empty))
        for i, start in enumerate(figures.bin_starts(since, until, bin_s))
    ]
    return figures.LagFigures(*by_bin.get(None, empty), series=series)


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
