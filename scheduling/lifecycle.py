"""The task state machine: which status a task may move to from which, and
what happens after an attempt (done, retried, or dead).

Storage applies these decisions as conditional updates (the row moves only
from a listed source status); it decides none of them. Each failure class
escalates in its own way (see ``after_attempt``)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from scheduling.models import IN_FLIGHT_STATUSES, FailureClass, RunResult, TaskSpec, TaskStatus
from scheduling.tiers import TierTable

# What scripts print when an allocation fails under the address-space limit.
MEMORY_SIGNS = (
    "MemoryError",
    "Cannot allocate memory",
    "xmalloc: cannot allocate",
    "std::bad_alloc",
)


def classify(
    *,
    exit_code: int | None,
    timed_out: bool,
    output_tail: str,
    launch_error: str | None,
    oom_killed: bool = False,
    oom_known: bool = False,
) -> FailureClass | None:
    """Why an attempt failed, from what the sandbox saw; ``None``: it succeeded.
    Memory: the run cgroup's OOM count rose (``oom_killed``), or, where runs
    have no cgroup, an allocation refused by the limit (the script says so)
    or a SIGKILL the executor did not send (the kernel's OOM killer). With a
    cgroup (``oom_known``), a SIGKILL without an OOM kill came from outside
    the run: Ray kills a worker's children as the worker exits, so this is
    the executor ending (``chronoray down``, or the pool removing one it
    declared dead), recorded as executor_lost, not as the script's failure."""
    if launch_error:
        return FailureClass.LAUNCH_ERROR
    if timed_out:
        return FailureClass.TIMEOUT
    if oom_killed:
        return FailureClass.MEMORY
    if exit_code == 0:
        return None
    if exit_code == -9 and oom_known:
        return FailureClass.EXECUTOR_LOST
    if exit_code == -9 or any(sign in output_tail for sign in MEMORY_SIGNS):
        return FailureClass.MEMORY
    return FailureClass.EXIT_CODE


@dataclass(frozen=True)
class Move:
    """A status change: made only while the task is in one of ``source``."""

    source: frozenset[TaskStatus]
    target: TaskStatus

    def allowed_from(self, status: TaskStatus) -> bool:
        return status in self.source


_S = TaskStatus
CLAIM = Move(frozenset({_S.SCHEDULED}), _S.QUEUED)  # a shard leases a due task
START = Move(frozenset({_S.QUEUED}), _S.RUNNING)  # the start gate, just before the script
CANCEL = Move(frozenset({_S.SCHEDULED}), _S.CANCELLED)  # a user, or a schedule changed
SKIP = Move(frozenset({_S.SCHEDULED}), _S.SKIPPED)  # a misfire or overlap policy
STOP = Move(IN_FLIGHT_STATUSES, _S.CANCELLED)  # overlap policy cancel_previous
REDRIVE = Move(frozenset({_S.DEAD}), _S.SCHEDULED)  # a user gives a dead task more attempts
# An attempt's result applies to a task in flight; ``after_attempt`` picks the target.
RESULT_SOURCE = IN_FLIGHT_STATUSES
RESULT_TARGETS = frozenset({_S.SUCCEEDED, _S.DEAD, _S.SCHEDULED})
# A success ends its task from any status a result applies to, and keeps the
# row's attempts, limits and loss count (``after_attempt``): it is decided
# without reading the row.
SUCCEED = Move(RESULT_SOURCE, _S.SUCCEEDED)
MOVES = (CLAIM, START, CANCEL, SKIP, STOP, REDRIVE)


def may_have_started(result: RunResult, status: TaskStatus) -> bool:
    """A run whose script started says so; a loss reported by others (the
    pool, a dispatcher's recovery) may have started once its start gate
    committed (running), never while the task was still queued."""
    return result.started_at is not None or status is TaskStatus.RUNNING


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    priority_cap: int = 9
    jitter: bool = True  # full jitter: uniform in [0, backoff]
    # Executor losses after the first do not use up the user's attempts, up
    # to this many (a script that kills its node must still end).
    max_free_losses: int = 5

    def backoff_s(self, failed_attempt: int, *, rng: random.Random | None = None) -> float:
        """Exponential: base, 2·base, 4·base … after attempts 1, 2, 3 …"""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** (failed_attempt - 1))
        if self.jitter:
            return (rng or random).uniform(0, ceiling)
        return ceiling


