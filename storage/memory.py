"""InMemoryTaskRepository: the same contract as SqlTaskRepository, in a
process, for unit tests of the actors' plain classes. tests/contract runs
one suite over both so the fake cannot drift from the real thing."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone

from scheduling.errors import (
    BatchRejected,
    ChronorayError,
    IdempotencyConflict,
    ScriptInUse,
    ScriptNotFound,
    TaskNotCancellable,
    TaskNotFound,
    TaskNotRetryable,
    TokenNotFound,
    UserNotFound,
)
from scheduling.lifecycle import RetryPolicy, after_attempt, may_have_started, running_lease
from scheduling.models import (
    IN_FLIGHT_STATUSES,
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
from scheduling.tiers import TierTable
from scheduling.timeline import Wheel, bucket_of
from storage.repository import Claimed, OutcomeHook, TaskQuery, sha256_hex, tail

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class InMemoryTaskRepository:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.users: dict[int, tuple[str, str]] = {}
        self.tokens: dict[int, tuple[ApiToken, str]] = {}  # id: (record, hash)
        self.deleted_scripts: set[int] = set()
        self.scripts: dict[int, tuple[Script, bytes]] = {}
        self.tasks: dict[int, Task] = {}
        self.request_hashes: dict[int, str | None] = {}
        self.requests: dict[str, int] = {}  # request_id -> the task it stored
        self.runs: dict[tuple[int, int], Run] = {}
        self.shard_epochs: dict[int, int] = {}

    tracks_writes = False  # no replicas: every read sees every write

    def ping(self) -> None:
        return None

    def note_write(self, owner_id: int) -> None:
        return None

    def ensure_user(self, *, first_name: str, last_name: str, now: datetime) -> int:
        for user_id, names in self.users.items():
            if names == (first_name, last_name):
                return user_id
        user_id = next(self._ids)
        self.users[user_id] = (first_name, last_name)
        return user_id

    def _versions(self, owner_id: int, name: str, *, deleted: bool = False) -> list[Script]:
        return sorted(
            (
                s
                for s, _ in self.scripts.values()
                if (s.owner_id, s.name) == (owner_id, name)
                and (deleted or s.script_id not in self.deleted_scripts)
            ),
            key=lambda s: -s.version,
        )

    def _latest(self, owner_id: int, name: str) -> Script | None:
        versions = self._versions(owner_id, name)
        return versions[0] if versions else None

    def list_scripts(self, *, owner_id: int) -> list[Script]:
        names = sorted({s.name for s, _ in self.scripts.values() if s.owner_id == owner_id})
        return [latest for n in names if (latest := self._latest(owner_id, n)) is not None]

    def script_versions(self, *, owner_id: int, name: str) -> list[Script]:
        versions = self._versions(owner_id, name)
        if not versions:
            raise ScriptNotFound(f"no script named {name!r}", "script")
        return versions

    def delete_script(self, *, owner_id: int, name: str, now: datetime) -> int:
        ids = {s.script_id for s in self._versions(owner_id, name)}
        if not ids:
            raise ScriptNotFound(f"no script named {name!r}", "script")
        pending = sum(
            1 for t in self.tasks.values() if t.script_id in ids and not t.status.is_final
        )
        if pending:
            raise ScriptInUse(f"script {name!r} is used by {pending} pending tasks", "script")
        self.deleted_scripts |= ids
        return len(ids)

    # -- users and tokens ---------------------------------------------------
    def add_user(self, *, first_name: str, last_name: str, now: datetime) -> User:
        user_id = next(self._ids)
        self.users[user_id] = (first_name, last_name)
        return self.get_user(user_id)

    def get_user(self, user_id: int) -> User:
        if user_id not in self.users:
            raise UserNotFound(f"no user {user_id}", "user_id")
        first, last = self.users[user_id]
        return User(user_id=user_id, first_name=first, last_name=last, created_at=EPOCH)

    def list_users(self) -> list[User]:
        return [self.get_user(user_id) for user_id in sorted(self.users)]

    def add_token(self, *, user_id: int, token_hash: str, label: str, now: datetime) -> ApiToken:
        self.get_user(user_id)
        token = ApiToken(token_id=next(self._ids), user_id=user_id, label=label, created_at=now)
        self.tokens[token.token_id] = (token, token_hash)
        return token

    def revoke_token(self, token_id: int, *, now: datetime) -> ApiToken:
        if token_id not in self.tokens:
            raise TokenNotFound(f"no token {token_id}", "token_id")
        token, digest = self.tokens[token_id]
        if token.revoked_at is None:
            token = replace(token, revoked_at=now)
            self.tokens[token_id] = (token, digest)
        return token

    def user_for_token(self, token_hash: str) -> int | None:
        for token, digest in self.tokens.values():
            if digest == token_hash and token.revoked_at is None:
                return token.user_id
        return None

    def count_active(self, owner_id: int) -> tuple[int, int]:
        active = sum(
            1 for t in self.tasks.values() if t.owner_id == owner_id and not t.status.is_final
        )
        return active, 0

    def add_script(
        self, *, owner_id: int, name: str, interpreter: Interpreter, body: bytes, now: datetime
    ) -> tuple[Script, bool]:
        digest = sha256_hex(body)
        latest = self._latest(owner_id, name)
        if latest is not None and latest.sha256 == digest and latest.interpreter is interpreter:
            return latest, False
        script = Script(
            script_id=next(self._ids),
            owner_id=owner_id,
            name=name,
            version=1
            + max((s.version for s in self._versions(owner_id, name, deleted=True)), default=0),
            sha256=digest,
            interpreter=interpreter,
            size_bytes=len(body),
            created_at=now,
        )
        self.scripts[script.script_id] = (script, body)
        return script, True

    def get_script(self, *, owner_id: int, name: str, version: int | None = None) -> Script:
        versions = self._versions(owner_id, name)
        if version is not None:
            versions = [s for s in versions if s.version == version]
        script = versions[0] if versions else None
        if script is None:
            raise ScriptNotFound(f"no script named {name!r}", "script")
        return script

    def get_script_body(self, script_id: int) -> bytes:
        if script_id not in self.scripts:
            raise ScriptNotFound(f"no script with id {script_id}", "script_id")
        return self.scripts[script_id][1]

    def add_tasks(
        self, new_tasks: Sequence[NewTask], *, now: datetime, atomic: bool = False
    ) -> list[SubmitResult | ChronorayError]:
        if atomic:
            saved = dict(self.tasks), dict(self.request_hashes), dict(self.requests)
            results = self.add_tasks(new_tasks, now=now)
            failures = [(i, r) for i, r in enumerate(results) if isinstance(r, ChronorayError)]
            if failures:
                self.tasks, self.request_hashes, self.requests = saved
                raise BatchRejected(failures)
            return results
        results: list[SubmitResult | ChronorayError] = []
        for new in new_tasks:
            if new.request_id in self.requests:  # a replayed submission
                first = self.tasks[self.requests[new.request_id]]
                results.append(SubmitResult(task=first, created=False))
                continue
            script = self._latest(new.owner_id, new.script_name)
            if script is None:
                results.append(ScriptNotFound(f"no script named {new.script_name!r}", "script"))
                continue
            if new.idempotency_key is not None:
                first = next(
                    (
                        t
                        for t in self.tasks.values()
                        if (t.owner_id, t.idempotency_key) == (new.owner_id, new.idempotency_key)
                    ),
                    None,
                )
                if first is not None:
                    if self.request_hashes[first.task_id] != new.request_hash:
                        results.append(
                            IdempotencyConflict(
                                "idempotency key already used with a different request",
                                "idempotency_key",
                            )
                        )
                    else:
                        results.append(SubmitResult(task=first, created=False))
                    continue
            task = Task(
                task_id=next(self._ids),
                owner_id=new.owner_id,
                script_id=script.script_id,
                script_name=script.name,
                execute_at=new.execute_at,
                status=TaskStatus.SCHEDULED,
                priority=new.priority,
                attempt=1,
                max_attempts=new.max_attempts,
                variables=dict(new.variables),
                timeout_s=new.timeout_s,
                idempotency_key=new.idempotency_key,
                nominal_at=new.execute_at,
                created_at=now,
                updated_at=now,
            )
            self.tasks[task.task_id] = task
            self.request_hashes[task.task_id] = new.request_hash
            self.requests[new.request_id] = task.task_id
            results.append(SubmitResult(task=task, created=True))
        return results

    def get_task(self, task_id: int, *, owner_id: int | None = None) -> Task:
        task = self.tasks.get(task_id)
        if task is None or (owner_id is not None and task.owner_id != owner_id):
            raise TaskNotFound(f"no task {task_id}", "task_id")
        return task

    def list_runs(self, task_id: int) -> list[Run]:
        return sorted(
            (r for r in self.runs.values() if r.task_id == task_id), key=lambda r: r.attempt
        )

    def cancel_task(self, task_id: int, *, owner_id: int | None, now: datetime) -> Task:
        task = self.get_task(task_id, owner_id=owner_id)
        if task.status is TaskStatus.CANCELLED:
            return task
        if task.status is not TaskStatus.SCHEDULED:
            raise TaskNotCancellable(
                f"task {task_id} is {task.status.value}; only scheduled tasks can be cancelled",
                "task_id",
            )
        task = self.tasks[task_id] = replace(task, status=TaskStatus.CANCELLED, updated_at=now)
        return task

    def list_tasks(self, query: TaskQuery) -> list[Task]:
        found = sorted(
            (t for t in self.tasks.values() if query.matches(t)), key=lambda t: -t.task_id
        )
        return found[: query.limit]

    def redrive(self, task_id: int, *, owner_id: int | None, attempts: int, now: datetime) -> Task:
        task = self.get_task(task_id, owner_id=owner_id)
        if task.status is not TaskStatus.DEAD:
            raise TaskNotRetryable(
                f"task {task_id} is {task.status.value}; only dead tasks can be retried",
                "task_id",
            )
        task = self.tasks[task_id] = replace(
            task,
            status=TaskStatus.SCHEDULED,
            attempt=task.attempt + 1,
            max_attempts=task.attempt + attempts,
            execute_at=now,
            lease_expires_at=None,
            updated_at=now,
        )
        return task

    def start_shard(self, shard: int, *, now: datetime) -> int:
        self.shard_epochs[shard] = self.shard_epochs.get(shard, 0) + 1
        return self.shard_epochs[shard]

    def shard_epoch(self, shard: int) -> int | None:
        return self.shard_epochs.get(shard)

    def _owned(self, wheel: Wheel, shard: int) -> list[Task]:
        return [
            t
            for t in self.tasks.values()
            if wheel.shard_of_bucket(bucket_of(t.execute_at)) == shard
        ]

    def due_tasks(
        self, *, wheel: Wheel, shard: int, before: datetime, limit: int
    ) -> list[tuple[int, datetime]]:
        due = sorted(
            (
                t
                for t in self._owned(wheel, shard)
                if t.status is TaskStatus.SCHEDULED and t.execute_at <= before
            ),
            key=lambda t: t.execute_at,
        )
        return [(t.task_id, t.execute_at) for t in due[:limit]]

    def _spec(self, task: Task, shard: int) -> TaskSpec:
        script = self.scripts[task.script_id][0]
        return TaskSpec(
            task_id=task.task_id,
            attempt=task.attempt,
            epoch=task.epoch,
            shard=shard,
            priority=task.priority,
            due_at=task.execute_at,
            script_id=task.script_id,
            script_sha256=script.sha256,
            interpreter=script.interpreter,
            variables=dict(task.variables),
            timeout_s=task.timeout_s,
            nominal_at=task.nominal_at,
        )

    def claim(
        self,
        task_ids: Sequence[int],
        *,
        shard: int,
        epoch: int,
        lease_until: datetime,
        now: datetime,
    ) -> Claimed:
        """One-shot tasks only: schedules live in SQL (tests/contract covers
        them on SQLite and PostgreSQL)."""
        if self.shard_epochs.get(shard) != epoch:
            return Claimed([])
        claimed = []
        for task_id in task_ids:
            task = self.tasks.get(task_id)
            if task is None or task.status is not TaskStatus.SCHEDULED:
                continue
            task = self.tasks[task_id] = replace(
                task,
                status=TaskStatus.QUEUED,
                epoch=epoch,
                lease_expires_at=lease_until,
                updated_at=now,
            )
            claimed.append(self._spec(task, shard))
        return Claimed(sorted(claimed, key=lambda s: s.due_at))

    def _matches(self, task: Task | None, spec_or_result) -> bool:
        return (
            task is not None
            and task.attempt == spec_or_result.attempt
            and task.epoch == spec_or_result.epoch
        )

    def mark_running(
        self, specs: Sequence[TaskSpec], *, lease_grace_s: float, now: datetime
    ) -> list[tuple[int, int]]:
        started = []
        for spec in specs:
            task = self.tasks.get(spec.task_id)
            if self._matches(task, spec) and task.status is TaskStatus.QUEUED:
                self.tasks[spec.task_id] = replace(
                    task,
                    status=TaskStatus.RUNNING,
                    lease_expires_at=running_lease(spec, lease_grace_s=lease_grace_s, now=now),
                    updated_at=now,
                )
                started.append(spec.key)
        return started

    def record_results(
        self,
        results: Sequence[RunResult],
        *,
        policy: RetryPolicy,
        now: datetime,
        tiers: TierTable | None = None,
        on_outcome: OutcomeHook | None = None,
    ) -> list[tuple[int, datetime]]:
        retried = []
        for result in results:
            task = self.tasks.get(result.task_id)
            if not self._matches(task, result) or task.status not in IN_FLIGHT_STATUSES:
                continue
            outcome = after_attempt(
                attempt=result.attempt,
                max_attempts=task.max_attempts,
                priority=result.priority,
                failure=result.failure,
                policy=policy,
                now=now,
                lost_count=task.lost_count,
                tiers=tiers,
                started=may_have_started(result, task.status),
            )
            task = self.tasks[task.task_id] = replace(
                task,
                status=outcome.status,
                attempt=outcome.attempt,
                priority=outcome.priority,
                max_attempts=outcome.max_attempts,
                lost_count=outcome.lost_count,
                execute_at=outcome.execute_at or task.execute_at,
                lease_expires_at=None,
                updated_at=now,
            )
            self.runs[(result.task_id, result.attempt)] = Run(
                run_id=next(self._ids),
                task_id=result.task_id,
                attempt=result.attempt,
                priority=result.priority,
                executor_id=result.executor_id,
                tier=result.tier,
                node_id=result.node_id,
                due_at=result.due_at,
                started_at=result.started_at,
                finished_at=result.finished_at,
                exit_code=result.exit_code,
                output_tail=tail(result.output_tail),
                failure=result.failure,
            )
            if outcome.status is TaskStatus.SCHEDULED:
                retried.append((task.task_id, task.execute_at))
            if on_outcome is not None:
                on_outcome(result, outcome.status, task.schedule_id)
        return retried

    def stale_queued(
        self, *, wheel: Wheel, shard: int, now: datetime, lease_until: datetime, limit: int
    ) -> list[TaskSpec]:
        stale = [
            t
            for t in self._owned(wheel, shard)
            if t.status is TaskStatus.QUEUED and t.lease_expires_at and t.lease_expires_at < now
        ][:limit]
        for task in stale:
            self.tasks[task.task_id] = replace(task, lease_expires_at=lease_until)
        return [self._spec(t, shard) for t in stale]

    def running_specs(self, *, wheel: Wheel, limit: int) -> list[TaskSpec]:
        running = [t for t in self.tasks.values() if t.status is TaskStatus.RUNNING][:limit]
        return [self._spec(t, wheel.shard_of_bucket(bucket_of(t.execute_at))) for t in running]

    def queued_specs(self, *, wheel: Wheel, shard: int, limit: int) -> list[TaskSpec]:
        queued = sorted(
            (t for t in self._owned(wheel, shard) if t.status is TaskStatus.QUEUED),
            key=lambda t: t.execute_at,
        )
        return [self._spec(t, shard) for t in queued[:limit]]
