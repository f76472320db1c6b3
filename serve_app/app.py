"""The FastAPI app, independent of how it is served: Ray Serve in
production (serve_app/deployment.py), a TestClient in unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, PlainTextResponse

from chronoray.errors import (
    BatchRejected,
    ChronorayError,
    InvalidInput,
    RunNotFound,
    TooLarge,
    in_batch,
)
from chronoray.settings import Settings
from scheduling.cron import validate_schedule
from scheduling.models import NewTask, SubmitResult, TaskStatus
from scheduling.schedules import MisfirePolicy, NewSchedule, OverlapPolicy, first_fire
from serve_app.errors import install_error_handlers
from serve_app.limits import BodySizeLimit, StrictJsonRoute
from serve_app.schemas import (
    RetryIn,
    ScheduleFields,
    ScheduleIn,
    SchedulePatch,
    ScriptIn,
    SendTaskIn,
    TaskBatchIn,
    TaskIn,
    history_out,
    parse_instant,
    run_out,
    schedule_out,
    script_out,
    task_out,
    task_page,
    task_query,
)
from storage.repository import TaskQuery, TaskRepository


class Submitter(Protocol):
    """Hands validated submissions to the shards that own them."""

    async def submit(self, new_tasks: Sequence[NewTask]) -> list[SubmitResult | ChronorayError]: ...

    async def track(self, entries: Sequence[tuple[int, datetime]]) -> None:
        """Tell the owner shards about occurrences stored outside them."""

    async def probe(self) -> dict[str, str]:
        """Which actors answer: {"dispatcher": "ok", "shard-0": "ok", …}."""

    async def executors(self) -> dict:
        """The executor pool's status: per tier and per executor."""


@dataclass(frozen=True, kw_only=True)
class Backend:
    repo: TaskRepository
    submitter: Submitter
    settings: Settings
    owner_id: int  # one local user until users and tokens arrive


def new_batch(items: Sequence[Any], *, owner_id: int, settings: Settings) -> list[NewTask]:
    """Validate every item of an all-or-nothing batch; an error names its
    item (``tasks[3].execute_at``)."""
    if not items:
        raise InvalidInput("at least one task", "tasks")
    if len(items) > settings.max_batch_tasks:
        raise TooLarge(f"at most {settings.max_batch_tasks} tasks in one batch", "tasks")
    news = []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, Mapping):
                raise InvalidInput("must be an object with the fields of POST /v1/tasks")
            news.append(new_task(TaskIn.parse(dict(item)), owner_id=owner_id, settings=settings))
        except ChronorayError as exc:
            raise in_batch(exc, index) from None
    return news


def store_batch(repo: TaskRepository, news: Sequence[NewTask], *, now: datetime) -> list:
    """One transaction: every task, or none (the first failure is raised,
    naming its item)."""
    try:
        return repo.add_tasks(news, now=now, atomic=True)
    except BatchRejected as rejected:
        index, error = rejected.failures[0]
        raise in_batch(error, index) from None


def new_task(body: TaskIn, *, owner_id: int, settings: Settings) -> NewTask:
    if body.priority > settings.max_priority:
        raise InvalidInput(f"must be at most {settings.max_priority}", "priority")
    if body.max_attempts > settings.max_attempts_limit:
        raise InvalidInput(f"must be at most {settings.max_attempts_limit}", "max_attempts")
    timeout_s = float(body.timeout_s) if body.timeout_s is not None else settings.default_timeout_s
    if timeout_s > settings.max_timeout_s:
        raise InvalidInput(f"must be at most {settings.max_timeout_s}", "timeout_s")
    return NewTask(
        owner_id=owner_id,
        script_name=body.script,
        execute_at=parse_instant(body.execute_at),
        variables=body.variables,
        priority=body.priority,
        max_attempts=body.max_attempts,
        timeout_s=timeout_s,
        idempotency_key=body.idempotency_key,
        request_hash=body.request_hash(),
    )


READY_TIMEOUT_S = 2.0

SCHEDULE_DEFAULTS = {
    "variables": {},
    "priority": 0,
    "max_attempts": 3,
    "misfire_policy": MisfirePolicy.FIRE_ONCE,
    "overlap_policy": OverlapPolicy.SKIP,
    "jitter_s": 0.0,
    "paused": False,
}


