"""What the benchmarks print: percentiles, and the median of several runs
beside the floor's with their ratio."""

from __future__ import annotations

import statistics


def percentile(values: list[float], q: float) -> float:
    """The value at ``q`` percent of the sorted values (rounded rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def median_table(runs: list[dict[str, float]], floors: list[dict[str, float]]) -> None:
    """One row per figure: the median of the runs (each run's value in
    brackets), the floor's median and the ratio where the floor has it."""
    print("| figure | chronoray | floor | chronoray / floor |")
    print("|---|---|---|---|")
    for name in runs[0]:
        values = [run[name] for run in runs]
        ours = statistics.median(values)
        shown = f"{ours:.1f} ({', '.join(f'{v:.1f}' for v in values)})"
        if name in floors[0]:
            base = statistics.median(floor[name] for floor in floors)
            print(f"| {name} | {shown} | {base:.1f} | {ours / base:.2f} |")
        else:
            print(f"| {name} | {shown} | — | — |")
