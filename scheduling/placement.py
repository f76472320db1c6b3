"""Free slots by tier, for one placement pass.

A task of tier rank ``r`` may run on its tier or a stronger one (rank >= r),
never a weaker one. So the tasks that can be placed at all are exactly those
whose rank is at most the strongest rank with a free slot: a pass asks this
index, and stops as soon as no queued task's rank is covered."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

Executor = TypeVar("Executor", bound=Hashable)


class FreeSlots(Generic[Executor]):
    """Built from (rank, executor, free slots) once per pass; each
    reservation costs O(tiers + executors of one tier)."""

    def __init__(self, entries: Iterable[tuple[int, Executor, int]]) -> None:
        # insertion order is kept: among equally free executors the first wins
        self._free: dict[int, dict[Executor, int]] = {}
        for rank, executor, free in entries:
            if free > 0:
                self._free.setdefault(rank, {})[executor] = free

    def __bool__(self) -> bool:
        return bool(self._free)

    def strongest(self) -> int | None:
        """The strongest rank with a free slot: every task of this rank or a
        weaker one can be placed; none of a stronger one."""
        return max(self._free) if self._free else None

    def reserve(self, rank: int) -> Executor | None:
        """A slot for a task of ``rank``: the weakest eligible tier with room,
        then its least busy executor (the most free slots)."""
        eligible = [r for r in self._free if r >= rank]
        if not eligible:
            return None
        weakest = min(eligible)
        executors = self._free[weakest]
        chosen = max(executors, key=executors.__getitem__)
        executors[chosen] -= 1
        if not executors[chosen]:
            del executors[chosen]
            if not executors:
                del self._free[weakest]
        return chosen
