"""The console's figures and sign-in sessions in SQL (SQLite and
PostgreSQL): both backends give the same numbers."""

from datetime import datetime, timedelta, timezone

from sqlalchemy import insert

from scheduling.models import Interpreter, NewTask
from storage.repository import ConsoleSession
from storage.schema import runs

UTC = timezone.utc
T = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def test_lag_figures_per_bin_and_for_the_window(repo):
    owner = repo.ensure_user(first_name="a", last_name="b", now=T)
    other = repo.ensure_user(first_name="c", last_name="d", now=T)
    for who in (owner, other):
        repo.add_script(owner_id=who, name="s.sh", interpreter=Interpreter.BASH, body=b"x", now=T)
    # (owner, seconds after T it started, lag ms)
    plan = [
        (owner, 10, 2.0),
        (owner, 20, 4.0),
        (owner, 30, 6.0),
        (owner, 400, 9.0),
        (other, 15, 500.0),
        (owner, 3700, 1.0),
    ]  # the last is after the window
    results = repo.add_tasks(
        [NewTask(owner_id=who, script_name="s.sh", execute_at=T) for who, _, _ in plan], now=T
    )
    with repo.engine.begin() as conn:
        for result, (_, after_s, lag_ms) in zip(results, plan, strict=True):
            started = T + timedelta(seconds=after_s)
            conn.execute(
                insert(runs).values(
                    task_id=result.task.task_id,
                    attempt=1,
                    priority=0,
                    executor_id="e",
                    tier="small",
                    node_id="n",
                    due_at=started - timedelta(milliseconds=lag_ms),
                    started_at=started,
                    finished_at=started,
                    exit_code=0,
                    output_tail="",
                )
            )
    figures = repo.lag_figures(owner, since=T, until=T + timedelta(hours=1), bin_s=300)
    assert figures.fires == 4
    assert round(figures.p50_ms, 3) == 4.0 and round(figures.p99_ms, 3) == 9.0
    bins = [
        (b.fires, b.p50_ms and round(b.p50_ms, 3), b.p99_ms and round(b.p99_ms, 3))
        for b in figures.series
    ]
    assert len(bins) == 12 and bins[:3] == [(3, 4.0, 6.0), (1, 9.0, 9.0), (0, None, None)]
    counts = repo.task_counts(owner)
    assert counts["scheduled"] == 5 and counts["dead"] == 0


def test_console_sessions_expire_and_end(repo):
    session = ConsoleSession(
        session_hash="a" * 64,
        token_hash="b" * 64,
        admin=False,
        csrf_token="c" * 43,
        created_at=T,
        expires_at=T + timedelta(hours=1),
    )
    repo.add_console_session(session)
    assert repo.console_session("a" * 64, now=T) == session
    assert repo.console_session("a" * 64, now=T + timedelta(hours=2)) is None  # expired
    repo.end_console_session("a" * 64)
    assert repo.console_session("a" * 64, now=T) is None