@dataclass(frozen=True, kw_only=True)
class Outcome:
    status: TaskStatus  # SUCCEEDED, DEAD, or SCHEDULED for a retry
    attempt: int
    priority: int
    max_attempts: int
    lost_count: int = 0
    execute_at: datetime | None = None  # the retry's due time


def escalated_priority(
    failure: FailureClass, priority: int, *, tiers: TierTable | None, cap: int
) -> int:
    """exit code / launch error: one step up. Timeout: the next stronger
    tier. Memory: the next tier with more memory for scripts. Executor lost:
    unchanged (the script did nothing wrong)."""
    if failure is FailureClass.EXECUTOR_LOST:
        return priority
    target = priority + 1
    if tiers is not None and failure is FailureClass.TIMEOUT:
        target = max(target, tiers.stronger_than(priority).min_priority)
    elif tiers is not None and failure is FailureClass.MEMORY:
        target = max(target, tiers.more_memory_than(priority).min_priority)
    return min(target, cap)


def after_attempt(
    *,
    attempt: int,
    max_attempts: int,
    priority: int,
    failure: FailureClass | None,
    policy: RetryPolicy,
    now: datetime,
    lost_count: int = 0,
    tiers: TierTable | None = None,
    rng: random.Random | None = None,
    started: bool = True,
) -> Outcome:
    """``started``: the script may have run (its RUNNING commit was made).
    Only such a run may use one of the user's attempts: an infrastructure
    loss before it is retried for free, and so is every loss after the
    first, up to ``policy.max_free_losses`` (a script that kills its node
    must still end)."""
    if failure is FailureClass.EXECUTOR_LOST:
        lost_count += 1
        free = not started or lost_count > 1
        if free and lost_count <= policy.max_free_losses + 1:
            max_attempts += 1
    if failure is None or attempt >= max_attempts:
        return Outcome(
            status=TaskStatus.SUCCEEDED if failure is None else TaskStatus.DEAD,
            attempt=attempt,
            priority=priority,
            max_attempts=max_attempts,
            lost_count=lost_count,
        )
    delay = 0.0 if failure is FailureClass.EXECUTOR_LOST else policy.backoff_s(attempt, rng=rng)
    return Outcome(
        status=TaskStatus.SCHEDULED,
        attempt=attempt + 1,
        priority=escalated_priority(failure, priority, tiers=tiers, cap=policy.priority_cap),
        max_attempts=max_attempts,
        lost_count=lost_count,
        execute_at=now + timedelta(seconds=delay),
    )


def after_redrive(*, attempt: int, attempts: int, priority: int, now: datetime) -> Outcome:
    """A dead task given ``attempts`` more: the next attempt, due now, at the
    priority it had reached."""
    return Outcome(
        status=REDRIVE.target,
        attempt=attempt + 1,
        priority=priority,
        max_attempts=attempt + attempts,
        execute_at=now,
    )


def lost_result(
    spec: TaskSpec,
    *,
    now: datetime,
    executor_id: str = "",
    tier: str = "",
    node_id: str = "",
    reason: str = "lease expired without a result",
) -> RunResult:
    """The result recorded for an attempt whose executor was lost: declared
    dead by the pool, or silent until the lease ran out."""
    return RunResult.of(
        spec,
        executor_id=executor_id,
        tier=tier,
        node_id=node_id,
        started_at=None,
        finished_at=now,
        exit_code=None,
        output_tail=reason,
        failure=FailureClass.EXECUTOR_LOST,
    )


def running_lease(spec: TaskSpec, *, lease_grace_s: float, now: datetime) -> datetime:
    """A running attempt's lease: its start plus timeout plus a grace period
    (the executor kills the script at the timeout, so a result comes before)."""
    start = max(now, spec.due_at)
    return start + timedelta(seconds=spec.timeout_s + lease_grace_s)
