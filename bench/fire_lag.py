"""Fire lag and drain rate on PostgreSQL and a local Ray.

    make bench                      # throwaway PostgreSQL, both scenarios
    python -m bench.fire_lag --database-url postgresql://... [--spread-tasks 3000 --spread-s 30 --burst-tasks 10000]

* spread: N tasks due uniformly over S seconds. Fire lag is measured two ways:
  the script's own first line (it prints its clock) minus the due time, and
  the executor's recorded start minus the due time.
* burst: M tasks due at one instant. Drain rate = M / (last script start -
  due); also time until the last one finished.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from datetime import datetime, timedelta, timezone

import ray
from sqlalchemy import select

from actors.sandbox import SandboxLimits
from chronoray.deploy import deploy, start_local_ray, teardown
from chronoray.settings import Settings
from scheduling.tiers import local_tiers
from storage.schema import runs

SANDBOXES = {
    "full": SandboxLimits(),  # PID namespace, own uid, limits: one exec of actors/launch.c
    "wrappers": SandboxLimits(launcher=False),  # the same through setpriv, unshare, prlimit
    "plain": SandboxLimits(uid_base=None, run_as=None, pid_namespace=False),  # limits only
}
STAMP_SCRIPT = "date +%s.%N"  # the script's first line is its own clock


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def submit(client, requests: list[dict]) -> list[int]:
    ids: list[int] = []
    for start in range(0, len(requests), 1000):
        ids += [t.task_id for t in client.submit_many(requests[start : start + 1000])]
    return ids


def wait_all(client, ids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(ids)
    with client._repo.engine.connect() as conn:  # one query per poll, not one per task
        from storage.schema import tasks

        while pending and time.monotonic() < deadline:
            rows = (
                conn.execute(
                    select(tasks.c.task_id).where(
                        tasks.c.task_id.in_(pending),
                        tasks.c.status.in_(["succeeded", "dead", "cancelled"]),
                    )
                )
                .scalars()
                .all()
            )
            pending -= set(rows)
            conn.commit()
            if pending:
                time.sleep(0.5)
    if pending:
        raise TimeoutError(f"{len(pending)} tasks unfinished after {timeout_s} s")


def run_rows(client, ids: list[int]):
    with client._repo.engine.connect() as conn:
        return conn.execute(
            select(
                runs.c.task_id,
                runs.c.due_at,
                runs.c.started_at,
                runs.c.finished_at,
                runs.c.output_tail,
                runs.c.failure,
            ).where(runs.c.task_id.in_(ids))
        ).all()


def report(name: str, values_ms: list[float]) -> None:
    print(
        f"{name}: n={len(values_ms)} p50={percentile(values_ms, 50):.1f} ms "
        f"p99={percentile(values_ms, 99):.1f} ms max={max(values_ms):.1f} ms "
        f"mean={statistics.fmean(values_ms):.1f} ms"
    )


def spread(client, count: int, spread_s: float, lead_s: float) -> None:
    start = datetime.now(timezone.utc) + timedelta(seconds=lead_s)
    step = spread_s / count
    requests = [
        {"script": "stamp.sh", "execute_at": start + timedelta(seconds=i * step), "max_attempts": 1}
        for i in range(count)
    ]
    began = time.monotonic()
    ids = submit(client, requests)
    print(
        f"spread: submitted {count} tasks in {time.monotonic() - began:.1f} s; first due in {lead_s:.0f} s"
    )
    wait_all(client, ids, timeout_s=lead_s + spread_s + 300)
    rows = run_rows(client, ids)
    failures = [r for r in rows if r.failure]
    script_lag = [
        (float(r.output_tail.split()[0]) - r.due_at.timestamp()) * 1000
        for r in rows
        if not r.failure
    ]
    start_lag = [(r.started_at - r.due_at).total_seconds() * 1000 for r in rows if r.started_at]
    print(f"spread: {len(rows)} runs for {count} tasks, {len(failures)} failed")
    report("spread fire lag (due -> script's first line)", script_lag)
    report("spread fire lag (due -> executor start)     ", start_lag)


def burst(client, count: int, lead_s: float) -> None:
    due = datetime.now(timezone.utc) + timedelta(seconds=lead_s)
    requests = [{"script": "stamp.sh", "execute_at": due, "max_attempts": 1} for _ in range(count)]
    began = time.monotonic()
    ids = submit(client, requests)
    submitted_s = time.monotonic() - began
    print(
        f"burst: submitted {count} tasks in {submitted_s:.1f} s ({count / submitted_s:.0f}/s); due in {lead_s:.0f} s"
    )
    if datetime.now(timezone.utc) > due:
        print(
            "burst: WARNING submission took longer than the lead; the drain includes submission time"
        )
    wait_all(client, ids, timeout_s=lead_s + 900)
    rows = run_rows(client, ids)
    ok = [r for r in rows if not r.failure]
    last_first_line = max(float(r.output_tail.split()[0]) for r in ok)
    last_finish = max(r.finished_at for r in rows)
    drain_s = last_first_line - due.timestamp()
    print(f"burst: {len(rows)} runs, {len(rows) - len(ok)} failed")
    print(
        f"burst drain: {count} tasks started within {drain_s:.2f} s of the instant = {count / drain_s:.0f} tasks/s"
    )
    print(f"burst: last finished {(last_finish - due).total_seconds():.2f} s after the instant")
    report(
        "burst fire lag (due -> script's first line)",
        [(float(r.output_tail.split()[0]) - due.timestamp()) * 1000 for r in ok],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sandbox",
        choices=sorted(SANDBOXES),
        default="full",
        help="full (default): PID namespace + own uid via actors/launch.c; wrappers: the "
        "same through util-linux; plain: rlimits only",
    )
    parser.add_argument("--database-url", default=os.environ.get("CHRONORAY_BENCH_DATABASE_URL"))
    parser.add_argument("--spread-tasks", type=int, default=3000)
    parser.add_argument("--spread-s", type=float, default=30.0)
    parser.add_argument("--burst-tasks", type=int, default=10000)
    parser.add_argument("--lead-s", type=float, default=20.0)
    parser.add_argument("--executors", type=int, default=2, help="per tier")
    parser.add_argument("--slots", type=int, default=8, help="per executor")
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    if not args.database_url:
        parser.error(
            "--database-url (or CHRONORAY_BENCH_DATABASE_URL) is required: a PostgreSQL URL"
        )

    settings = Settings(
        database_url=args.database_url,
        namespace=f"chronoray-bench-{uuid.uuid4().hex[:6]}",
        num_shards=args.shards,
        tiers=local_tiers(executors=args.executors, slots=args.slots),
        http_port=0,
        sandbox=SANDBOXES[args.sandbox],
    )
    print(
        f"settings: shards={args.shards} executors/tier={args.executors} slots/executor={args.slots} "
        f"prefire_ms={settings.prefire_ms} sandbox={args.sandbox} cpus={os.cpu_count()}"
    )
    start_local_ray(settings, logging_level="error")
    try:
        deploy(settings, http=False)
        from chronoray import Client

        client = Client(namespace=settings.namespace)
        client.register_script("stamp.sh", STAMP_SCRIPT)
        if args.spread_tasks:
            spread(client, args.spread_tasks, args.spread_s, args.lead_s)
        if args.burst_tasks:
            burst(client, args.burst_tasks, args.lead_s)
    finally:
        teardown(settings)
        ray.shutdown()


if __name__ == "__main__":
    main()
