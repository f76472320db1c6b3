"""A million future tasks: how fast they are accepted, what they cost in
memory, how fast a page of them lists, and whether a sample fires on time.

    make bench-million   # throwaway durable PostgreSQL
    python -m bench.million --database-url postgresql+psycopg://... [--tasks 1000000 --rounds 3]

Deploys chronoray (HAProxy ingress) on a new local Ray, then in each of
--rounds rounds, for each path (`POST /v1/tasks:batch` from --clients
threads; `chronoray.Client.submit_batch` from as many threads in this
process), from an empty tasks table:
  - submits --tasks tasks, --batch-size per call, due over the next
    --horizon-h hours (beyond every shard's look-ahead), the last --sample
    of them due --sample-lead-s after the load ends;
  - prints accepted tasks/s, and the memory (PSS) of chronoray's processes
    (Ray, Serve, its actors; PostgreSQL apart) before and after;
  - times --pages requests of `GET /v1/tasks` (one page, newest first) right
    after the load, with no ANALYZE of our own;
  - waits for the sample and prints its due -> script's first line lag.
The floor is a bare PostgreSQL insert loop of the same number of rows,
--batch-size per transaction, run in the same command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import ray
from sqlalchemy import select

from bench import floor, procstat
from bench.figures import median_table, percentile
from bench.fire_lag import durability, run_rows, wait_all
from bench.submit_http import floor_inserts, post_all, truncate_tasks
from chronoray.deploy import deploy, free_port, local_token, start_local_ray, teardown
from chronoray.settings import Settings
from scheduling.tiers import local_tiers
from storage.engines import make_engine
from storage.schema import tasks

PATHS = ("batch", "driver")


def chronoray_mb() -> float:
    """PSS of every counted process but PostgreSQL's."""
    return procstat.resident_mb(exclude=("postgresql",))


def load(
    args, path: str, send: Callable[[list[list[dict]]], None], horizon_start: datetime
) -> tuple[dict[str, float], list[int]]:
    """Submit --tasks tasks through ``send``; the last --sample are due
    --sample-lead-s after the rest are in. Returns figures and the sample's ids."""
    spacing = args.horizon_h * 3600 / args.tasks
    bulk = args.tasks - args.sample

    def task(i: int) -> dict:
        return {
            "script": "stamp.sh",
            "execute_at": (horizon_start + timedelta(seconds=i * spacing)).isoformat(),
        }

    batches = [
        [task(i) for i in range(start, min(start + args.batch_size, bulk))]
        for start in range(0, bulk, args.batch_size)
    ]
    before_mb = chronoray_mb()
    started = time.perf_counter()
    send(batches)
    due = datetime.now(timezone.utc) + timedelta(seconds=args.sample_lead_s)
    sample_ids = send_sample(args, path, due)
    elapsed = time.perf_counter() - started
    after_mb = chronoray_mb()
    print(
        f"{path}: {args.tasks} accepted in {elapsed:.1f} s = {args.tasks / elapsed:.0f}/s; "
        f"memory (PSS, PostgreSQL apart) {before_mb:.0f} -> {after_mb:.0f} MB"
    )
    return {
        f"{path} accepted /s": args.tasks / elapsed,
        f"{path} accept s": elapsed,
        f"{path} memory growth MB": after_mb - before_mb,
    }, sample_ids


def send_sample(args, path: str, due: datetime) -> list[int]:
    sample = [
        {"script": "stamp.sh", "execute_at": due.isoformat(), "max_attempts": 1}
    ] * args.sample
    if path == "batch":
        response = httpx.post(
            f"{args.url}/v1/tasks:batch",
            json={"tasks": sample},
            headers={"Authorization": f"Bearer {args.token}"},
            timeout=120,
        )
        response.raise_for_status()
        return [t["task_id"] for t in response.json()["tasks"]]
    return [t.task_id for t in args.client.submit_batch(sample)]


def list_pages(args, path: str) -> dict[str, float]:
    took = []
    with httpx.Client(
        base_url=args.url, headers={"Authorization": f"Bearer {args.token}"}, timeout=60
    ) as session:
        for _ in range(args.pages):
            began = time.perf_counter()
            session.get("/v1/tasks", params={"limit": 50}).raise_for_status()
            took.append((time.perf_counter() - began) * 1000)
    print(
        f"{path}: GET /v1/tasks x{args.pages} right after the load: "
        f"p50 {statistics.median(took):.1f} ms, p99 {percentile(took, 99):.1f} ms"
    )
    return {
        f"{path} list p50 ms": statistics.median(took),
        f"{path} list p99 ms": percentile(took, 99),
    }


