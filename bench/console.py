"""The console's pages with a large history: 100,000 tasks and 1,000
schedules of one user in PostgreSQL; every page's server time (its
``Server-Timing`` header) and wall time through Ray Serve, against a floor
(``GET /healthz`` through the same proxy) measured in the same run; the
median over rounds of each round's p50 and p95.

The history is written straight into the tables (a fixture, not the run
path): finished one-shot tasks over the last day with their runs, tasks due
in a month, and for each schedule its occurrences of the last hour with
their runs. Schedules hold no pending occurrence, so nothing fires while
the pages are measured. The HTTP client runs on the same two cores.

    python -m bench.console --database-url postgresql+psycopg://...
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import ray
from sqlalchemy import insert, text

from bench.fire_lag import durability
from chronoray.deploy import deploy, free_port, local_token, start_local_ray, teardown
from chronoray.settings import Settings
from scheduling.cron import CronSchedule
from scheduling.tiers import local_tiers
from scheduling.timeline import bucket_of
from service.auth import issue_token
from storage.engines import make_engine
from storage.schema import runs, schedules, scripts, tasks
from storage.sql import SqlTaskRepository

UTC = timezone.utc
CRONS = [("* * * * *", 100), ("*/5 * * * *", 400), ("0 * * * *", 500)]
CHUNK = 5_000


def task_row(owner: int, script_id: int, at: datetime, status: str, now: datetime, **extra):
    return {
        "owner_id": owner,
        "script_id": script_id,
        "schedule_id": None,
        "nominal_at": at,
        "buffered": False,
        "execute_at": at,
        "bucket": bucket_of(at),
        "status": status,
        "priority": random.randint(0, 9),
        "attempt": 1,
        "max_attempts": 3,
        "variables": {"N": str(random.randint(0, 999))},
        "timeout_s": 300.0,
        "epoch": 0,
        "created_at": at - timedelta(minutes=5),
        "updated_at": now,
        "lost_count": 0,
        **extra,
    }


def run_row(task_id: int, due: datetime, *, failed: bool) -> dict:
    started = due + timedelta(milliseconds=random.uniform(1, 40))
    return {
        "task_id": task_id,
        "attempt": 1,
        "priority": 0,
        "executor_id": "small-bench",
        "tier": "small",
        "node_id": "bench",
        "due_at": due,
        "started_at": started,
        "finished_at": started + timedelta(milliseconds=random.uniform(5, 500)),
        "exit_code": 1 if failed else 0,
        "output_tail": "line\n" * 20,
        "failure": "exit_code" if failed else None,
    }


def insert_tasks(conn, rows: list[dict]) -> list[int]:
    ids: list[int] = []
    for i in range(0, len(rows), CHUNK):
        ids += conn.execute(insert(tasks).returning(tasks.c.task_id), rows[i : i + CHUNK]).scalars()
    return ids


def load(engine, owner: int, total_tasks: int, now: datetime) -> tuple[int, int]:
    """The history; returns (a finished task's id, a schedule's id)."""
    random.seed(7)
    with engine.begin() as conn:
        script_ids = (
            conn.execute(
                insert(scripts).returning(scripts.c.script_id),
                [
                    {
                        "owner_id": owner,
                        "name": f"job-{i}.sh",
                        "version": 1,
                        "sha256": f"{i:064x}",
                        "interpreter": "bash",
                        "body": b"echo hello\n",
                        "created_at": now - timedelta(days=3),
                    }
                    for i in range(20)
                ],
            )
            .scalars()
            .all()
        )
        schedule_rows, occurrence_plan = [], []
        for cron, count in CRONS:
            fires = CronSchedule(cron).fires_between(now - timedelta(hours=1), now, limit=100)
            for _ in range(count):
                schedule_rows.append(
                    {
                        "owner_id": owner,
                        "script_name": "job-0.sh",
                        "cron": cron,
                        "timezone": "UTC",
                        "variables": {},
                        "priority": 0,
                        "max_attempts": 3,
                        "timeout_s": 300.0,
                        "misfire_policy": "fire_once",
                        "overlap_policy": "skip",
                        "jitter_s": 0.0,
                        "paused": False,
                        "deleted": False,
                        "next_fire_at": CronSchedule(cron).next_after(now),
                        "missed_fires": 0,
                        "skipped_fires": 0,
                        "created_at": now - timedelta(days=2),
                        "updated_at": now,
                    }
                )
                occurrence_plan.append(fires)
        schedule_ids = (
            conn.execute(insert(schedules).returning(schedules.c.schedule_id), schedule_rows)
            .scalars()
            .all()
        )
        occurrences = [
            task_row(owner, script_ids[0], at, "succeeded", now, schedule_id=sid)
            for sid, fires in zip(schedule_ids, occurrence_plan, strict=True)
            for at in fires
        ]
        one_shots = []
        for _ in range(total_tasks - len(occurrences)):
            roll = random.random()
            script_id = random.choice(script_ids)
            if roll < 0.25:  # due in a month: outside every shard's look-ahead
                at = now + timedelta(days=30, seconds=random.uniform(0, 86400))
                one_shots.append(task_row(owner, script_id, at, "scheduled", now))
            else:
                at = now - timedelta(seconds=random.uniform(0, 86400))
                status = "dead" if roll < 0.30 else "cancelled" if roll < 0.35 else "succeeded"
                one_shots.append(task_row(owner, script_id, at, status, now))
        rows = occurrences + one_shots
        ids = insert_tasks(conn, rows)
        run_rows = [
            run_row(task_id, row["execute_at"], failed=row["status"] == "dead")
            for task_id, row in zip(ids, rows, strict=True)
            if row["status"] in ("succeeded", "dead")
        ]
        for i in range(0, len(run_rows), CHUNK):
            conn.execute(insert(runs), run_rows[i : i + CHUNK])
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    print(
        f"loaded {len(rows)} tasks ({len(occurrences)} occurrences of {len(schedule_ids)} "
        f"schedules), {len(run_rows)} runs"
    )
    return ids[0], schedule_ids[0]


def signed_in(url: str, token: str) -> httpx.Client:
    session = httpx.Client(base_url=url, timeout=60)
    page = session.get("/ui/login")
    check = re.search(r'name="login_check" value="([^"]+)"', page.text)
    assert check, page.text[:300]
    answer = session.post("/ui/login", data={"token": token, "login_check": check.group(1)})
    if answer.status_code != 303:
        raise RuntimeError(f"sign-in: {answer.status_code} {answer.text[:200]}")
    return session


def measure(session: httpx.Client, path: str, count: int) -> tuple[list[float], list[float]]:
    """Server ms and wall ms of ``count`` GETs."""
    server, wall = [], []
    for _ in range(count):
        started = time.perf_counter()
        answer = session.get(path)
        wall.append((time.perf_counter() - started) * 1000)
        if answer.status_code != 200:
            raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:200]}")
        timing = answer.headers.get("server-timing", "")
        found = re.search(r"dur=([0-9.]+)", timing)
        if found:
            server.append(float(found.group(1)))
    return server, wall


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered))) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("CHRONORAY_BENCH_DATABASE_URL"))
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=20, help="per page per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url (or CHRONORAY_BENCH_DATABASE_URL) is required")

    settings = Settings(
        database_url=args.database_url,
        namespace=f"chronoray-bench-{uuid.uuid4().hex[:6]}",
        tiers=local_tiers(executors=1, slots=2),
        http_port=free_port(),
    )
    print(f"postgresql {durability(args.database_url)}; cpus={os.cpu_count()}")
    start_local_ray(settings, logging_level="error", include_dashboard=False)
    try:
        url = deploy(settings)
        assert url is not None
        with tempfile.TemporaryDirectory() as keep:
            owner, _ = local_token(settings, Path(keep) / "token")
        engine = make_engine(args.database_url)
        now = datetime.now(UTC)
        started = time.perf_counter()
        task_id, schedule_id = load(engine, owner, args.tasks, now)
        print(f"load took {time.perf_counter() - started:.1f} s")
        repo = SqlTaskRepository(engine)
        _, token = issue_token(repo, user_id=owner, label="bench", now=now)
        session = signed_in(url, token)
        pages = [
            "/ui/",
            "/ui/fragments/overview",
            "/ui/tasks",
            "/ui/tasks?status=dead",
            "/ui/tasks?script=job-3.sh",
            f"/ui/tasks/{task_id}",
            "/ui/schedules",
            "/ui/schedules?offset=950",
            f"/ui/schedules/{schedule_id}",
            f"/ui/schedules/{schedule_id}/audit",
            "/ui/schedules/new",
            "/ui/scripts",
            "/ui/scripts/job-1.sh",
            "/ui/executors",
            "/ui/dead",
        ]
        for path in pages:  # warm up: templates compiled, connections open
            measure(session, path, 2)
        floor = httpx.Client(base_url=url, timeout=60)
        print(
            f"{args.rounds} rounds x {args.requests} GETs per page; median over rounds "
            "of each round's percentile; the floor is GET /healthz through the same proxy"
        )
        print(
            f"{'page':38} {'server p50':>11} {'server p95':>11} {'wall p95':>9} "
            f"{'floor p95':>10} {'ratio':>6}"
        )
        worst = 0.0
        for path in pages:
            server50, server95, wall95, floor95 = [], [], [], []
            for _ in range(args.rounds):
                server, wall = measure(session, path, args.requests)
                _, floor_wall = measure(floor, "/healthz", args.requests)
                server50.append(p(server, 50))
                server95.append(p(server, 95))
                wall95.append(p(wall, 95))
                floor95.append(p(floor_wall, 95))
            s50, s95 = statistics.median(server50), statistics.median(server95)
            w95, f95 = statistics.median(wall95), statistics.median(floor95)
            worst = max(worst, s95)
            print(
                f"{path[:38]:38} {s50:9.1f}ms {s95:9.1f}ms {w95:7.1f}ms {f95:8.1f}ms "
                f"{w95 / f95:6.1f}"
            )
        print(f"worst page server p95: {worst:.1f} ms (target < 300 ms)")
    finally:
        teardown(settings)
        ray.shutdown()


if __name__ == "__main__":
    main()
