"""Fire lag and drain rate on PostgreSQL and a local Ray, against a floor.

    make bench        # throwaway durable PostgreSQL, 3 runs of both scenarios
    python -m bench.fire_lag --database-url postgresql://... [--repeat 3 --spread-tasks 3000 --spread-s 30 --burst-tasks 10000]

* spread: N tasks due uniformly over S seconds; fire lag = the script's
  first line (``echo $EPOCHREALTIME``, a bash builtin: no extra exec) minus
  the due time.
* burst: M tasks due at one instant; drain rate = M / (last first line -
  the instant).
* minute: K schedules on ``* * * * *``; for one minute's fires, due → first
  line p50/p99, and how many schedules fired that minute other than once.
* each run also measures the floor (bench/floor.py: the same launcher
  spawned by a plain loop at the same concurrency, and bare ``bash -c``;
  for the minute, as many runs at one instant, held ready before it),
  CPU seconds per task by process class (bench/procstat.py) and memory; the
  summary prints the median of the runs and the ratio to the floor.
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
from bench import floor, procstat
from bench.figures import median_table, percentile
from chronoray.deploy import deploy, start_local_ray, teardown
from chronoray.settings import Settings
from scheduling.tiers import local_tiers
from storage.engines import make_engine
from storage.schema import runs

SANDBOXES = {
    "full": SandboxLimits(),  # PID namespace, own uid, limits: a fork of the fork server
    "launcher": SandboxLimits(fork_server=False),  # the same, each run a Popen of the launcher
    "wrappers": SandboxLimits(launcher=False),  # the same through setpriv, unshare, prlimit
    "plain": SandboxLimits(uid_base=None, run_as=None, pid_namespace=False),  # limits only
}


def submit(client, requests: list[dict]) -> list[int]:
    ids: list[int] = []
    for start in range(0, len(requests), 1000):
        ids += [t.task_id for t in client.submit_many(requests[start : start + 1000])]
    return ids


def wait_all(engine, ids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(ids)
    with engine.connect() as conn:  # one query per poll, not one per task
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


def run_rows(engine, ids: list[int]):
    with engine.connect() as conn:
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


def spread(
    client, engine, count: int, spread_s: float, lead_s: float, handover_s: float
) -> dict[str, float]:
    start = datetime.now(timezone.utc) + timedelta(seconds=lead_s)
    step = spread_s / count
    requests = [
        {"script": "stamp.sh", "execute_at": start + timedelta(seconds=i * step), "max_attempts": 1}
        for i in range(count)
    ]
    began = time.monotonic()
    ids = submit(client, requests)
    print(
        f"spread: submitted {count} in {time.monotonic() - began:.1f} s; first due in {lead_s:.0f} s"
    )
    # CPU is counted from a second before the first hand-over: before it the
    # deployment only idles (its idle share during the firing still counts).
    time.sleep(max(0.0, (start - datetime.now(timezone.utc)).total_seconds() - handover_s - 1))
    before = procstat.snapshot()
    wait_all(engine, ids, timeout_s=lead_s + spread_s + 300)
    used = procstat.cpu_by_class(before, procstat.snapshot())
    rows = run_rows(engine, ids)
    failures = [r for r in rows if r.failure]
    script_lag = [
        (float(r.output_tail.split()[0]) - r.due_at.timestamp()) * 1000
        for r in rows
        if not r.failure
    ]
    print(f"spread: {len(rows)} runs for {count} tasks, {len(failures)} failed")
    report("spread fire lag (due -> script's first line)", script_lag)
    return {
        "spread p50 ms": percentile(script_lag, 50),
        "spread p99 ms": percentile(script_lag, 99),
        "spread control-plane CPU ms/task": procstat.report(used, count, "spread"),
    }


def burst(client, engine, count: int, lead_s: float) -> dict[str, float]:
    due = datetime.now(timezone.utc) + timedelta(seconds=lead_s)
    requests = [{"script": "stamp.sh", "execute_at": due, "max_attempts": 1} for _ in range(count)]
    began = time.monotonic()
    ids = submit(client, requests)
    submitted_s = time.monotonic() - began
    print(f"burst: submitted {count} in {submitted_s:.1f} s ({count / submitted_s:.0f}/s)")
    if datetime.now(timezone.utc) > due:
        print("burst: WARNING submission took longer than the lead; the drain includes it")
    before, memory = procstat.snapshot(), procstat.PeakMemory()
    wait_all(engine, ids, timeout_s=lead_s + 900)
    used, peak_mb = procstat.cpu_by_class(before, procstat.snapshot()), memory.stop()
    rows = run_rows(engine, ids)
    ok = [r for r in rows if not r.failure]
    drain_s = max(float(r.output_tail.split()[0]) for r in ok) - due.timestamp()
    print(f"burst: {len(rows)} runs, {len(rows) - len(ok)} failed")
    print(f"burst drain: {count} started within {drain_s:.2f} s = {count / drain_s:.0f} tasks/s")
    return {
        "burst drain tasks/s": count / drain_s,
        "burst control-plane CPU ms/task": procstat.report(used, count, "burst"),
        "burst peak memory MB (PSS)": peak_mb,
    }


def minute(client, engine, count: int) -> dict[str, float]:
    """``count`` schedules firing every minute: one minute's fires, each
    schedule once, timed from the minute to the script's first line."""
    from concurrent.futures import ThreadPoolExecutor

    from storage.schema import tasks

    now = datetime.now(timezone.utc)
    boundary = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if (boundary - now).total_seconds() < 20:  # creating them must not straddle it
        boundary += timedelta(minutes=1)
    with ThreadPoolExecutor(8) as creators:
        created = list(
            creators.map(
                lambda _: client.create_schedule("stamp.sh", "* * * * *", max_attempts=1),
                range(count),
            )
        )
    ids = [s.schedule_id for s in created]
    print(f"minute: {count} schedules on * * * * *; measuring the fires of {boundary:%H:%M}")
    time.sleep(max(0.0, (boundary - datetime.now(timezone.utc)).total_seconds()) + 1)
    with engine.connect() as conn:
        fired = conn.execute(
            select(tasks.c.task_id, tasks.c.schedule_id).where(
                tasks.c.schedule_id.in_(ids), tasks.c.nominal_at == boundary
            )
        ).all()
    wait_all(engine, [r.task_id for r in fired], timeout_s=300)
    for schedule_id in ids:
        client.delete_schedule(schedule_id)
    per_schedule = {i: 0 for i in ids}
    for row in fired:
        per_schedule[row.schedule_id] += 1
    off = sum(1 for n in per_schedule.values() if n != 1)
    rows = [r for r in run_rows(engine, [r.task_id for r in fired]) if not r.failure]
    lags = [(float(r.output_tail.split()[0]) - boundary.timestamp()) * 1000 for r in rows]
    print(f"minute: {len(fired)} fires of {count} schedules; {off} fired other than once")
    report("minute fire lag (the minute -> script's first line)", lags)
    return {
        "minute p50 ms": percentile(lags, 50),
        "minute p99 ms": percentile(lags, 99),
        "minute schedules not fired exactly once": float(off),
    }


