"""Time buckets, ranges and the shard wheel (DESIGN.md, time-range sharding).

Time is cut into 10 s buckets and ``range_s`` ranges; range ``r`` belongs to
shard ``r % num_shards``. Because ``range_s`` is a multiple of the bucket, a
task's range is ``bucket // range_s``, which SQL can compute from the stored
bucket alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from scheduling.clock import to_epoch

BUCKET_S = 10


def bucket_of(at: datetime) -> int:
    """Epoch seconds of the 10 s bucket that holds ``at``."""
    return math.floor(to_epoch(at) / BUCKET_S) * BUCKET_S


@dataclass(frozen=True, kw_only=True)
class Wheel:
    num_shards: int
    range_s: int = 60

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError("num_shards must be at least 1")
        if self.range_s < BUCKET_S or self.range_s % BUCKET_S:
            raise ValueError(f"range_s must be a positive multiple of {BUCKET_S}")

    def range_of(self, at: datetime) -> int:
        return bucket_of(at) // self.range_s

    def shard_of(self, at: datetime) -> int:
        return self.range_of(at) % self.num_shards

    def shard_of_bucket(self, bucket: int) -> int:
        return (bucket // self.range_s) % self.num_shards
