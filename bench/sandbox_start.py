"""What each network policy costs a script's start, against today's
launcher with the host's network (the floor), in the same command.

For each policy, through the executor's own launch path
(``actors.sandbox.run_script``): due → the script's first line
(``$EPOCHREALTIME``) for scripts started one at a time, and the rate of a
burst started 8 at a time. The policies take turns within each round; the
summary is the median of the rounds.

    .venv/bin/python -m bench.sandbox_start [--starts 200] [--burst 500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import replace

from actors.network import ControlPlane, remove_egress_filter
from actors.sandbox import SandboxLimits, prepare_network
from bench import floor
from scheduling.tiers import NetworkPolicy

POLICIES = (NetworkPolicy.HOST, NetworkPolicy.EGRESS, NetworkPolicy.NONE)
# A range of its own, so a deployment on this host keeps its filter as it is.
BENCH_LIMITS = SandboxLimits(uid_base=700_000_000, uid_count=64)
BENCH_CHAIN_PLANE = ControlPlane(
    addresses=frozenset({"127.0.0.1", "::1"}), ports=frozenset({5432, 6379, 8000, 8265})
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_round(args, limits_of: dict[NetworkPolicy, SandboxLimits]) -> dict[str, float]:
    figures: dict[str, float] = {}
    for policy, limits in limits_of.items():
        lags = floor.spread(args.starts, args.starts * 0.02, 1, limits=limits)
        figures[f"{policy.value}: start p50 ms"] = percentile(lags, 0.5)
        figures[f"{policy.value}: start p99 ms"] = percentile(lags, 0.99)
        figures[f"{policy.value}: burst starts/s"] = floor.burst(args.burst, 8, limits=limits)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=200, help="one at a time, 20 ms apart")
    parser.add_argument("--burst", type=int, default=500, help="due at one instant, 8 at a time")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the sandbox's namespaces, uids and packet filter need root")
    limits_of = {p: replace(BENCH_LIMITS, network=p) for p in POLICIES}
    for policy, limits in limits_of.items():
        print(f"{policy.value}: {prepare_network(limits, BENCH_CHAIN_PLANE)}")
    egress = limits_of[NetworkPolicy.EGRESS].uid_range()
    assert egress is not None
    try:
        rounds = []
        for turn in range(args.repeat):
            rounds.append(one_round(args, limits_of))
            print(f"round {turn + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in rounds[-1].items()))
    finally:
        remove_egress_filter(*egress)
    print(f"\nmedian of {args.repeat} rounds; the floor is `host` (today's launcher)\n")
    print("| policy | start p50 ms | start p99 ms | burst starts/s | burst vs host |")
    print("|---|---|---|---|---|")
    base = statistics.median(r["host: burst starts/s"] for r in rounds)
    for policy in POLICIES:
        name = policy.value
        p50, p99, rate = (
            statistics.median(r[f"{name}: {figure}"] for r in rounds)
            for figure in ("start p50 ms", "start p99 ms", "burst starts/s")
        )
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {rate:.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
