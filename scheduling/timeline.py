"""Time buckets, ranges and the shard wheel (DESIGN.md, time-range sharding).

Time is cut into 10 s buckets and ``range_s`` ranges; range ``r`` belongs to
shard ``r % num_shards``. Because ``range_s`` is a multiple of the bucket, a
task's range is ``bucket // range_s``, which SQL can compute from the stored
bucket alone.

A range's tasks are split into ``slices`` by task id, slice ``k`` owned by
the ``k``-th shard after the range's own: with as many slices as shards, a
burst due at one instant is claimed and fired by every shard at once, not by
one while the others idle. Submissions still go to the range's own shard
(``shard_of``), which tells each task's owner (``owner_of``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from scheduling.clock import to_epoch

BUCKET_S = 10


def bucket_of(at: datetime) -> int:
    """Epoch seconds of the 10 s bucket that holds ``at``."""
    return math.floor(to_epoch(at) / BUCKET_S) * BUCKET_S


def within_lookahead(
    entries: Iterable[tuple[int, datetime]], *, now: datetime, lookahead_s: float
) -> list[tuple[int, datetime]]:
    """The (task id, due) entries a shard's timer takes now: those due
    within its look-ahead window. Its sweeps find the rest in time, so a
    hint beyond it is work for nothing (a million future tasks made a
    million hints the shards dropped)."""
    horizon = now + timedelta(seconds=lookahead_s)
    return [(task_id, due_at) for task_id, due_at in entries if due_at <= horizon]


@dataclass(frozen=True, kw_only=True)
class Wheel:
    num_shards: int
    range_s: int = 60
    slices: int = 1  # shards a range's tasks are spread over, by task id

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError("num_shards must be at least 1")
        if not 1 <= self.slices <= self.num_shards:
            raise ValueError("slices must be between 1 and num_shards")
        if self.range_s < BUCKET_S or self.range_s % BUCKET_S:
            raise ValueError(f"range_s must be a positive multiple of {BUCKET_S}")

    def range_of(self, at: datetime) -> int:
        return bucket_of(at) // self.range_s

    def shard_of(self, at: datetime) -> int:
        """The range's own shard: where submissions due at ``at`` go."""
        return self.range_of(at) % self.num_shards

    def owner_of(self, task_id: int, at: datetime) -> int:
        """The shard that claims and fires this task."""
        return self.owner_in_bucket(task_id, bucket_of(at))

    def owner_in_bucket(self, task_id: int, bucket: int) -> int:
        return (bucket // self.range_s + task_id % self.slices) % self.num_shards
