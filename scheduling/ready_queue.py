"""The dispatcher's queue: highest effective priority first, then FIFO.

A waiting task ages: it gains one priority level per ``aging_s`` seconds past
its due time, so a stream of escalated retries cannot starve new work. With
priority worth ``aging_s`` seconds, the effective order is the fixed key
``due - priority * aging_s``: no re-sorting as time passes."""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

from scheduling.clock import to_epoch
from scheduling.models import TaskSpec
from scheduling.placement import FreeSlots

Slot = TypeVar("Slot", bound=Hashable)


class ReadyQueue:
    """Heaps keyed by (due - priority·aging_s, seq), one per tier rank, that
    ignore a (task, attempt) already held, so a replayed hand-over cannot
    queue a task twice. The order across ranks is the one global order: a
    pass takes the smallest key among the heaps whose rank has room."""

    def __init__(self, *, aging_s: float = 30.0, rank_of: Callable[[int], int] = lambda p: 0):
        self._heaps: dict[int, list[tuple[float, int, TaskSpec]]] = {}
        self._keys: set[tuple[int, int]] = set()
        self._seq = itertools.count()
        self._aging_s = aging_s
        self._rank_of = rank_of  # priority → the weakest tier rank that may run it
        self._depth: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._keys

    def push(self, spec: TaskSpec) -> bool:
        if spec.key in self._keys:
            return False
        self._keys.add(spec.key)
        self._depth[spec.priority] += 1
        key = to_epoch(spec.due_at) - spec.priority * self._aging_s
        heap = self._heaps.setdefault(self._rank_of(spec.priority), [])
        heapq.heappush(heap, (key, next(self._seq), spec))
        return True

    def depth_by_priority(self) -> dict[int, int]:
        return {p: n for p, n in self._depth.items() if n}

    def push_many(self, specs: Iterable[TaskSpec]) -> int:
        return sum(self.push(spec) for spec in specs)

    def remove(self, keys: set[tuple[int, int]]) -> set[tuple[int, int]]:
        """Drop these attempts if they are waiting here; returns those that were."""
        present = keys & self._keys
        if present:
            for rank, heap in self._heaps.items():
                for entry in heap:
                    if entry[2].key in present:
                        self._depth[entry[2].priority] -= 1
                self._heaps[rank] = [entry for entry in heap if entry[2].key not in present]
                heapq.heapify(self._heaps[rank])
            self._keys -= present
        return present

    def take(self, free: FreeSlots[Slot]) -> list[tuple[TaskSpec, Slot]]:
        """Pop tasks in order while some queued task's rank has a free slot
        (``free``, reserved as tasks are placed); stops as soon as none has.
        A task whose tiers are full stays queued without being looked at, so a
        full large tier does not block small tasks behind it."""
        placed: list[tuple[TaskSpec, Slot]] = []
        while True:
            strongest = free.strongest()
            if strongest is None:
                return placed
            heads = [
                (heap[0], rank) for rank, heap in self._heaps.items() if heap and rank <= strongest
            ]
            if not heads:
                return placed
            (_, _, spec), rank = min(heads, key=lambda head: head[0][:2])
            slot = free.reserve(rank)
            if slot is None:  # cannot happen: strongest covers this rank
                return placed
            heapq.heappop(self._heaps[rank])
            self._keys.discard(spec.key)
            self._depth[spec.priority] -= 1
            placed.append((spec, slot))
