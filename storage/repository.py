"""What storage offers, one interface per concern its callers use: the
service (Repository = accounts, scripts, tasks, schedules), a shard
(ShardStore = submissions and the run path), executors and the dispatcher
(FiringStore). storage.sql implements them all.

Every status change is conditional on what the writer believes (status,
attempt, shard epoch), so a stale writer changes nothing and a replayed call
is harmless.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from scheduling.audit import Start
from scheduling.errors import ChronorayError
from scheduling.figures import LagFigures
from scheduling.lifecycle import RetryPolicy
from scheduling.models import (
    ApiToken,
    Interpreter,
    NewTask,
    Run,
    RunResult,
    Script,
    SubmitResult,
    Task,
    TaskSpec,
    TaskStatus,
    User,
)
from scheduling.schedules import NewSchedule, OverlapPolicy, Schedule
from scheduling.tiers import TierTable
from scheduling.timeline import Wheel

MAX_OUTPUT_TAIL_CHARS = 4096


# Told of each attempt's outcome as it is applied: the result, the task's new
# status and its schedule (None for a one-shot task). Metrics listen here.
OutcomeHook = Callable[[RunResult, TaskStatus, "int | None"], None]


@dataclass(frozen=True)
class Claimed:
    """What a claim fired: attempts to hand over, schedule occurrences it
    created (to watch), and attempts a cancel_previous policy stopped."""

    specs: list[TaskSpec]
    follow_ups: list[tuple[int, datetime]] = field(default_factory=list)
    cancelled: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class TaskQuery:
    """One page of a user's tasks, newest first; every filter optional."""

    owner_id: int
    statuses: frozenset[TaskStatus] = frozenset()
    script_name: str | None = None
    schedule_id: int | None = None
    due_from: datetime | None = None  # execute_at >= due_from
    due_before: datetime | None = None  # execute_at < due_before
    below_id: int | None = None  # the cursor: only tasks with a smaller id
    limit: int = 100


class Accounts(Protocol):
    """Users, tokens, and the counts behind the caps (the service)."""

    def ensure_user(self, *, first_name: str, last_name: str, now: datetime) -> int: ...
    def add_user(self, *, first_name: str, last_name: str, now: datetime) -> User: ...
    def get_user(self, user_id: int) -> User: ...
    def list_users(self) -> list[User]: ...
    def add_token(
        self, *, user_id: int, token_hash: str, label: str, now: datetime
    ) -> ApiToken: ...
    def revoke_token(self, token_id: int, *, now: datetime) -> ApiToken: ...
    def user_for_token(self, token_hash: str) -> int | None: ...
    def count_active(self, owner_id: int) -> tuple[int, int]: ...


class ScriptStore(Protocol):
    """Versioned script bodies (the service; executors read bodies)."""

    def add_script(
        self, *, owner_id: int, name: str, interpreter: Interpreter, body: bytes, now: datetime
    ) -> tuple[Script, bool]: ...
    def get_script(self, *, owner_id: int, name: str, version: int | None = None) -> Script: ...
    def list_scripts(self, *, owner_id: int) -> list[Script]: ...
    def script_versions(self, *, owner_id: int, name: str) -> list[Script]: ...
    def delete_script(self, *, owner_id: int, name: str, now: datetime) -> int: ...
    def get_script_body(self, script_id: int) -> bytes: ...


class TaskStore(Protocol):
    """Submissions (the shards' group commit) and the user's queries and moves."""

    def add_tasks(
        self,
        new_tasks: Sequence[NewTask],
        *,
        now: datetime,
        atomic: bool = False,
        fresh: bool = False,  # request ids minted for this call: nothing to look up
    ) -> list[SubmitResult | ChronorayError]: ...
    def get_task(self, task_id: int, *, owner_id: int | None = None) -> Task: ...
    def list_runs(self, task_id: int) -> list[Run]: ...
    def cancel_task(self, task_id: int, *, owner_id: int | None, now: datetime) -> Task: ...
    def list_tasks(self, query: TaskQuery) -> list[Task]: ...
    def purge_finished(self, *, before: datetime, limit: int) -> int:
        """History retention: one batch of finished tasks (and their runs)
        older than ``before`` removed; how many tasks."""
        ...

    def redrive(
        self, task_id: int, *, owner_id: int | None, attempts: int, now: datetime
    ) -> Task: ...


