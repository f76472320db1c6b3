"""Each user's caps (active tasks, live schedules), checked against counts
kept here rather than a ``COUNT(*)`` per request: with a million active
tasks that count cost 130-220 ms on every submission.

An owner's counts are read from the database at most once per
``refresh_s`` while a submission leaves them well below a cap (by one
caller: concurrent ones go on with the kept counts meanwhile), and what
this process admitted since is added to them; within ``near`` of a cap
every check counts again, so a cap holds exactly where it binds. Between
reads, what other API replicas admitted is not seen: far from a cap that
may admit up to their submissions of ``refresh_s`` more, never past it
once counted near it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from scheduling.errors import RateLimited

CAP_RETRY_AFTER_S = 30.0  # active work drains in about this long; a guess to space retries


@dataclass
class _Counts:
    active: int
    live: int
    read_at: float
    refreshing: bool = False  # one caller is counting again; the others use these


class Caps:
    def __init__(
        self,
        count: Callable[[int], tuple[int, int]],
        *,
        max_active_tasks: int,
        max_schedules: int,
        refresh_s: float = 2.0,
        near: float = 0.9,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count = count  # owner -> (active tasks, live schedules), from the database
        self.max_active_tasks, self.max_schedules = max_active_tasks, max_schedules
        self._refresh_s, self._near = refresh_s, near
        self._monotonic = monotonic
        self._counts: dict[int, _Counts] = {}
        self._lock = threading.Lock()  # checks run on worker threads
        self.reads = 0  # database counts made, for tests and metrics

    def admit_cached(self, owner_id: int, *, tasks: int = 0, schedules: int = 0) -> bool:
        """Admit this submission from the kept counts when they are fresh and
        it leaves them well below the caps; False: ``check`` must count."""
        with self._lock:
            known = self._counts.get(owner_id)
            if known is None or self._near_cap(known, tasks, schedules):
                return False
            if self._stale(known) and not known.refreshing:
                known.refreshing = True  # this caller counts; concurrent ones need not
                return False
            self._admit(known, tasks, schedules)
            return True

    def check(self, owner_id: int, *, tasks: int = 0, schedules: int = 0) -> None:
        """Count the owner's tasks and schedules in the database; 429 when
        this submission would take them past a cap, else admit it."""
        try:
            active, live = self._count(owner_id)
        except BaseException:
            with self._lock:
                if (known := self._counts.get(owner_id)) is not None:
                    known.refreshing = False  # the next caller counts instead
            raise
        with self._lock:
            self.reads += 1
            known = self._counts[owner_id] = _Counts(active, live, self._monotonic())
            self._admit(known, tasks, schedules)

    def _admit(self, known: _Counts, tasks: int, schedules: int) -> None:
        if tasks and known.active + tasks > self.max_active_tasks:
            raise RateLimited(
                f"{known.active} active tasks; the cap is {self.max_active_tasks}",
                "tasks",
                CAP_RETRY_AFTER_S,
            )
        if schedules and known.live + schedules > self.max_schedules:
            raise RateLimited(
                f"{known.live} schedules; the cap is {self.max_schedules}",
                "schedules",
                CAP_RETRY_AFTER_S,
            )
        known.active += tasks
        known.live += schedules

    def _stale(self, known: _Counts) -> bool:
        return self._monotonic() - known.read_at > self._refresh_s

    def _near_cap(self, known: _Counts, tasks: int, schedules: int) -> bool:
        return bool(
            (tasks and known.active + tasks > self._near * self.max_active_tasks)
            or (schedules and known.live + schedules > self._near * self.max_schedules)
        )