def floors(args, limits, slots: int) -> dict[str, float]:
    """The same work without chronoray, in this command (bench/floor.py)."""
    found = {}
    if args.spread_tasks:
        lags = floor.spread(args.spread_tasks, args.spread_s, slots, limits=limits)
        found |= {"spread p50 ms": percentile(lags, 50), "spread p99 ms": percentile(lags, 99)}
    if args.burst_tasks:
        found |= {
            "burst drain tasks/s": floor.burst(args.burst_tasks, slots, limits=limits),
            "bare burst drain tasks/s": floor.burst(args.burst_tasks, 32, limits=None),
        }
    if args.minute_schedules:
        lags = floor.at_one_instant(args.minute_schedules, slots, limits=limits)
        found |= {"minute p50 ms": percentile(lags, 50), "minute p99 ms": percentile(lags, 99)}
    print("floor: " + ", ".join(f"{k} {v:.1f}" for k, v in found.items()))
    return found


def summary(runs: list[dict[str, float]], floor_runs: list[dict[str, float]]) -> None:
    """Medians of the runs beside the floor's, with the ratio where one exists."""
    print(f"\nsummary: median of {len(runs)} runs (each value in brackets)")
    median_table(runs, floor_runs)
    if "bare burst drain tasks/s" not in floor_runs[0]:
        return
    bare = statistics.median(run["bare burst drain tasks/s"] for run in floor_runs)
    ours = statistics.median(run["burst drain tasks/s"] for run in runs)
    print(
        f"| burst drain vs the bare spawn floor (bash -c, 32 at once) | {ours:.1f} | {bare:.1f} (bare) | {ours / bare:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sandbox",
        choices=sorted(SANDBOXES),
        default="full",
        help="full (default): PID namespace + own uid, each run forked by the executor's fork "
        "server; launcher: the same, each run a Popen of actors/launch.c; wrappers: the same "
        "through util-linux; plain: rlimits only",
    )
    parser.add_argument("--database-url", default=os.environ.get("CHRONORAY_BENCH_DATABASE_URL"))
    parser.add_argument("--spread-tasks", type=int, default=3000)
    parser.add_argument("--spread-s", type=float, default=30.0)
    parser.add_argument("--burst-tasks", type=int, default=10000)
    parser.add_argument("--minute-schedules", type=int, default=300)
    parser.add_argument(
        "--prefire-ms", type=float, default=250.0, help="how early tasks are handed over"
    )
    parser.add_argument(
        "--prespawn",
        choices=["on", "off"],
        default="on",
        help="executors build each run's sandbox at hand-over and hold it until the instant",
    )
    parser.add_argument("--lead-s", type=float, default=20.0)
    parser.add_argument("--executors", type=int, default=2, help="per tier")
    parser.add_argument("--slots", type=int, default=8, help="per executor")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the summary is their median")
    parser.add_argument("--credits", type=int, default=1, help="the executors' credit window")
    parser.add_argument("--slices", type=int, default=1, help="range slices (0: one per shard)")
    args = parser.parse_args()
    if not args.database_url:
        parser.error(
            "--database-url (or CHRONORAY_BENCH_DATABASE_URL) is required: a PostgreSQL URL"
        )

    tiers = local_tiers(executors=args.executors, slots=args.slots)
    settings = Settings(
        database_url=args.database_url,
        namespace=f"chronoray-bench-{uuid.uuid4().hex[:6]}",
        num_shards=args.shards,
        tiers=tiers,
        http_port=0,
        sandbox=SANDBOXES[args.sandbox],
        executor_credits=args.credits,
        range_slices=args.slices,
        prespawn=args.prespawn == "on",
        prefire_ms=args.prefire_ms,
    )
    slots = sum(tier.slots * tier.executors for tier in tiers)
    print(
        f"settings: shards={args.shards} executors/tier={args.executors} slots/executor={args.slots} "
        f"({slots} slots) credits={args.credits} slices={settings.wheel.slices} "
        f"prefire_ms={settings.prefire_ms} prespawn={args.prespawn} sandbox={args.sandbox} "
        f"cpus={os.cpu_count()} postgresql={durability(args.database_url)}"
    )
    start_local_ray(settings, logging_level="error", include_dashboard=False)
    runs: list[dict[str, float]] = []
    floor_runs: list[dict[str, float]] = []
    idle_mb = 0.0
    try:
        deploy(settings, http=False)
        from chronoray import Client

        client = Client(namespace=settings.namespace)
        engine = make_engine(args.database_url)  # the bench's own reads
        procstat.count_postgres_of(engine)  # not other clusters on the box
        client.register_script("stamp.sh", floor.STAMP_SCRIPT)
        time.sleep(5)  # let the deployment settle before reading its idle memory
        idle_mb = procstat.resident_mb()
        print(f"idle: memory (PSS) of Ray, Serve, chronoray and PostgreSQL {idle_mb:.0f} MB")
        for number in range(1, args.repeat + 1):
            print(f"-- run {number} of {args.repeat}")
            found: dict[str, float] = {}
            if args.spread_tasks:
                found |= spread(
                    client,
                    engine,
                    args.spread_tasks,
                    args.spread_s,
                    args.lead_s,
                    handover_s=settings.prefire_ms / 1000,
                )
            if args.burst_tasks:
                found |= burst(client, engine, args.burst_tasks, args.lead_s)
            if args.minute_schedules:
                found |= minute(client, engine, args.minute_schedules)
            runs.append(found)
            floor_runs.append(floors(args, settings.sandbox, slots))
    finally:
        teardown(settings)
        ray.shutdown()
    print(f"idle memory (PSS), measured once before the runs: {idle_mb:.0f} MB")
    summary(runs, floor_runs)


def durability(url: str) -> str:
    """fsync and synchronous_commit as the server runs them."""
    from sqlalchemy import text

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            fsync = conn.execute(text("SHOW fsync")).scalar()
            commit = conn.execute(text("SHOW synchronous_commit")).scalar()
    finally:
        engine.dispose()
    return f"fsync={fsync},synchronous_commit={commit}"


if __name__ == "__main__":
    main()
