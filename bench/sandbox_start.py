"""What each wall of the sandbox costs a script's start, against the
launcher without them (the floor: PID namespace, uid and rlimits, the
host's network, a scratch directory on disk), in the same command.

Variants, each adding to the floor: the run cgroup; the scratch tmpfs; both
with each network policy (``egress`` with both is the default); and the
default once more with each run a ``Popen`` of the launcher instead of a
fork of the fork server (actors/fork_server.py). For each,
through the executor's own launch path
(``actors.sandbox.run_script``): due → the script's first line
(``$EPOCHREALTIME``) for scripts started one at a time, and the rate of a
burst started 8 at a time, with the CPU the starting process (the
executor's part) spent per start in it. The variants take turns within each round; the
summary is the median of the rounds.

    .venv/bin/python -m bench.sandbox_start [--starts 200] [--burst 500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

from actors.network import ControlPlane, remove_egress_filter
from actors.sandbox import SandboxLimits, cgroup_support, prepare_network
from bench import floor
from scheduling.tiers import NetworkPolicy

# A range of its own, so a deployment on this host keeps its filter as it is.
BENCH_LIMITS = SandboxLimits(uid_base=700_000_000, uid_count=64)
FLOOR = replace(BENCH_LIMITS, network=NetworkPolicy.HOST, cgroups=False, scratch_mb=0)
VARIANTS = {
    "floor (no cgroup, disk scratch, host network)": FLOOR,
    "+ cgroup": replace(FLOOR, cgroups=True),
    "+ scratch tmpfs": replace(FLOOR, scratch_mb=256),
    "+ both, network host": replace(FLOOR, cgroups=True, scratch_mb=256),
    "+ both, network egress (the default)": replace(BENCH_LIMITS, network=NetworkPolicy.EGRESS),
    "+ both, network none": replace(BENCH_LIMITS, network=NetworkPolicy.NONE),
    # the default again, each run a Popen of the launcher instead of a fork of the fork server
    "the default without the fork server": replace(BENCH_LIMITS, fork_server=False),
}
BENCH_CHAIN_PLANE = ControlPlane(
    addresses=frozenset({"127.0.0.1", "::1"}), ports=frozenset({5432, 6379, 8000, 8265})
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_round(args) -> dict[str, float]:
    figures: dict[str, float] = {}
    for name, limits in VARIANTS.items():
        lags = floor.spread(args.starts, args.starts * 0.02, 1, limits=limits)
        figures[f"{name}: start p50 ms"] = percentile(lags, 0.5)
        figures[f"{name}: start p99 ms"] = percentile(lags, 0.99)
        cpu_before = time.process_time()  # the starting process's own CPU: the executor's share
        figures[f"{name}: burst starts/s"] = floor.burst(args.burst, 8, limits=limits)
        cpu_ms = (time.process_time() - cpu_before) * 1000 / args.burst
        figures[f"{name}: starter CPU ms per start"] = cpu_ms
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=200, help="one at a time, 20 ms apart")
    parser.add_argument("--burst", type=int, default=500, help="due at one instant, 8 at a time")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the sandbox's namespaces, uids and packet filter need root")
    for name, limits in VARIANTS.items():
        print(f"{name}: network {prepare_network(limits, BENCH_CHAIN_PLANE)}")
    print(cgroup_support(BENCH_LIMITS).describe())
    egress = replace(BENCH_LIMITS, network=NetworkPolicy.EGRESS).uid_range()
    assert egress is not None
    try:
        rounds = []
        for turn in range(args.repeat):
            rounds.append(one_round(args))
            print(f"round {turn + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in rounds[-1].items()))
    finally:
        remove_egress_filter(*egress)
    print(f"\nmedian of {args.repeat} rounds, each variant beside the floor\n")
    print(
        "| sandbox | start p50 ms | start p99 ms | burst starts/s | burst vs floor "
        "| starter CPU ms per start |"
    )
    print("|---|---|---|---|---|---|")
    first = next(iter(VARIANTS))
    base = statistics.median(r[f"{first}: burst starts/s"] for r in rounds)
    for name in VARIANTS:
        p50, p99, rate, cpu = (
            statistics.median(r[f"{name}: {figure}"] for r in rounds)
            for figure in (
                "start p50 ms",
                "start p99 ms",
                "burst starts/s",
                "starter CPU ms per start",
            )
        )
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {rate:.0f} | {rate / base:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
