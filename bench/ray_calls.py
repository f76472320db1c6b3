"""What one call between two actors costs in CPU on this box: the price of
each hand-over, report and announcement on the run path.

Two async actors at ``num_cpus=0``, as chronoray's are, on a new local Ray;
one calls the other's method with one ``TaskSpec`` (what a hand-over
carries), awaiting each answer, first back to back and then 10 ms apart
(a steady 100 tasks/s hands each executor a task about that often). CPU is
read from ``/proc`` for the caller, the callee, and the raylet and GCS
together, per call; the floor is the same loop with the callee's method
called in-process (no Ray), in the same command. The summary is the median
of the rounds.

    .venv/bin/python -m bench.ray_calls [--calls 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time
from datetime import datetime, timezone

import ray

from bench.procstat import cpu_of
from scheduling.models import Interpreter, TaskSpec

GAPS = {"back to back": 0.0, "10 ms apart": 0.01}


def one_spec() -> TaskSpec:
    return TaskSpec(
        task_id=1,
        attempt=1,
        epoch=1,
        shard=0,
        priority=0,
        due_at=datetime.now(timezone.utc),
        script_id=1,
        script_sha256="0" * 64,
        interpreter=Interpreter.BASH,
        variables={},
        timeout_s=60.0,
    )


class Callee:
    async def take(self, specs: list[TaskSpec]) -> int:
        return len(specs)

    def pid(self) -> int:
        return os.getpid()


class Caller:
    def __init__(self, callee) -> None:
        self._callee = callee

    def pid(self) -> int:
        return os.getpid()

    async def call(self, calls: int, gap_s: float, in_process: bool) -> None:
        local, specs = Callee(), [one_spec()]
        for _ in range(calls):
            if in_process:
                await local.take(specs)
            else:
                await self._callee.take.remote(specs)
            if gap_s:
                await asyncio.sleep(gap_s)


def ray_system_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def measure(caller, pids: dict[str, int], calls: int, gap_s: float, in_process: bool):
    system = ray_system_pids()
    ray.get(caller.call.remote(100, gap_s, in_process))  # warm
    before = {name: cpu_of(pid) for name, pid in pids.items()}
    system_before = sum(cpu_of(pid) for pid in system)
    began = time.monotonic()
    ray.get(caller.call.remote(calls, gap_s, in_process))
    wall = time.monotonic() - began
    used = {name: (cpu_of(pid) - before[name]) * 1000 / calls for name, pid in pids.items()}
    used["raylet+gcs"] = (sum(cpu_of(pid) for pid in system) - system_before) * 1000 / calls
    used["wall"] = wall * 1000 / calls
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level="error",
        log_to_driver=False,
    )
    try:
        callee = ray.remote(num_cpus=0)(Callee).remote()
        caller = ray.remote(num_cpus=0)(Caller).remote(callee)
        pids = {"caller": ray.get(caller.pid.remote()), "callee": ray.get(callee.pid.remote())}
        rows: dict[tuple[str, str], list[dict[str, float]]] = {}
        for number in range(1, args.repeat + 1):
            for gap_name, gap_s in GAPS.items():
                for path, in_process in (("actor call", False), ("floor: in-process", True)):
                    used = measure(caller, pids, args.calls, gap_s, in_process)
                    rows.setdefault((gap_name, path), []).append(used)
                    print(
                        f"round {number}, {gap_name}, {path}: "
                        + ", ".join(f"{k} {v:.3f} ms" for k, v in used.items())
                    )
    finally:
        ray.shutdown()
    print(f"\nsummary: CPU ms per call, median of {args.repeat} rounds ({args.calls} calls each)")
    print("| calls | path | caller | callee | raylet+gcs | total | wall per call |")
    print("|---|---|---|---|---|---|---|")
    for (gap_name, path), runs in rows.items():
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        total = med["caller"] + med["callee"] + med["raylet+gcs"]
        print(
            f"| {gap_name} | {path} | {med['caller']:.3f} | {med['callee']:.3f} "
            f"| {med['raylet+gcs']:.3f} | {total:.3f} | {med['wall']:.3f} |"
        )


if __name__ == "__main__":
    main()
