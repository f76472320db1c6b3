"""`make run` in a burst: the memory of the embedded deployment.

    make bench-run-burst   # python -m bench.run_burst [--tasks 10000 --bursts 2]

Starts `chronoray up` (what `make run` runs: local Ray, SQLite, HAProxy) on
a free port with a new data directory, lets it settle, then --bursts times
submits --tasks tasks due at one instant --lead-s ahead through
`POST /v1/tasks:batch` and samples the PSS of every counted process
(`bench/procstat.py`; PostgreSQL apart: there is none) each second until
every task is final. Prints the idle PSS, each burst's peak with what it was
made of, and its drain. Between bursts it waits --idle-s, so that executors
grown for one burst have gone before the next.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from bench import procstat
from chronoray.deploy import free_port

NOT_FINAL = ["scheduled", "queued", "running"]


def start(data_dir: Path, port: int) -> "subprocess.Popen[str]":
    command = [str(Path(sys.executable).parent / "chronoray"), "up", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--data-dir", str(data_dir), "--grace", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert server.stdout is not None
    for line in server.stdout:  # until it says it is up
        if "chronoray is up" in line:
            return server
    raise RuntimeError(f"chronoray up exited with {server.wait()} before it was up")


def burst(
    session: httpx.Client, args: argparse.Namespace
) -> tuple[float, dict[str, tuple[float, int]], float]:
    """Submit the burst and wait for its end: (peak MB, its make-up, drain s)."""
    sampler = procstat.PeakMemory(every_s=1.0, exclude=("postgresql",))
    due = datetime.now(timezone.utc) + timedelta(seconds=args.lead_s)
    task = {"script": "stamp.sh", "execute_at": due.isoformat(), "max_attempts": 1}
    for start_at in range(0, args.tasks, 1000):
        batch = [task] * min(1000, args.tasks - start_at)
        session.post("/v1/tasks:batch", json={"tasks": batch}).raise_for_status()
    deadline = due.timestamp() + args.timeout_s
    while time.time() < deadline:
        page = session.get("/v1/tasks", params={"status": NOT_FINAL, "limit": 1})
        page.raise_for_status()
        if not page.json()["tasks"] and time.time() > due.timestamp():
            break
        time.sleep(1)
    else:
        raise RuntimeError(f"tasks still not final {args.timeout_s} s after their instant")
    drained_s = time.time() - due.timestamp()
    return sampler.stop(), sampler.peak_by_class, drained_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--lead-s", type=float, default=30.0, help="submit this long ahead")
    parser.add_argument("--idle-s", type=float, default=90.0, help="settle before each burst")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="chronoray-run-burst-") as data_dir:
        server = start(Path(data_dir), port)
        try:
            token = (Path(data_dir) / "local-token").read_text().strip()
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=120,
            ) as session:
                session.post(
                    "/v1/scripts",
                    json={"name": "stamp.sh", "interpreter": "bash", "body": "echo $EPOCHREALTIME"},
                ).raise_for_status()
                print(f"settings: tasks={args.tasks} bursts={args.bursts} cpus={os.cpu_count()}")
                for number in range(1, args.bursts + 1):
                    time.sleep(args.idle_s)
                    idle = procstat.resident_mb(exclude=("postgresql",))
                    peak, make_up, drained_s = burst(session, args)
                    parts = sorted(make_up.items(), key=lambda item: -item[1][0])
                    print(
                        f"burst {number}: idle {idle:.0f} MB, peak {peak:.0f} MB; drained "
                        f"{drained_s:.0f} s after the instant ({args.tasks / drained_s:.0f} tasks/s)"
                    )
                    print(
                        "  at the peak: "
                        + ", ".join(f"{k} {mb:.0f} MB ({n})" for k, (mb, n) in parts)
                    )
        finally:
            server.send_signal(signal.SIGINT)  # Ctrl-C: drain and stop
            server.wait(timeout=120)


if __name__ == "__main__":
    main()
