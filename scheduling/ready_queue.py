"""The dispatcher's heap: highest priority first, then earliest due, then FIFO."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from typing import TypeVar

from scheduling.clock import to_epoch
from scheduling.models import TaskSpec

Slot = TypeVar("Slot")


class ReadyQueue:
    """A heap keyed by (-priority, due, seq) that ignores a (task, attempt)
    it already holds, so a replayed hand-over cannot queue a task twice."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, TaskSpec]] = []
        self._keys: set[tuple[int, int]] = set()
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._keys

    def push(self, spec: TaskSpec) -> bool:
        if spec.key in self._keys:
            return False
        self._keys.add(spec.key)
        heapq.heappush(self._heap, (-spec.priority, to_epoch(spec.due_at), next(self._seq), spec))
        return True

    def push_many(self, specs: Iterable[TaskSpec]) -> int:
        return sum(self.push(spec) for spec in specs)

    def remove(self, keys: set[tuple[int, int]]) -> int:
        """Drop these attempts if they are waiting here."""
        present = keys & self._keys
        if present:
            self._heap = [entry for entry in self._heap if entry[3].key not in present]
            heapq.heapify(self._heap)
            self._keys -= present
        return len(present)

    def take(
        self, place: Callable[[TaskSpec], Slot | None], *, scan_limit: int = 1000
    ) -> list[tuple[TaskSpec, Slot]]:
        """Pop tasks in order and offer each to ``place``; a task it cannot
        place (its tiers are full) is kept, and the scan moves on so that a
        full large tier does not block small tasks behind it."""
        placed: list[tuple[TaskSpec, Slot]] = []
        kept: list[tuple[int, float, int, TaskSpec]] = []
        scanned = 0
        while self._heap and scanned < scan_limit:
            entry = heapq.heappop(self._heap)
            scanned += 1
            slot = place(entry[3])
            if slot is None:
                kept.append(entry)
            else:
                self._keys.discard(entry[3].key)
                placed.append((entry[3], slot))
        for entry in kept:
            heapq.heappush(self._heap, entry)
        return placed
