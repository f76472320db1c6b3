"""What happens to a task after an attempt: done, retried, or dead."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from scheduling.models import FailureClass, TaskStatus


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    priority_cap: int = 9
    jitter: bool = False  # full jitter (uniform in [0, backoff]) when on

    def backoff_s(self, failed_attempt: int, *, rng: random.Random | None = None) -> float:
        """Exponential: base, 2·base, 4·base … after attempts 1, 2, 3 …"""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (failed_attempt - 1))
        if self.jitter:
            return (rng or random).uniform(0, ceiling)
        return ceiling


@dataclass(frozen=True, kw_only=True)
class Outcome:
    status: TaskStatus  # SUCCEEDED, DEAD, or SCHEDULED for a retry
    attempt: int
    priority: int
    execute_at: datetime | None = None  # the retry's due time


def after_attempt(
    *,
    attempt: int,
    max_attempts: int,
    priority: int,
    failure: FailureClass | None,
    policy: RetryPolicy,
    now: datetime,
) -> Outcome:
    if failure is None:
        return Outcome(status=TaskStatus.SUCCEEDED, attempt=attempt, priority=priority)
    if attempt >= max_attempts:
        return Outcome(status=TaskStatus.DEAD, attempt=attempt, priority=priority)
    return Outcome(
        status=TaskStatus.SCHEDULED,
        attempt=attempt + 1,
        priority=min(priority + 1, policy.priority_cap),
        execute_at=now + timedelta(seconds=policy.backoff_s(attempt)),
    )
