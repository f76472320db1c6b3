"""The run path's writes, in-process: what the shard's claim, the
executor's start gate and its result commit cost per task, in client CPU
and wall time, with tasks one per call (a spread) and in batches (a burst).
The floor, in the same command, is the cheapest keyed write there is: a bare
psycopg ``UPDATE tasks … WHERE task_id = %s`` committed per call (one row,
or a batch through ``= ANY``), with no SQLAlchemy and no decision.

Each round uses a fresh database migrated to head; each figure is the
median of ``--rounds`` rounds.

    .venv/bin/python -m bench.statements --database-url postgresql+psycopg://... [--tasks 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone

import psycopg
from sqlalchemy import create_engine, text

from scheduling.lifecycle import RetryPolicy
from scheduling.models import Interpreter, NewTask, RunResult, SubmitResult
from storage.engines import make_engine
from storage.migrate import upgrade
from storage.sql import SqlTaskRepository

STEPS = ("claim", "start gate", "result (success)", "floor: keyed UPDATE")


def per_task(work: Callable[[Sequence[object]], object], items: list, batch: int) -> tuple:
    """(client CPU ms, wall ms) per item of ``work`` over ``items`` in batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(items), batch):
        work(items[i : i + batch])
    return (
        (time.process_time() - cpu) * 1000 / len(items),
        (time.perf_counter() - wall) * 1000 / len(items),
    )


def one_round(admin_url: str, count: int, batch: int) -> dict[str, tuple[float, float]]:
    name = f"bench_statements_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    try:
        upgrade(engine)
        repo = SqlTaskRepository(engine)
        now = datetime.now(timezone.utc).replace(microsecond=0)
        owner = repo.ensure_user(first_name="bench", last_name="statements", now=now)
        repo.add_script(
            owner_id=owner, name="s.sh", interpreter=Interpreter.BASH, body=b"echo", now=now
        )
        ids: list[int] = []
        for start in range(0, 2 * count, 1000):
            news = [
                NewTask(owner_id=owner, script_name="s.sh", execute_at=now)
                for _ in range(min(1000, 2 * count - start))
            ]
            added = repo.add_tasks(news, now=now)
            ids += [r.task.task_id for r in added if isinstance(r, SubmitResult)]
        ids, floor_ids = ids[:count], ids[count:]
        epoch = repo.start_shard(0, now=now)
        lease = now + timedelta(hours=1)
        specs: list = []

        def claim(chunk):
            specs.extend(repo.claim(chunk, shard=0, epoch=epoch, lease_until=lease, now=now).specs)

        figures = {"claim": per_task(claim, ids, batch)}
        figures["start gate"] = per_task(
            lambda chunk: repo.mark_running(chunk, lease_grace_s=5, now=now), specs, batch
        )
        results = [
            RunResult.of(
                spec,
                executor_id="bench",
                tier="small",
                node_id="node",
                started_at=now,
                finished_at=now,
                exit_code=0,
                output_tail="1765000000.000000\n",
                failure=None,
            )
            for spec in specs
        ]
        policy = RetryPolicy()
        figures["result (success)"] = per_task(
            lambda chunk: repo.record_results(chunk, policy=policy, now=now), results, batch
        )
        with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as raw:

            def keyed_update(chunk):
                with raw.transaction():
                    raw.execute(
                        "UPDATE tasks SET updated_at = now() WHERE task_id = ANY(%s)", [chunk]
                    )

            figures["floor: keyed UPDATE"] = per_task(keyed_update, floor_ids, batch)
        with engine.connect() as conn:
            done = conn.execute(text("SELECT count(*) FROM runs")).scalar_one()
        if len(specs) != count or done != count:
            raise SystemExit(f"claimed {len(specs)}, ran {done} of {count}: the bench is broken")
        return figures
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True, help="a PostgreSQL URL (admin)")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.tasks} tasks per step; median of {args.rounds} rounds, each on a fresh database")
    print("| tasks per call | step | client CPU ms/task | wall ms/task | CPU vs floor |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        rounds = [one_round(args.database_url, args.tasks, batch) for _ in range(args.rounds)]
        medians = {
            step: tuple(statistics.median(r[step][i] for r in rounds) for i in (0, 1))
            for step in STEPS
        }
        floor_cpu = medians["floor: keyed UPDATE"][0]
        for step in STEPS:
            cpu, wall = medians[step]
            cpus = "; ".join(f"{r[step][0]:.3f}" for r in rounds)
            print(
                f"| {batch} | {step} | {cpu:.3f} ({cpus}) | {wall:.3f} | {cpu / floor_cpu:.1f}× |"
            )


if __name__ == "__main__":
    main()