def schedule_changes(body: ScheduleFields, *, settings: Settings, now: datetime) -> dict:
    """Validated, explicitly set fields of a create or change request."""
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if "priority" in changes and changes["priority"] > settings.max_priority:
        raise InvalidInput(f"must be at most {settings.max_priority}", "priority")
    if "max_attempts" in changes and changes["max_attempts"] > settings.max_attempts_limit:
        raise InvalidInput(f"must be at most {settings.max_attempts_limit}", "max_attempts")
    if "timeout_s" in changes and changes["timeout_s"] > settings.max_timeout_s:
        raise InvalidInput(f"must be at most {settings.max_timeout_s}", "timeout_s")
    for bound in ("start_at", "end_at"):
        if bound in changes:
            changes[bound] = parse_instant(changes[bound], bound)
    if (
        changes.get("start_at")
        and changes.get("end_at")
        and changes["end_at"] <= changes["start_at"]
    ):
        raise InvalidInput("must be after start_at", "end_at")
    return changes


def new_schedule(
    body: ScheduleIn, *, owner_id: int, settings: Settings, now: datetime
) -> NewSchedule:
    fields = {**SCHEDULE_DEFAULTS, "timeout_s": settings.default_timeout_s}
    fields.update(schedule_changes(body, settings=settings, now=now))
    for identity in ("script", "cron", "timezone"):
        fields.pop(identity, None)
    validate_schedule(
        body.cron, body.timezone, now=now, min_interval_s=settings.min_schedule_interval_s
    )
    new = NewSchedule(
        owner_id=owner_id, script_name=body.script, cron=body.cron, timezone=body.timezone, **fields
    )
    if first_fire(new, now=now) is None:
        raise InvalidInput("the schedule never fires between start_at and end_at", "end_at")
    return new


