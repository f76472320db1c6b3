"""Submission throughput through Ray Serve and the Python driver, against
floors run in the same command.

Deploys chronoray on a new local Ray with HTTP on a free port, then, in each
of --rounds rounds (the summary prints their median):
  - single: `POST /v1/tasks`, one task per request, for --single-s seconds
    from --clients keep-alive connections of wrk (a C load generator with
    two threads: the clients share this box's two cores);
  - batch: `POST /v1/tasks:batch` of --batch-size tasks per request;
  - driver: `chronoray.Client.submit_batch` of --batch-size tasks per call,
    from the same number of threads, in this process (the actor-handle path);
    then again after `chronoray.settle_heap()` (the driver's opt-in: the
    collector frozen and tuned as in the actors), undone after the round;
and the floors:
  - single: plain uvicorn with a FastAPI app awaiting one actor call per
    request on the same Ray (bench/floor_http.py), the same wrk load; and
    the same app as a Serve application beside chronoray's, on the same
    ingress ("single through Serve": Serve's share of the cost);
  - batch: a bare PostgreSQL insert loop of the same rows, --batch-size per
    transaction.
CPU per task by process class (bench/procstat.py) is printed for the single
requests. Tasks are due in an hour, so nothing runs meanwhile.

--ab runs the ingress levers each alone on a new Ray (Serve reads them as
its processes start): Serve's Python proxy, HAProxy
(chronoray's default), the proxy with RAY_SERVE_THROUGHPUT_OPTIMIZED=1, and
HAProxy with Serve running chronoray's code on the replica's own event loop
(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0).

    python -m bench.submit_http --database-url postgresql+psycopg://... [--ab]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psycopg
import ray

from bench import procstat
from bench.figures import median_table, percentile
from bench.floor_http import deploy_serve_floor, wait_until_taking
from chronoray import settle_heap
from chronoray.deploy import deploy, free_port, local_token, start_local_ray, teardown
from chronoray.settings import Settings
from scheduling.tiers import local_tiers
from storage.engines import make_engine

WRK = shutil.which("wrk") or "/usr/bin/wrk"  # make bench-http installs it
LEVERS = {
    "proxy": ("proxy", {}),
    "haproxy": ("haproxy", {}),
    "proxy + throughput-optimized": ("proxy", {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}),
    # the replica's HTTP server and chronoray's code on one event loop: no
    # hop between two threads' loops per request
    "haproxy + one loop": ("haproxy", {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}),
}


def post_all(url: str, bodies: list[tuple[str, dict]], clients: int, token: str) -> list[float]:
    """POST every body from ``clients`` threads; returns each request's seconds."""

    def worker(chunk: list[tuple[str, dict]]) -> list[float]:
        took = []
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, timeout=120, headers=headers) as session:
            for path, body in chunk:
                started = time.perf_counter()
                response = session.post(path, json=body)
                took.append(time.perf_counter() - started)
                if response.status_code not in (200, 201):
                    raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")
        return took

    chunks = [bodies[i::clients] for i in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        return [t for part in pool.map(worker, chunks) for t in part]


def timed(name: str, count: int, work) -> dict[str, float]:
    """Run ``work()`` (returns per-request seconds) and report count/s and latency."""
    started = time.perf_counter()
    latencies = work()
    elapsed = time.perf_counter() - started
    figures = {
        f"{name} /s": count / elapsed,
        f"{name} p50 ms": statistics.median(latencies) * 1000,
        f"{name} p99 ms": percentile(latencies, 99) * 1000,
    }
    print(
        f"{name}: {count} in {elapsed:.1f} s = {count / elapsed:.0f}/s; {len(latencies)} calls, "
        f"p50 {figures[f'{name} p50 ms']:.1f} ms, p99 {figures[f'{name} p99 ms']:.1f} ms"
    )
    return figures


def truncate_tasks(database_url: str) -> None:
    """Empty the tasks and runs tables: each round starts from nothing."""
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute("TRUNCATE runs, tasks")


def floor_inserts(database_url: str, rows: int, batch_size: int) -> dict[str, float]:
    """A bare PostgreSQL insert loop: ``batch_size`` rows per transaction."""
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        # a logged table (a TEMP one skips the WAL), dropped afterwards
        conn.execute(
            "CREATE TABLE floor_tasks (id bigserial PRIMARY KEY, script text, "
            "execute_at timestamptz, variables jsonb)"
        )
        conn.commit()
        due = datetime.now(timezone.utc)
        took = []
        started = time.perf_counter()
        for _ in range(0, rows, batch_size):
            began = time.perf_counter()
            with conn.transaction():
                conn.execute(
                    "INSERT INTO floor_tasks (script, execute_at, variables) "
                    "SELECT 'bench.sh', unnest(%s::timestamptz[]), '{}'::jsonb",
                    ([due] * batch_size,),
                )
            took.append(time.perf_counter() - began)
        elapsed = time.perf_counter() - started
        conn.execute("DROP TABLE floor_tasks")
    print(f"floor batch: {rows} rows in {elapsed:.1f} s = {rows / elapsed:.0f}/s")
    return {"batch /s": rows / elapsed, "batch p50 ms": statistics.median(took) * 1000}


class FloorServer:
    """bench/floor_http.py on a free port, attached to this Ray."""

    def __init__(self, gcs_address: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.floor_http",
                "--ray-address",
                gcs_address,
                "--port",
                str(self.port),
            ],
            cwd=Path(__file__).resolve().parents[1],
            # an explicit address needs the token mode said (RAY_NOTES.md)
            env={"RAY_AUTH_MODE": "token", **os.environ},
        )
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_until_taking(self.url, timeout_s=60)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def one_configuration(args, lever: str) -> tuple[list[dict], list[dict]]:
    """Start Ray with this ingress lever, deploy, and measure --rounds rounds."""
    ingress, extra_env = LEVERS[lever]
    saved = {name: os.environ.get(name) for name in extra_env}
    os.environ.update(extra_env)
    settings = Settings(
        database_url=args.database_url,
        namespace=f"chronoray-bench-{uuid.uuid4().hex[:6]}",
        tiers=local_tiers(executors=1, slots=4),
        http_port=free_port(),
        serve_ingress=ingress,
        serve_replicas=args.serve_replicas,
        max_active_tasks=10_000_000,
        rate_limit_per_s=1e6,  # the per-user limit would bind first: measure the path
        rate_limit_burst=1_000_000,
    )
    print(
        f"\n== {lever}: clients={args.clients} batch_size={args.batch_size} "
        f"serve_replicas={args.serve_replicas} cpus={os.cpu_count()}"
    )
    start_local_ray(settings, logging_level="error", include_dashboard=False)
    ours: list[dict] = []
    floors: list[dict] = []
    floor_server = None
    try:
        url = deploy(settings)
        assert url is not None
        with tempfile.TemporaryDirectory() as keep:
            _, token = local_token(settings, Path(keep) / "token")
        httpx.post(
            f"{url}/v1/scripts",
            json={"name": "bench.sh", "body": "true"},
            headers={"Authorization": f"Bearer {token}"},
        ).raise_for_status()
        from chronoray import Client

        client = Client(namespace=settings.namespace)
        floor_server = FloorServer(ray.get_runtime_context().gcs_address)
        serve_floor_url = deploy_serve_floor(url, replicas=args.serve_replicas)
        due = time.time() + 3600

        def task(i: int) -> dict:
            return {"script": "bench.sh", "execute_at": due + i % 600}

        post_all(url, [("/v1/tasks", task(i)) for i in range(200)], args.clients, token)  # warm up
        for number in range(1, args.rounds + 1):
            print(f"-- round {number} of {args.rounds}")
            found, floor = one_round(
                args, url, token, client, (floor_server.url, serve_floor_url), task
            )
            ours.append(found)
            floors.append(floor)
    finally:
        if floor_server is not None:
            floor_server.stop()
        teardown(settings)
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return ours, floors


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
"""


def wrk(url: str, body: dict, token: str, clients: int, seconds: float) -> dict[str, float]:
    """``POST /v1/tasks`` of one task from ``clients`` keep-alive connections
    of wrk (C, two threads) for ``seconds``: requests/s and latency."""
    import json
    import re

    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT.format(body=json.dumps(body), token=token))
        script.flush()
        out = subprocess.run(
            [
                WRK,
                "-t2",
                f"-c{clients}",
                f"-d{seconds:.0f}s",
                "--latency",
                "-s",
                script.name,
                f"{url}/v1/tasks",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = (int(failed.group(1)) if failed else 0) + (
        sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    )
    if errors:
        print(f"wrk saw {errors} failed requests:\n{out}")

    def ms(text: str) -> float:
        value, unit = re.match(r"([0-9.]+)(us|ms|s)", text).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {
        "single requests": float(requests),
        "single failed requests": float(errors),
        "single /s": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),
        "single p50 ms": ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
        "single p99 ms": ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
    }


def wrk_with_cpu(url: str, body: dict, token: str, args, label: str) -> tuple[dict, float]:
    """``wrk``'s figures, and the control plane's CPU per request meanwhile
    (printed by process class under ``label``)."""
    before = procstat.snapshot()
    found = wrk(url, body, token, args.clients, args.single_s)
    used = procstat.cpu_by_class(before, procstat.snapshot())
    return found, procstat.report(used, int(found["single requests"]), label)


def one_round(
    args, url: str, token: str, client, floor_urls: tuple[str, str], task
) -> tuple[dict, dict]:
    """chronoray's figures and the floors', each over the same bodies, from
    an empty tasks table (what earlier rounds stored would weigh on this one)."""
    truncate_tasks(args.database_url)
    found, cpu_ms = wrk_with_cpu(url, task(0), token, args, "single")
    requests = int(found.pop("single requests"))
    print(
        f"single: {requests} in {args.single_s:.0f} s = {found['single /s']:.0f}/s, "
        f"p50 {found['single p50 ms']:.1f} ms, p99 {found['single p99 ms']:.1f} ms"
    )
    found["single control-plane CPU ms/task"] = cpu_ms
    plain_url, serve_url = floor_urls
    floor = wrk(plain_url, task(0), token, args.clients, args.single_s)
    through_serve, cpu_ms = wrk_with_cpu(
        serve_url, task(0), token, args, "floor single through Serve"
    )
    found["single control-plane CPU ms/task, floor through Serve"] = cpu_ms
    print(f"floor single: {floor['single /s']:.0f}/s, p50 {floor['single p50 ms']:.1f} ms")
    print(
        f"floor single through Serve: {through_serve['single /s']:.0f}/s, "
        f"p50 {through_serve['single p50 ms']:.1f} ms"
    )
    for name in ("single /s", "single p50 ms", "single p99 ms"):
        # chronoray's figure beside Serve's floor too: a second floor column
        # would not fit the table, so the floor is its own row
        found[f"{name}, floor through Serve"] = through_serve[name]
    found["single /s, % of the floor through Serve"] = (
        100 * found["single /s"] / through_serve["single /s"]
    )
    floor.pop("single requests")
    floor.pop("single failed requests")
    total = args.batches * args.batch_size
    if not total:
        return found, floor

    def batch_of(number: int) -> list[dict]:
        return [task(number * args.batch_size + i) for i in range(args.batch_size)]

    batches = [("/v1/tasks:batch", {"tasks": batch_of(b)}) for b in range(args.batches)]
    threads = min(args.clients, args.batches)
    found |= timed("batch", total, lambda: post_all(url, batches, threads, token))

    def one_call(number: int) -> float:
        began = time.perf_counter()
        client.submit_batch(batch_of(number))
        return time.perf_counter() - began

    def driver() -> list[float]:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one_call, range(args.batches)))

    found |= timed("driver batch", total, driver)
    # The same after `chronoray.settle_heap()`, the driver's opt-in (the
    # collector as the actors and replicas run it); undone for the next round.
    threshold = gc.get_threshold()
    settle_heap()
    try:  # after the other runs' rows (not truncated): no advantage to it
        found |= timed("driver batch, heap settled", total, driver)
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    floor |= floor_inserts(args.database_url, total, args.batch_size)
    floor["driver batch /s"] = floor["driver batch, heap settled /s"] = floor["batch /s"]
    return found, floor


def summary(lever: str, ours: list[dict], floors: list[dict]) -> None:
    print(f"\nsummary ({lever}): median of {len(ours)} rounds (each value in brackets)")
    median_table(ours, floors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("CHRONORAY_BENCH_DATABASE_URL"))
    parser.add_argument("--single-s", type=float, default=10.0, help="seconds of POST /v1/tasks")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--serve-replicas", type=int, default=1, help="API replicas (and the Serve floor's)"
    )
    parser.add_argument("--ingress", choices=sorted(LEVERS), default="haproxy")
    parser.add_argument("--ab", action="store_true", help="each ingress lever alone, in turn")
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url (or CHRONORAY_BENCH_DATABASE_URL) is required")
    levers = list(LEVERS) if args.ab else [args.ingress]
    procstat.count_postgres_of(make_engine(args.database_url))  # not other clusters on the box
    results = {lever: one_configuration(args, lever) for lever in levers}
    for lever, (ours, floors) in results.items():
        summary(lever, ours, floors)
    if len(results) > 1:
        print("\nA/B: each ingress lever alone (medians)")
        print(
            "| ingress | POST /v1/tasks req/s | p50 ms | p99 ms | failed requests | batch tasks/s |"
        )
        print("|---|---|---|---|---|---|")
        for lever, (ours, _) in results.items():
            med = {k: statistics.median(r[k] for r in ours) for k in ours[0]}
            print(
                f"| {lever} | {med['single /s']:.0f} | {med['single p50 ms']:.1f} | "
                f"{med['single p99 ms']:.1f} | {med['single failed requests']:.0f} | "
                f"{med['batch /s']:.0f} |"
            )


if __name__ == "__main__":
    main()