class FiringStore(Protocol):
    """The run path: shards claim and record, executors pass the start gate,
    the dispatcher compares what runs."""

    def start_shard(self, shard: int, *, now: datetime) -> int: ...
    def shard_epoch(self, shard: int) -> int | None: ...
    def due_tasks(
        self, *, wheel: Wheel, shard: int, before: datetime, limit: int
    ) -> list[tuple[int, datetime]]: ...
    def claim(
        self,
        task_ids: Sequence[int],
        *,
        shard: int,
        epoch: int,
        lease_until: datetime,
        now: datetime,
    ) -> Claimed: ...
    def mark_running(
        self, specs: Sequence[TaskSpec], *, lease_grace_s: float, now: datetime
    ) -> list[tuple[int, int]]: ...
    def record_results(
        self,
        results: Sequence[RunResult],
        *,
        policy: RetryPolicy,
        now: datetime,
        tiers: TierTable | None = None,
        on_outcome: OutcomeHook | None = None,
    ) -> list[tuple[int, datetime]]: ...
    def warm_up(self, *, connections: int, now: datetime) -> None:
        """Open ``connections`` of the pool and build the start gate's and
        the results' statements, before the first run needs them."""
        ...

    def stale_queued(
        self, *, wheel: Wheel, shard: int, now: datetime, lease_until: datetime, limit: int
    ) -> list[TaskSpec]: ...
    def queued_specs(self, *, wheel: Wheel, shard: int, limit: int) -> list[TaskSpec]: ...
    def long_queued(
        self, *, wheel: Wheel, lease_ends_before: datetime, limit: int
    ) -> list[TaskSpec]: ...
    def running_specs(self, *, wheel: Wheel, limit: int) -> list[TaskSpec]: ...


class ScheduleStore(Protocol):
    """Schedules as the service uses them."""

    def add_schedule(
        self, new: NewSchedule, *, now: datetime
    ) -> tuple[Schedule, tuple[int, datetime] | None]: ...
    def get_schedule(self, schedule_id: int, *, owner_id: int | None) -> Schedule: ...
    def list_schedules(self, *, owner_id: int) -> list[Schedule]: ...
    def change_schedule(
        self, schedule_id: int, *, owner_id: int, changes: dict[str, Any], now: datetime
    ) -> tuple[Schedule, tuple[int, datetime] | None]: ...
    def delete_schedule(self, schedule_id: int, *, owner_id: int, now: datetime) -> None: ...
    def trigger_schedule(
        self, schedule_id: int, *, owner_id: int, now: datetime
    ) -> tuple[int, datetime]: ...
    def schedule_history(
        self, schedule_id: int, *, owner_id: int, limit: int = 100
    ) -> list[dict[str, Any]]: ...
    def backfill_schedule(
        self,
        schedule_id: int,
        *,
        owner_id: int,
        fires: Sequence[datetime],
        overlap: OverlapPolicy,
        now: datetime,
    ) -> list[tuple[int, datetime]]: ...
    def schedule_occurrences(
        self, schedule_ids: Sequence[int], *, owner_id: int, start: datetime, end: datetime
    ) -> tuple[dict[int, list[tuple[int, datetime, TaskStatus]]], dict[int, list[Start]]]: ...


@dataclass(frozen=True)
class ConsoleSession:
    """A console sign-in: only the session id's and the token's SHA-256 are stored."""

    session_hash: str
    token_hash: str | None  # None for the admin
    admin: bool
    csrf_token: str
    created_at: datetime
    expires_at: datetime


class ConsoleStore(Protocol):
    """The console's sign-ins and the figures its overview shows."""

    def task_counts(self, owner_id: int) -> dict[str, int]: ...
    def queued_by_priority(self, owner_id: int) -> dict[int, int]: ...
    def lag_figures(
        self, owner_id: int, *, since: datetime, until: datetime, bin_s: float
    ) -> LagFigures: ...
    def add_console_session(self, session: ConsoleSession) -> None: ...
    def console_session(self, session_hash: str, *, now: datetime) -> ConsoleSession | None: ...
    def end_console_session(self, session_hash: str) -> None: ...


class ShardStore(TaskStore, FiringStore, Protocol):
    """What a shard asks: its submissions' group commit and the run path."""


class Repository(Accounts, ScriptStore, TaskStore, ScheduleStore, ConsoleStore, Protocol):
    """Everything the service asks of storage."""

    tracks_writes: bool  # reads may go to replicas: note_write after a user's writes

    def ping(self) -> None: ...
    def note_write(self, owner_id: int) -> None: ...


def sha256_hex(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def tail(text: str, limit: int = MAX_OUTPUT_TAIL_CHARS) -> str:
    """The last ``limit`` characters of a script's output as text every
    backend stores: a script may print anything, and PostgreSQL refuses NUL
    and lone surrogates (one refused row would fail its whole batch)."""
    text = text[-limit:].encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text.replace("\x00", "\u2400")  # the visible symbol for NUL