def create_api(backend: Backend) -> FastAPI:
    api = FastAPI(title="chronoray", version="0.1.0")
    api.router.route_class = StrictJsonRoute  # NaN, repeated keys, huge ints, bad UTF-8: 422
    install_error_handlers(api)
    api.add_middleware(BodySizeLimit, max_bytes=backend.settings.max_request_bytes)
    repo, settings = backend.repo, backend.settings

    def now() -> datetime:
        return datetime.now(timezone.utc)

    @api.get("/healthz")
    async def healthz() -> dict:
        """The API process is up."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        """The database, the dispatcher and every shard answer."""
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(asyncio.to_thread(repo.ping), timeout=READY_TIMEOUT_S)
            checks["database"] = "ok"
        except Exception as exc:  # any failure means not ready, and says which
            checks["database"] = f"unavailable: {type(exc).__name__}"
        checks.update(await backend.submitter.probe())
        ready = all(v == "ok" for v in checks.values())
        headers = None if ready else {"Retry-After": "5"}
        return JSONResponse(
            {"ready": ready, "checks": checks}, 200 if ready else 503, headers=headers
        )

    @api.post("/v1/scripts", status_code=201)
    async def register_script(body: ScriptIn) -> JSONResponse:
        payload = body.body.encode()
        if len(payload) > settings.max_script_bytes:
            raise TooLarge(f"script over {settings.max_script_bytes} bytes", "body")
        script, created = await asyncio.to_thread(
            repo.add_script,
            owner_id=backend.owner_id,
            name=body.name,
            interpreter=body.interpreter,
            body=payload,
            now=now(),
        )
        return JSONResponse(script_out(script), status_code=201 if created else 200)

    @api.get("/v1/scripts/{name}")
    async def get_script(name: str) -> dict:
        script = await asyncio.to_thread(repo.get_script, owner_id=backend.owner_id, name=name)
        return script_out(script)

    async def submit(body: TaskIn) -> JSONResponse:
        new = new_task(body, owner_id=backend.owner_id, settings=settings)
        [result] = await backend.submitter.submit([new])
        if isinstance(result, ChronorayError):
            raise result
        return JSONResponse(task_out(result.task), status_code=201 if result.created else 200)

    api.post("/v1/tasks", status_code=201)(submit)

    @api.post("/v1/tasks:batch", status_code=201)
    async def submit_batch(body: TaskBatchIn) -> JSONResponse:
        """Up to ``max_batch_tasks`` tasks in one transaction: all are
        stored, or none (the error names the item)."""
        news = new_batch(body.tasks, owner_id=backend.owner_id, settings=settings)
        results = await asyncio.to_thread(store_batch, repo, news, now=now())
        await backend.submitter.track([(r.task.task_id, r.task.execute_at) for r in results])
        created = sum(r.created for r in results)
        return JSONResponse(
            {"tasks": [task_out(r.task) for r in results], "created": created},
            status_code=201 if created else 200,
        )

    @api.post("/sendTask", status_code=201)
    async def send_task(body: SendTaskIn) -> JSONResponse:
        """The original API: once at ``execute_at``, or on a ``cron``."""
        if body.cron is None:
            if body.timezone is not None:
                raise InvalidInput("timezone goes with cron", "timezone")
            return await submit(TaskIn.parse(body.model_dump(exclude={"cron", "timezone"})))
        if body.execute_at is not None:
            raise InvalidInput("give execute_at or cron, not both", "cron")
        fields = body.model_dump(exclude_unset=True, exclude={"execute_at", "idempotency_key"})
        return await create_schedule(ScheduleIn.parse(fields))

    async def watch(follow_up) -> None:
        if follow_up is not None:
            await backend.submitter.track([follow_up])

    @api.post("/v1/schedules", status_code=201)
    async def create_schedule(body: ScheduleIn) -> JSONResponse:
        new = new_schedule(body, owner_id=backend.owner_id, settings=settings, now=now())
        schedule, follow_up = await asyncio.to_thread(repo.add_schedule, new, now=now())
        await watch(follow_up)
        return JSONResponse(schedule_out(schedule), status_code=201)

    @api.get("/v1/schedules")
    async def list_schedules() -> dict:
        found = await asyncio.to_thread(repo.list_schedules, owner_id=backend.owner_id)
        return {"schedules": [schedule_out(s) for s in found]}

    @api.get("/v1/schedules/{schedule_id}")
    async def get_schedule(schedule_id: int) -> dict:
        schedule = await asyncio.to_thread(
            repo.get_schedule, schedule_id, owner_id=backend.owner_id
        )
        return schedule_out(schedule)

    @api.patch("/v1/schedules/{schedule_id}")
    async def change_schedule(schedule_id: int, body: SchedulePatch) -> dict:
        current = await asyncio.to_thread(repo.get_schedule, schedule_id, owner_id=backend.owner_id)
        changes = schedule_changes(body, settings=settings, now=now())
        if "cron" in changes or "timezone" in changes:
            validate_schedule(
                changes.get("cron", current.cron),
                changes.get("timezone", current.timezone),
                now=now(),
                min_interval_s=settings.min_schedule_interval_s,
            )
        schedule, follow_up = await asyncio.to_thread(
            repo.change_schedule, schedule_id, owner_id=backend.owner_id, changes=changes, now=now()
        )
        await watch(follow_up)
        return schedule_out(schedule)

    @api.delete("/v1/schedules/{schedule_id}")
    async def delete_schedule(schedule_id: int) -> dict:
        await asyncio.to_thread(
            repo.delete_schedule, schedule_id, owner_id=backend.owner_id, now=now()
        )
        return {"schedule_id": schedule_id, "deleted": True}

    @api.post("/v1/schedules/{schedule_id}/trigger", status_code=202)
    async def trigger_schedule(schedule_id: int) -> dict:
        task_id, at = await asyncio.to_thread(
            repo.trigger_schedule, schedule_id, owner_id=backend.owner_id, now=now()
        )
        await watch((task_id, at))
        return {"schedule_id": schedule_id, "task_id": task_id, "nominal_at": at.isoformat()}

    @api.get("/v1/schedules/{schedule_id}/preview")
    async def preview_schedule(schedule_id: int, count: int = Query(10, ge=1, le=100)) -> dict:
        schedule = await asyncio.to_thread(
            repo.get_schedule, schedule_id, owner_id=backend.owner_id
        )
        cron = schedule.cron_schedule
        start = schedule.next_fire_at or now()
        fires = [start, *cron.upcoming(start, count - 1)] if schedule.next_fire_at else []
        if schedule.end_at:
            fires = [f for f in fires if f <= schedule.end_at]
        return {
            "schedule_id": schedule_id,
            "timezone": schedule.timezone,
            "fires": [
                {"utc": f.isoformat(), "local": f.astimezone(cron.zone).isoformat()} for f in fires
            ],
        }

    @api.get("/v1/schedules/{schedule_id}/runs")
    async def schedule_runs(schedule_id: int, limit: int = Query(100, ge=1, le=1000)) -> dict:
        history = await asyncio.to_thread(
            repo.schedule_history, schedule_id, owner_id=backend.owner_id, limit=limit
        )
        return {"schedule_id": schedule_id, "occurrences": [history_out(h) for h in history]}

    @api.get("/v1/tasks/{task_id}")
    async def get_task(task_id: int) -> dict:
        task = await asyncio.to_thread(repo.get_task, task_id, owner_id=backend.owner_id)
        runs = await asyncio.to_thread(repo.list_runs, task_id)
        return task_out(task, runs)

    @api.delete("/v1/tasks/{task_id}")
    async def cancel_task(task_id: int) -> dict:
        task = await asyncio.to_thread(
            repo.cancel_task, task_id, owner_id=backend.owner_id, now=now()
        )
        return task_out(task)

    @api.get("/v1/tasks")
    async def list_tasks(
        status: list[str] = Query(default=[], description="repeatable: scheduled, dead, …"),
        script: str | None = None,
        schedule_id: int | None = None,
        due_from: str | None = Query(None, description="ISO 8601 with offset, or epoch s"),
        due_before: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = Query(None, description="next_cursor of the previous page"),
    ) -> dict:
        """The caller's tasks, newest first, one page at a time."""
        query = task_query(
            owner_id=backend.owner_id,
            status=status,
            script=script,
            schedule_id=schedule_id,
            due_from=due_from,
            due_before=due_before,
            limit=limit,
            cursor=cursor,
        )
        page, next_cursor = await asyncio.to_thread(task_page, repo, query)
        return {"tasks": [task_out(task) for task in page], "next_cursor": next_cursor}

    @api.get("/v1/tasks/{task_id}/runs")
    async def list_runs(task_id: int) -> dict:
        """Every attempt of one task: executor, tier, node, times, fire lag,
        exit code, failure class and the output's tail."""
        await asyncio.to_thread(repo.get_task, task_id, owner_id=backend.owner_id)
        runs = await asyncio.to_thread(repo.list_runs, task_id)
        return {"task_id": task_id, "runs": [run_out(run) for run in runs]}

    @api.get("/v1/tasks/{task_id}/runs/{attempt}/output", response_class=PlainTextResponse)
    async def run_output(task_id: int, attempt: int) -> PlainTextResponse:
        """The tail of one attempt's stdout and stderr, as text."""
        await asyncio.to_thread(repo.get_task, task_id, owner_id=backend.owner_id)
        runs = await asyncio.to_thread(repo.list_runs, task_id)
        for run in runs:
            if run.attempt == attempt:
                return PlainTextResponse(run.output_tail)
        raise RunNotFound(f"task {task_id} has no run of attempt {attempt}", "attempt")

    @api.get("/v1/executors")
    async def list_executors() -> dict:
        """Executors as the pool sees them: each tier's live, starting and
        unplaceable executors, and each executor's state and heartbeat age."""
        return await backend.submitter.executors()

    @api.get("/v1/dead")
    async def list_dead(limit: int = Query(100, ge=1, le=1000)) -> dict:
        """Tasks that used up their attempts; ``POST /v1/tasks/{id}/retry``
        runs one again."""
        dead = await asyncio.to_thread(
            repo.list_tasks,
            TaskQuery(
                owner_id=backend.owner_id, statuses=frozenset({TaskStatus.DEAD}), limit=limit
            ),
        )
        return {"tasks": [task_out(task) for task in dead]}

    @api.post("/v1/tasks/{task_id}/retry")
    async def retry_task(task_id: int, body: RetryIn | None = None) -> dict:
        attempts = (body or RetryIn()).attempts
        if attempts > settings.max_attempts_limit:
            raise InvalidInput(f"at most {settings.max_attempts_limit} attempts", "attempts")
        task = await asyncio.to_thread(
            repo.redrive, task_id, owner_id=backend.owner_id, attempts=attempts, now=now()
        )
        await backend.submitter.track([(task.task_id, task.execute_at)])
        return task_out(task)

    return api
