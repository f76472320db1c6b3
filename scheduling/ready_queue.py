"""The dispatcher's heap: highest effective priority first, then FIFO.

A waiting task ages: it gains one priority level per ``aging_s`` seconds past
its due time, so a stream of escalated retries cannot starve new work. With
priority worth ``aging_s`` seconds, the effective order is the fixed key
``due - priority * aging_s``: no re-sorting as time passes."""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TypeVar

from scheduling.clock import to_epoch
from scheduling.models import TaskSpec

Slot = TypeVar("Slot")


class ReadyQueue:
    """A heap keyed by (due - priority·aging_s, seq) that ignores a (task,
    attempt) it already holds, so a replayed hand-over cannot queue a task
    twice."""

    def __init__(self, *, aging_s: float = 30.0) -> None:
        self._heap: list[tuple[float, int, TaskSpec]] = []
        self._keys: set[tuple[int, int]] = set()
        self._seq = itertools.count()
        self._aging_s = aging_s
        self._depth: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._keys

    def push(self, spec: TaskSpec) -> bool:
        if spec.key in self._keys:
            return False
        self._keys.add(spec.key)
        self._depth[spec.priority] += 1
        key = to_epoch(spec.due_at) - spec.priority * self._aging_s
        heapq.heappush(self._heap, (key, next(self._seq), spec))
        return True

    def depth_by_priority(self) -> dict[int, int]:
        return {p: n for p, n in self._depth.items() if n}

    def push_many(self, specs: Iterable[TaskSpec]) -> int:
        return sum(self.push(spec) for spec in specs)

    def remove(self, keys: set[tuple[int, int]]) -> set[tuple[int, int]]:
        """Drop these attempts if they are waiting here; returns those that were."""
        present = keys & self._keys
        if present:
            for entry in self._heap:
                if entry[2].key in present:
                    self._depth[entry[2].priority] -= 1
            self._heap = [entry for entry in self._heap if entry[2].key not in present]
            heapq.heapify(self._heap)
            self._keys -= present
        return present

    def take(
        self, place: Callable[[TaskSpec], Slot | None], *, scan_limit: int = 1000
    ) -> list[tuple[TaskSpec, Slot]]:
        """Pop tasks in order and offer each to ``place``; a task it cannot
        place (its tiers are full) is kept, and the scan moves on so that a
        full large tier does not block small tasks behind it."""
        placed: list[tuple[TaskSpec, Slot]] = []
        kept: list[tuple[float, int, TaskSpec]] = []
        scanned = 0
        while self._heap and scanned < scan_limit:
            entry = heapq.heappop(self._heap)
            scanned += 1
            spec = entry[2]
            slot = place(spec)
            if slot is None:
                kept.append(entry)
            else:
                self._keys.discard(spec.key)
                self._depth[spec.priority] -= 1
                placed.append((spec, slot))
        for entry in kept:
            heapq.heappush(self._heap, entry)
        return placed
