"""A shard's in-memory view of its soon-due tasks, ordered by due time."""

from __future__ import annotations

import heapq
from datetime import datetime

from scheduling.clock import to_epoch


class FireTimer:
    """Holds (due, task id); a task's latest due time wins, stale heap
    entries are skipped lazily."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._due: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, task_id: int) -> bool:
        return task_id in self._due

    def add(self, task_id: int, due_at: datetime) -> None:
        due = to_epoch(due_at)
        if self._due.get(task_id) == due:
            return
        self._due[task_id] = due
        heapq.heappush(self._heap, (due, task_id))

    def discard(self, task_id: int) -> None:
        self._due.pop(task_id, None)

    def pop_due(self, *, now: datetime, lead_s: float = 0.0, limit: int | None = None) -> list[int]:
        """Task ids due by ``now + lead_s``, earliest first."""
        horizon = to_epoch(now) + lead_s
        due: list[int] = []
        while self._heap and self._heap[0][0] <= horizon:
            if limit is not None and len(due) >= limit:
                break
            at, task_id = heapq.heappop(self._heap)
            if self._due.get(task_id) == at:
                del self._due[task_id]
                due.append(task_id)
        return due

    def seconds_until_next(
        self, *, now: datetime, lead_s: float = 0.0, cap_s: float = 1.0
    ) -> float:
        """How long to sleep: until the next task is due, never more than
        ``cap_s`` (a long epoll wait can wake late by tens of ms)."""
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        if not self._heap:
            return cap_s
        wait = self._heap[0][0] - lead_s - to_epoch(now)
        return max(0.0, min(cap_s, wait))
