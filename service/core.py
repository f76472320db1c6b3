"""The service: one method per API operation, holding its whole sequence
(validate, caps, store, tell the owner shards) and returning domain objects.
HTTP routes (serve_app), chronoray.Client and the console are its callers;
none of them repeats a step. Blocking repository calls run off the loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from chronoray.settings import Settings
from scheduling.audit import ONE_TICK, Audit, Occurrence, audit, fires_in_window
from scheduling.clock import Clock, SystemClock
from scheduling.cron import validate_schedule
from scheduling.errors import ChronorayError, InvalidInput, UnsupportedMediaType
from scheduling.figures import LagBin
from scheduling.models import (
    ApiToken,
    Interpreter,
    NewTask,
    Run,
    Script,
    SubmitResult,
    Task,
    TaskStatus,
    User,
)
from scheduling.schedules import Schedule
from scheduling.timeline import within_lookahead
from scheduling.validation import validate_script_name
from service.auth import Authenticator, Caller, ConsoleSessions, Viewer, issue_token
from service.caps import Caps
from service.requests import (
    BackfillIn,
    ScheduleIn,
    SchedulePatch,
    SendTaskIn,
    TaskIn,
    TokenIn,
    UserIn,
    media_type,
    parse_instant,
    task_query,
)
from service.steps import (
    bounded,
    local_user,
    new_batch,
    new_schedule,
    new_task,
    redrive,
    run_of,
    schedule_changes,
    store_batch,
    store_script,
    task_page,
    task_runs,
    upcoming_fires,
)
from storage.repository import Repository

T = TypeVar("T")
log = logging.getLogger(__name__)
RAW_SCRIPT_TYPES = frozenset(
    {
        "text/plain",
        "application/octet-stream",
        "text/x-shellscript",
        "text/x-sh",
        "application/x-sh",
        "text/x-python",
        "text/x-script.python",
    }
)


DEFAULT_LATE_S = 60.0  # the audit's default: a first start later than this is late


@dataclass(frozen=True)
class BackfillResult:
    schedule_id: int
    fires: list[datetime]  # every nominal time in the window
    created: list[int]  # tasks of the times that had no occurrence yet


@dataclass(frozen=True)
class Overview:
    at: datetime
    counts: dict[str, int]
    fires_last_hour: int
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    series: list[LagBin]
    queued_by_priority: dict[int, int]


def audit_window(
    schedule: Schedule, found: Sequence[Occurrence], *, start: datetime, end: datetime
) -> tuple[datetime, datetime]:
    """The part of [start, end) in which the schedule was meant to fire: not
    before it existed (or its start_at), not after its end_at; a paused
    schedule is audited up to its last occurrence (pauses are not recorded)."""
    begin = max(start, schedule.created_at, schedule.start_at or start)
    stop = end
    if schedule.end_at is not None:
        stop = min(stop, schedule.end_at + ONE_TICK)
    if schedule.paused:
        stop = min(stop, max((o.nominal_at for o in found), default=begin) + ONE_TICK)
    return begin, stop


@dataclass(frozen=True)
class TaskView:
    """A task and every attempt of it so far."""

    task: Task
    runs: list[Run]


class Router(Protocol):
    """Reaches the actors: actors.handles.ShardRouter, or a fake in unit tests."""

    async def submit(self, new_tasks: Sequence[NewTask]) -> list[SubmitResult | ChronorayError]: ...

    async def track(self, entries: Sequence[tuple[int, datetime]]) -> None: ...

    async def probe(self) -> dict[str, str]: ...

    async def executors(self) -> dict[str, Any]: ...

    async def metrics(self) -> dict[str, list[Any] | None]: ...

    async def mirror(self) -> dict[str, Any] | None: ...


class Service:
    def __init__(
        self,
        *,
        repo: Repository,
        router: Router,
        settings: Settings,
        clock: Clock | None = None,
    ) -> None:
        self.repo, self.router, self.settings = repo, router, settings
        self.clock = clock or SystemClock()
        self.auth = Authenticator(
            repo.user_for_token, admin_token=settings.admin_token, cache_s=settings.token_cache_s
        )
        self.sessions = ConsoleSessions(repo, repo, lifetime_s=settings.console_session_s)
        self.caps = Caps(
            repo.count_active,
            max_active_tasks=settings.max_active_tasks,
            max_schedules=settings.max_schedules,
        )

    async def _io(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(call, *args, **kwargs)

    async def _hint(self, entries: Sequence[tuple[int, datetime]]) -> None:
        """Tell the owner shards' timers about tasks just committed outside
        them. The commit is the answer: a shard that does not take the hint
        (down, restarting) finds them in its next sweep or on its start, so
        its failure must not turn a stored task into an error answer."""
        try:
            await self.router.track(entries)
        except Exception as exc:
            log.warning("%d committed tasks not hinted to their shards: %r", len(entries), exc)

    async def _check_caps(self, owner: int, *, tasks: int = 0, schedules: int = 0) -> None:
        """429 past a cap; counts in the database only when its kept counts
        are stale or near a cap (service/caps.py)."""
        if not self.caps.admit_cached(owner, tasks=tasks, schedules=schedules):
            await self._io(self.caps.check, owner, tasks=tasks, schedules=schedules)

    # -- who calls ------------------------------------------------------------
    async def caller(self, token: str) -> Caller:
        known = self.auth.cached(token)
        return known if known is not None else await self._io(self.auth.authenticate, token)

    # -- console sessions --------------------------------------------------------
    async def sign_in(self, token: str) -> tuple[str, Viewer]:
        """A token (a user's or the admin's) for a console session id."""
        caller = await self.caller(token)
        return await self._io(self.sessions.sign_in, caller, token, now=self.clock.now())

    async def viewer(self, session_id: str) -> Viewer:
        return await self._io(self.sessions.viewer, session_id, now=self.clock.now())

    async def sign_out(self, viewer: Viewer) -> None:
        await self._io(self.sessions.sign_out, viewer.session_hash)

    async def local_user(self) -> int:
        return await self._io(local_user, self.repo, now=self.clock.now())

    # -- users and tokens (admin) ----------------------------------------------
    async def create_user(self, body: UserIn) -> User:
        return await self._io(
            self.repo.add_user,
            first_name=body.first_name,
            last_name=body.last_name,
            now=self.clock.now(),
        )

    async def list_users(self) -> list[User]:
        return await self._io(self.repo.list_users)

    async def get_user(self, user_id: int) -> User:
        return await self._io(self.repo.get_user, user_id)

    async def issue_token(self, user_id: int, body: TokenIn) -> tuple[ApiToken, str]:
        """The record and the secret; the secret is never stored."""
        return await self._io(
            issue_token, self.repo, user_id=user_id, label=body.label, now=self.clock.now()
        )

    async def revoke_token(self, token_id: int) -> ApiToken:
        record = await self._io(self.repo.revoke_token, token_id, now=self.clock.now())
        self.auth.forget()
        return record

    async def me(self, owner: int) -> User:
        return await self.get_user(owner)

    # -- scripts ---------------------------------------------------------------
    async def upload_script(
        self, owner: int, name: str, body: bytes, interpreter: Interpreter = Interpreter.BASH
    ) -> tuple[Script, bool]:
        """A script, or a new version of it: (the version, whether it is new)."""
        return await self._io(
            store_script,
            self.repo,
            self.settings,
            owner_id=owner,
            name=name,
            interpreter=interpreter,
            body=body,
            now=self.clock.now(),
        )

    register_script = upload_script  # JSON or raw body: one operation underneath

    @staticmethod
    def check_raw_upload(name: str, content_type: str) -> None:
        """Before a raw body is read: the name and the content type."""
        validate_script_name(name, "name")
        if media_type(content_type) not in RAW_SCRIPT_TYPES:
            raise UnsupportedMediaType(
                f"send the script as text/plain or application/octet-stream, "
                f"not {content_type[:64]!r}",
                "content-type",
            )

    async def list_scripts(self, owner: int) -> list[Script]:
        return await self._io(self.repo.list_scripts, owner_id=owner)

    async def get_script(self, owner: int, name: str, version: int | None = None) -> Script:
        return await self._io(self.repo.get_script, owner_id=owner, name=name, version=version)

    async def script_versions(self, owner: int, name: str) -> list[Script]:
        return await self._io(self.repo.script_versions, owner_id=owner, name=name)

    async def script_body(self, owner: int, name: str, version: int | None = None) -> bytes:
        script = await self.get_script(owner, name, version)
        return await self._io(self.repo.get_script_body, script.script_id)

    async def delete_script(self, owner: int, name: str) -> int:
        """Every version; a Conflict while a pending task or a schedule uses it."""
        return await self._io(
            self.repo.delete_script, owner_id=owner, name=name, now=self.clock.now()
        )

    # -- tasks -----------------------------------------------------------------
    async def submit_tasks(
        self, owner: int, bodies: Sequence[TaskIn]
    ) -> list[SubmitResult | ChronorayError]:
        """Each to the shard owning its time; one result (or error) each."""
        news = [new_task(body, owner_id=owner, settings=self.settings) for body in bodies]
        await self._check_caps(owner, tasks=len(news))
        return await self.router.submit(news)

    async def submit_task(self, owner: int, body: TaskIn) -> SubmitResult:
        [result] = await self.submit_tasks(owner, [body])
        if isinstance(result, ChronorayError):
            raise result
        return result

    async def submit_batch(self, owner: int, items: Sequence[Any]) -> list[SubmitResult]:
        """All or nothing, in one transaction; an error names its item."""
        news = new_batch(items, owner_id=owner, settings=self.settings)
        await self._check_caps(owner, tasks=len(news))
        results = await self._io(store_batch, self.repo, news, now=self.clock.now())
        soon = within_lookahead(
            ((r.task.task_id, r.task.execute_at) for r in results),
            now=self.clock.now(),
            lookahead_s=self.settings.lookahead_s,
        )
        if soon:
            await self._hint(soon)
        return results

    async def send_task(self, owner: int, body: SendTaskIn) -> SubmitResult | Schedule:
        """The original API: once at ``execute_at``, or on a ``cron``."""
        if body.cron is None:
            if body.timezone is not None:
                raise InvalidInput("timezone goes with cron", "timezone")
            fields = body.model_dump(exclude={"cron", "timezone"})
            return await self.submit_task(owner, TaskIn.parse(fields))
        if body.execute_at is not None:
            raise InvalidInput("give execute_at or cron, not both", "cron")
        fields = body.model_dump(exclude_unset=True, exclude={"execute_at", "idempotency_key"})
        return await self.create_schedule(owner, ScheduleIn.parse(fields))

    async def get_task(self, owner: int, task_id: int) -> TaskView:
        task = await self._io(self.repo.get_task, task_id, owner_id=owner)
        return TaskView(task, await self._io(self.repo.list_runs, task_id))

    async def cancel_task(self, owner: int, task_id: int) -> Task:
        return await self._io(self.repo.cancel_task, task_id, owner_id=owner, now=self.clock.now())

    async def list_tasks(
        self,
        owner: int,
        *,
        status: Sequence[str] = (),
        script: str | None = None,
        schedule_id: int | None = None,
        due_from: str | float | None = None,
        due_before: str | float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[Task], str | None]:
        """One page, newest first, and the cursor of the next (None at the end)."""
        query = task_query(
            owner_id=owner,
            status=status,
            script=script,
            schedule_id=schedule_id,
            due_from=None if due_from is None else str(due_from),
            due_before=None if due_before is None else str(due_before),
            limit=bounded(limit, 1, 1000, "limit"),
            cursor=cursor,
        )
        return await self._io(task_page, self.repo, query)

    async def list_runs(self, owner: int, task_id: int) -> list[Run]:
        return await self._io(task_runs, self.repo, task_id, owner_id=owner)

    async def run_output(self, owner: int, task_id: int, attempt: int) -> str:
        return run_of(await self.list_runs(owner, task_id), task_id, attempt).output_tail

    async def wait_final(
        self, owner: int, task_ids: Sequence[int], timeout_s: float, poll_s: float
    ) -> list[TaskView]:
        """Until every task is final (succeeded, dead, cancelled), in the order given."""
        done: dict[int, TaskView] = {}
        pending = set(task_ids)
        deadline = self.clock.now().timestamp() + timeout_s
        while True:
            for task_id in sorted(pending):
                view = await self.get_task(owner, task_id)
                if view.task.status.is_final:
                    done[task_id] = view
                    pending.discard(task_id)
            if not pending:
                return [done[t] for t in task_ids]
            if self.clock.now().timestamp() > deadline:
                raise TimeoutError(f"{len(pending)} tasks not final after {timeout_s} s")
            await asyncio.sleep(poll_s)

    async def list_dead(self, owner: int, limit: int = 100) -> list[Task]:
        page, _ = await self.list_tasks(owner, status=[TaskStatus.DEAD.value], limit=limit)
        return page

    async def retry_task(self, owner: int, task_id: int, attempts: int = 1) -> Task:
        """A dead task, due now with ``attempts`` more attempts."""
        task = await self._io(
            redrive,
            self.repo,
            self.settings,
            task_id,
            owner_id=owner,
            attempts=attempts,
            now=self.clock.now(),
        )
        await self._hint([(task.task_id, task.execute_at)])
        return task

    # -- schedules -------------------------------------------------------------
    async def _follow(self, follow_up: tuple[int, datetime] | None) -> None:
        if follow_up is not None:  # an occurrence stored outside its shard
            await self._hint([follow_up])

    async def create_schedule(self, owner: int, body: ScheduleIn) -> Schedule:
        now = self.clock.now()
        new = new_schedule(body, owner_id=owner, settings=self.settings, now=now)
        await self._check_caps(owner, schedules=1)
        schedule, follow_up = await self._io(self.repo.add_schedule, new, now=now)
        await self._follow(follow_up)
        return schedule

    async def list_schedules(self, owner: int) -> list[Schedule]:
        return await self._io(self.repo.list_schedules, owner_id=owner)

    async def get_schedule(self, owner: int, schedule_id: int) -> Schedule:
        return await self._io(self.repo.get_schedule, schedule_id, owner_id=owner)

    async def change_schedule(self, owner: int, schedule_id: int, patch: SchedulePatch) -> Schedule:
        now = self.clock.now()
        current = await self.get_schedule(owner, schedule_id)
        changes = schedule_changes(patch, settings=self.settings, now=now)
        if "cron" in changes or "timezone" in changes:
            validate_schedule(
                changes.get("cron", current.cron),
                changes.get("timezone", current.timezone),
                now=now,
                min_interval_s=self.settings.min_schedule_interval_s,
            )
        schedule, follow_up = await self._io(
            self.repo.change_schedule, schedule_id, owner_id=owner, changes=changes, now=now
        )
        await self._follow(follow_up)
        return schedule

    async def delete_schedule(self, owner: int, schedule_id: int) -> None:
        await self._io(self.repo.delete_schedule, schedule_id, owner_id=owner, now=self.clock.now())

    async def trigger_schedule(self, owner: int, schedule_id: int) -> tuple[int, datetime]:
        """An occurrence now, beside the plan: (its task, its nominal time)."""
        task_id, at = await self._io(
            self.repo.trigger_schedule, schedule_id, owner_id=owner, now=self.clock.now()
        )
        await self._follow((task_id, at))
        return task_id, at

    async def preview_schedule(
        self, owner: int, schedule_id: int, count: int = 10
    ) -> tuple[Schedule, list[datetime]]:
        schedule = await self.get_schedule(owner, schedule_id)
        return schedule, upcoming_fires(schedule, bounded(count, 1, 100, "count"))

    async def backfill_schedule(
        self, owner: int, schedule_id: int, body: BackfillIn
    ) -> BackfillResult:
        """The occurrences the expression gives in a past window, each once:
        a time that has an occurrence already is left alone."""
        now = self.clock.now()
        start, end = parse_instant(body.start, "from"), parse_instant(body.end, "to")
        if end > now:
            raise InvalidInput("a backfill covers the past: 'to' is after now", "to")
        schedule = await self.get_schedule(owner, schedule_id)
        fires = fires_in_window(
            schedule.cron_schedule, start, end, cap=self.settings.max_backfill_fires
        )
        created = await self._io(
            self.repo.backfill_schedule,
            schedule_id,
            owner_id=owner,
            fires=fires,
            overlap=body.overlap_policy,
            now=now,
        )
        if created:
            await self._hint(created)
        return BackfillResult(schedule_id, fires, [task_id for task_id, _ in created])

    async def audit_schedules(
        self,
        owner: int,
        schedules: Sequence[Schedule],
        *,
        start: datetime,
        end: datetime,
        late_after_s: float,
    ) -> dict[int, Audit]:
        """Each schedule's expected fires in [start, end) against what ran
        (schedules already read for ``owner``)."""
        now = self.clock.now()
        end = min(end, now)
        stored, runs = await self._io(
            self.repo.schedule_occurrences,
            [s.schedule_id for s in schedules],
            owner_id=owner,
            start=start,
            end=end,
        )
        audits = {}
        for schedule in schedules:
            found = [
                Occurrence(task_id, at, status, runs.get(task_id, []))
                for task_id, at, status in stored.get(schedule.schedule_id, [])
            ]
            begin, stop = audit_window(schedule, found, start=start, end=end)
            expected = (
                fires_in_window(
                    schedule.cron_schedule, begin, stop, cap=self.settings.max_audit_fires
                )
                if begin < stop
                else []
            )
            audits[schedule.schedule_id] = audit(
                expected, found, late_after_s=late_after_s, now=now
            )
        return audits

    async def audit_schedule(
        self,
        owner: int,
        schedule_id: int,
        *,
        start: str | float | datetime | None = None,
        end: str | float | datetime | None = None,
        late_after_s: float = DEFAULT_LATE_S,
    ) -> tuple[Schedule, Audit, datetime, datetime]:
        """One schedule over a window (default: the last 24 hours)."""
        now = self.clock.now()
        until = now if end is None else parse_instant(end, "to")
        since = until - timedelta(days=1) if start is None else parse_instant(start, "from")
        if until <= since:
            raise InvalidInput("the window ends before it starts", "to")
        if not 0 <= late_after_s <= 86400:
            raise InvalidInput("late_after_s must be within [0, 86400]", "late_after_s")
        schedule = await self.get_schedule(owner, schedule_id)
        audits = await self.audit_schedules(
            owner, [schedule], start=since, end=until, late_after_s=late_after_s
        )
        return schedule, audits[schedule_id], since, until

    async def preview_expression(
        self, cron: str, timezone_name: str = "UTC", count: int = 5
    ) -> list[datetime]:
        """The next fires of an expression not stored yet (the create form)."""
        now = self.clock.now()
        checked = validate_schedule(
            cron, timezone_name, now=now, min_interval_s=self.settings.min_schedule_interval_s
        )
        return checked.upcoming(now, bounded(count, 1, 100, "count"))

    async def schedule_history(
        self, owner: int, schedule_id: int, limit: int = 100
    ) -> list[dict[str, Any]]:
        return await self._io(
            self.repo.schedule_history,
            schedule_id,
            owner_id=owner,
            limit=bounded(limit, 1, 1000, "limit"),
        )

    # -- operations ------------------------------------------------------------
    async def list_executors(self) -> dict[str, Any]:
        return await self.router.executors()

    async def mirror_view(self) -> dict[str, Any] | None:
        """The ZooKeeper mirror as external tools read it (None: no mirror
        configured); raises Unavailable when it does not answer."""
        return await self.router.mirror()

    async def readiness(self, timeout_s: float = 2.0) -> dict[str, str]:
        """ "ok" or why not, for the database and every actor."""
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self._io(self.repo.ping), timeout=timeout_s)
            checks["database"] = "ok"
        except Exception as exc:  # any failure means not ready, and says which
            checks["database"] = f"unavailable: {type(exc).__name__}"
        checks.update(await self.router.probe())
        return checks

    async def metrics_by_source(self) -> dict[str, list[Any] | None]:
        return await self.router.metrics()

    async def overview(self, owner: int, *, bin_s: float = 300.0) -> Overview:
        """The console's first page: the caller's tasks by status, the last
        hour's fires and lag, the queue by priority, and what runs per tier."""
        now = self.clock.now()
        since = now - timedelta(hours=1)
        counts = await self._io(self.repo.task_counts, owner)
        queued = await self._io(self.repo.queued_by_priority, owner)
        lags = await self._io(self.repo.lag_figures, owner, since=since, until=now, bin_s=bin_s)
        return Overview(
            at=now,
            counts=counts,
            fires_last_hour=lags.fires,
            lag_p50_ms=lags.p50_ms,
            lag_p99_ms=lags.p99_ms,
            series=lags.series,
            queued_by_priority=queued,
        )