def sample_lag(args, path: str, ids: list[int]) -> dict[str, float]:
    wait_all(args.engine, ids, timeout_s=args.sample_lead_s + 120)
    rows = run_rows(args.engine, ids)
    ran = {r.task_id for r in rows if not r.failure}
    for r in rows:
        if r.failure:
            print(f"{path}: sample task {r.task_id} failed: {r.failure}: {r.output_tail[-300:]!r}")
    with args.engine.connect() as conn:
        for task in conn.execute(
            select(tasks.c.task_id, tasks.c.status, tasks.c.attempt, tasks.c.execute_at).where(
                tasks.c.task_id.in_(sorted(set(ids) - ran))
            )
        ):
            print(
                f"{path}: sample task {task.task_id} did not run: {task.status}, "
                f"attempt {task.attempt}, due {task.execute_at:%H:%M:%S.%f}"
            )
    lag = [
        (float(r.output_tail.split()[0]) - r.due_at.timestamp()) * 1000
        for r in rows
        if not r.failure
    ]
    print(
        f"{path}: sample {len(lag)} of {len(ids)} ran; due -> first line "
        f"p50 {percentile(lag, 50):.1f} ms, p99 {percentile(lag, 99):.1f} ms"
    )
    return {
        f"{path} sample ran": float(len(lag)),
        f"{path} sample p50 ms": percentile(lag, 50),
        f"{path} sample p99 ms": percentile(lag, 99),
    }


def senders(args) -> dict[str, Callable[[list[list[dict]]], None]]:
    def over_http(batches: list[list[dict]]) -> None:
        post_all(
            args.url, [("/v1/tasks:batch", {"tasks": b}) for b in batches], args.clients, args.token
        )

    def through_driver(batches: list[list[dict]]) -> None:
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(args.client.submit_batch, batches))

    return {"batch": over_http, "driver": through_driver}


def one_round(args) -> tuple[dict[str, float], dict[str, float]]:
    found: dict[str, float] = {}
    floor_figures: dict[str, float] = {}
    send = senders(args)
    for path in args.paths:
        truncate_tasks(args.database_url)
        start = datetime.now(timezone.utc) + timedelta(hours=1)
        figures, sample_ids = load(args, path, send[path], start)
        found |= figures
        found |= list_pages(args, path)
        found |= sample_lag(args, path, sample_ids)
    inserted = floor_inserts(args.database_url, args.tasks, args.batch_size)
    for path in args.paths:
        floor_figures[f"{path} accepted /s"] = inserted["batch /s"]
    truncate_tasks(args.database_url)
    return found, floor_figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("CHRONORAY_BENCH_DATABASE_URL"))
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--horizon-h", type=float, default=24.0)
    parser.add_argument("--sample", type=int, default=100)
    parser.add_argument("--sample-lead-s", type=float, default=20.0)
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--serve-replicas", type=int, default=1, help="API replicas behind Serve")
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url (or CHRONORAY_BENCH_DATABASE_URL) is required")
    settings = Settings(
        database_url=args.database_url,
        namespace=f"chronoray-bench-{uuid.uuid4().hex[:6]}",
        tiers=local_tiers(executors=1, slots=4),
        http_port=free_port(),
        max_active_tasks=10_000_000,
        rate_limit_per_s=1e6,  # the per-user limit would bind first: measure the path
        rate_limit_burst=10_000_000,
        serve_replicas=args.serve_replicas,
    )
    print(
        f"settings: tasks={args.tasks} batch_size={args.batch_size} clients={args.clients} "
        f"paths={' '.join(args.paths)} cpus={os.cpu_count()} "
        f"postgresql={durability(args.database_url)}; the clients share this box"
    )
    start_local_ray(settings, logging_level="error", include_dashboard=False)
    rounds: list[dict[str, float]] = []
    floors: list[dict[str, float]] = []
    try:
        args.url = deploy(settings)
        with tempfile.TemporaryDirectory() as keep:
            _, args.token = local_token(settings, Path(keep) / "token")
        from chronoray import Client

        args.client = Client(namespace=settings.namespace)
        args.client.register_script("stamp.sh", floor.STAMP_SCRIPT)
        args.engine = make_engine(args.database_url)
        for number in range(1, args.rounds + 1):
            print(f"-- round {number} of {args.rounds}")
            found, floor_figures = one_round(args)
            rounds.append(found)
            floors.append(floor_figures)
    finally:
        teardown(settings)
        ray.shutdown()
    print(f"\nsummary: median of {len(rounds)} rounds (each value in brackets)")
    median_table(rounds, floors)


if __name__ == "__main__":
    main()
