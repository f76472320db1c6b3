"""The console's figures from plain records: percentiles and a fire-lag
series over time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class LagBin:
    start: datetime
    fires: int
    p50_ms: float | None
    p99_ms: float | None


def bin_starts(since: datetime, until: datetime, bin_s: float) -> list[datetime]:
    """The start of each bin of ``bin_s`` from ``since`` (at least one)."""
    count = max(1, math.ceil((until - since).total_seconds() / bin_s))
    return [since + timedelta(seconds=i * bin_s) for i in range(count)]


def lag_series(
    starts: Sequence[tuple[datetime, float]], *, since: datetime, until: datetime, bin_s: float
) -> list[LagBin]:
    """Starts (time, lag ms) grouped into bins of ``bin_s`` from ``since``:
    each bin's count and lag p50/p99 (None in a bin without starts)."""
    bins: list[list[float]] = [[] for _ in bin_starts(since, until, bin_s)]
    for at, lag_ms in starts:
        index = int((at - since).total_seconds() // bin_s)
        if 0 <= index < len(bins):
            bins[index].append(lag_ms)
    return [
        LagBin(start, len(lags), percentile(lags, 50), percentile(lags, 99))
        for start, lags in zip(bin_starts(since, until, bin_s), bins, strict=True)
    ]


@dataclass(frozen=True)
class LagFigures:
    """The fires of a window: how many, their lag p50/p99, and per bin."""

    fires: int
    p50_ms: float | None
    p99_ms: float | None
    series: list[LagBin]


def lag_figures(
    starts: Sequence[tuple[datetime, float]], *, since: datetime, until: datetime, bin_s: float
) -> LagFigures:
    lags = [lag for _, lag in starts]
    return LagFigures(
        fires=len(lags),
        p50_ms=percentile(lags, 50),
        p99_ms=percentile(lags, 99),
        series=lag_series(starts, since=since, until=until, bin_s=bin_s),
    )
