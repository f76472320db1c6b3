"""Does a long history slow the run path? The shards' queries (due tasks,
claim) and the API's list queries, timed with no finished rows and again
after 10 million finished tasks (each with its run) are loaded for the same
user, in the same command; and what one retention batch costs then.

Each figure is the median of ``--repeat`` rounds; in each round, fresh
tasks due in 30 s are added (``--active``), found, claimed in batches of
100, and listed, then removed again.

    .venv/bin/python -m bench.history --database-url postgresql://... [--rows 10000000]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from sqlalchemy import create_engine, delete, func, select, text

from chronoray.settings import Settings
from scheduling.models import FINAL_STATUSES, Interpreter, NewTask, TaskStatus
from scheduling.timeline import BUCKET_S
from storage.engines import make_engine
from storage.migrate import upgrade
from storage.repository import TaskQuery
from storage.schema import tasks
from storage.sql import SqlTaskRepository

UTC = timezone.utc


def timed_ms(call: Callable[[], object], times: int = 1) -> float:
    """Median wall time of ``times`` calls."""
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def one_round(repo: SqlTaskRepository, owner: int, active: int) -> dict[str, float]:
    wheel = Settings(database_url="unused").wheel
    now = datetime.now(UTC)
    due = now + timedelta(seconds=30)
    new = [NewTask(owner_id=owner, script_name="bench.sh", execute_at=due) for _ in range(active)]
    repo.add_tasks(new, now=now)
    shard = wheel.shard_of(due)
    figures: dict[str, float] = {}
    found: list[tuple[int, datetime]] = []

    def find() -> None:
        found[:] = repo.due_tasks(wheel=wheel, shard=shard, before=due, limit=50_000)

    figures["due tasks (the shard's timer load)"] = timed_ms(find, 5)
    ids = [task_id for task_id, _ in found]
    epoch = repo.start_shard(shard, now=now)
    claims = []
    for at in range(0, len(ids), 100):
        chunk = ids[at : at + 100]
        claims.append(
            timed_ms(
                lambda chunk=chunk: repo.claim(
                    chunk, shard=shard, epoch=epoch, lease_until=due, now=due
                )
            )
        )
    figures["claim, 100 tasks"] = statistics.median(claims)
    figures["list: the user's newest 100"] = timed_ms(
        lambda: repo.list_tasks(TaskQuery(owner_id=owner)), 20
    )
    figures["list: the user's queued"] = timed_ms(
        lambda: repo.list_tasks(TaskQuery(owner_id=owner, statuses=frozenset({TaskStatus.QUEUED}))),
        20,
    )
    figures["list: the user's dead"] = timed_ms(
        lambda: repo.list_tasks(TaskQuery(owner_id=owner, statuses=frozenset({TaskStatus.DEAD}))),
        20,
    )
    figures["count active (the caps)"] = timed_ms(lambda: repo.count_active(owner), 20)
    with repo.engine.begin() as conn:  # the next round starts from the same state
        conn.execute(delete(tasks).where(tasks.c.task_id.in_(ids)))
    return figures


def load_history(engine, owner: int, script_id: int, rows: int) -> float:
    """``rows`` finished tasks (with a run each) spread over 40 to 10 days
    ago, in chunks of a million; seconds taken."""
    started = time.perf_counter()
    chunk = 1_000_000
    statuses = sorted(s.value for s in FINAL_STATUSES)
    for first in range(0, rows, chunk):
        count = min(chunk, rows - first)
        with engine.begin() as conn:
            after = conn.execute(select(func.coalesce(func.max(tasks.c.task_id), 0))).scalar_one()
            conn.execute(
                text(
                    """
                    INSERT INTO tasks (owner_id, script_id, nominal_at, buffered, execute_at,
                        bucket, status, priority, attempt, max_attempts, variables, timeout_s,
                        epoch, created_at, updated_at, lost_count)
                    SELECT :owner, :script, at, false, at,
                        (floor(extract(epoch from at) / :bucket) * :bucket)::bigint,
                        (CAST(:statuses AS text[]))[1 + (i % 4)], 0, 1, 1, '{}', 300, 1,
                        at, at, 0
                    FROM (SELECT i, now() - interval '40 days'
                                 + (i * interval '30 days') / CAST(:rows AS bigint) AS at
                          FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS i) AS g
                    """
                ),
                {
                    "owner": owner,
                    "script": script_id,
                    "bucket": BUCKET_S,
                    "statuses": statuses,
                    "rows": rows,
                    "first": first,
                    "last": first + count - 1,
                },
            )
            conn.execute(
                text(
                    """
                    INSERT INTO runs (task_id, attempt, priority, executor_id, tier, node_id,
                        due_at, started_at, finished_at, exit_code, output_tail, failure)
                    SELECT task_id, 1, 0, 'small-0', 'small', 'node', execute_at, execute_at,
                        execute_at, 0, 'output of a run', NULL
                    FROM tasks WHERE task_id > :after
                    """
                ),
                {"after": after},
            )
        print(f"  loaded {first + count:,} of {rows:,} ({time.perf_counter() - started:.0f} s)")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE tasks"))
        conn.execute(text("ANALYZE runs"))
    return time.perf_counter() - started


def median_rounds(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True, help="a server to create a database on")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--active", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    name = f"chronoray_history_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        settings = (
            conn.execute(text("SHOW fsync")).scalar_one(),
            conn.execute(text("SHOW synchronous_commit")).scalar_one(),
        )
    url = args.database_url.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    try:
        upgrade(engine)
        repo = SqlTaskRepository(engine)
        now = datetime.now(UTC)
        owner = repo.ensure_user(first_name="bench", last_name="history", now=now)
        script, _ = repo.add_script(
            owner_id=owner, name="bench.sh", interpreter=Interpreter.BASH, body=b"true", now=now
        )
        print(f"PostgreSQL fsync={settings[0]} synchronous_commit={settings[1]}")
        empty = median_rounds([one_round(repo, owner, args.active) for _ in range(args.repeat)])
        print(f"loading {args.rows:,} finished tasks with a run each …")
        load_s = load_history(engine, owner, script.script_id, args.rows)
        full = median_rounds([one_round(repo, owner, args.active) for _ in range(args.repeat)])
        cutoff = datetime.now(UTC) - timedelta(days=30)
        purge = [timed_ms(lambda: repo.purge_finished(before=cutoff, limit=500)) for _ in range(20)]
        with engine.connect() as conn:
            size = conn.execute(
                text("SELECT pg_size_pretty(pg_total_relation_size('tasks'))")
            ).scalar_one()
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    print(f"\nloaded in {load_s:.0f} s; tasks table with its indexes: {size}")
    print(f"median of {args.repeat} rounds, {args.active} tasks due per round\n")
    print(f"| query | no history ms | {args.rows:,} finished ms | ratio |")
    print("|---|---|---|---|")
    for query, before in empty.items():
        after = full[query]
        print(f"| {query} | {before:.2f} | {after:.2f} | {after / before:.2f} |")
    print(
        f"| retention: one batch of 500 removed (median of 20) | — | "
        f"{statistics.median(purge):.1f} | — |"
    )


if __name__ == "__main__":
    main()
