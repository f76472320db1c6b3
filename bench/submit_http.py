"""Submission throughput through Ray Serve: single tasks against batches.

Deploys chronoray on a new local Ray with HTTP on a free port, then
  - single: `POST /v1/tasks`, one task per request, from --clients threads;
  - batch: `POST /v1/tasks:batch` of --batch-size tasks per request (one
    transaction each), from the same threads;
and prints tasks/s and request latency for each. Tasks are due in an hour,
so nothing runs meanwhile.

    python -m bench.submit_http --database-url postgresql+psycopg://...
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ray

from chronoray.deploy import deploy, local_token, start_local_ray, teardown
from chronoray.settings import Settings
from scheduling.tiers import local_tiers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(url: str, bodies: list[tuple[str, dict]], clients: int, token: str) -> list[float]:
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


def report(name: str, tasks: int, elapsed: float, latencies: list[float]) -> None:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(
        f"{name}: {tasks} tasks in {elapsed:.1f} s = {tasks / elapsed:.0f} tasks/s; "
        f"{len(latencies)} requests, p50 {statistics.median(ordered) * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("CHRONORAY_BENCH_DATABASE_URL"))
    parser.add_argument("--single-tasks", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url (or CHRONORAY_BENCH_DATABASE_URL) is required")

    settings = Settings(
        database_url=args.database_url,
        namespace=f"chronoray-bench-{uuid.uuid4().hex[:6]}",
        tiers=local_tiers(executors=1, slots=4),
        http_port=free_port(),
    )
    print(f"clients={args.clients} batch_size={args.batch_size} cpus={os.cpu_count()}")
    start_local_ray(settings, logging_level="error", include_dashboard=False)
    try:
        url = deploy(settings)
        with tempfile.TemporaryDirectory() as keep:
            _, token = local_token(settings, Path(keep) / "token")
        httpx.post(
            f"{url}/v1/scripts",
            json={"name": "bench.sh", "body": "true"},
            headers={"Authorization": f"Bearer {token}"},
        ).raise_for_status()
        due = time.time() + 3600

        def task(i: int) -> dict:
            return {"script": "bench.sh", "execute_at": due + i % 600}

        run(url, [("/v1/tasks", task(i)) for i in range(50)], args.clients, token)  # warm up
        bodies = [("/v1/tasks", task(i)) for i in range(args.single_tasks)]
        started = time.perf_counter()
        latencies = run(url, bodies, args.clients, token)
        report("single", args.single_tasks, time.perf_counter() - started, latencies)

        bodies = [
            (
                "/v1/tasks:batch",
                {"tasks": [task(b * args.batch_size + i) for i in range(args.batch_size)]},
            )
            for b in range(args.batches)
        ]
        started = time.perf_counter()
        latencies = run(url, bodies, min(args.clients, args.batches), token)
        total = args.batches * args.batch_size
        report("batch", total, time.perf_counter() - started, latencies)
    finally:
        teardown(settings)
        ray.shutdown()


if __name__ == "__main__":
    main()
