"""The FastAPI app, independent of how it is served: Ray Serve in
production (serve_app/deployment.py), a TestClient in unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily

from chronoray.auth import Authenticator, Caller, RateLimiter, issue_token
from chronoray.metrics import ApiMetrics, exposition
from chronoray.settings import Settings
from scheduling.cron import validate_schedule
from scheduling.errors import (
    ChronorayError,
    InvalidInput,
    Unauthorized,
    UnsupportedMediaType,
)
from scheduling.models import Interpreter, NewTask, SubmitResult, TaskStatus
from scheduling.validation import validate_script_name
from serve_app.errors import ERROR_RESPONSES, install_error_handlers
from serve_app.limits import BodySizeLimit, StrictJsonRoute, WriteTracker, media_type
from serve_app.operations import (
    check_caps,
    new_batch,
    new_schedule,
    new_task,
    redrive,
    run_of,
    schedule_changes,
    store_batch,
    store_script,
    task_runs,
    upcoming_fires,
)
from serve_app.schemas import (
    RetryIn,
    ScheduleIn,
    SchedulePatch,
    ScriptIn,
    SendTaskIn,
    TaskBatchIn,
    TaskIn,
    TokenIn,
    UserIn,
    history_out,
    run_out,
    schedule_out,
    script_out,
    task_out,
    task_page,
    task_query,
    token_out,
    user_out,
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

    async def metrics(self) -> dict[str, list | None]:
        """Prometheus metric families per actor ({"shard-0": [...], ...});
        None for one that did not answer."""


@dataclass(frozen=True, kw_only=True)
class Backend:
    repo: TaskRepository
    submitter: Submitter
    settings: Settings


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
RAW_SCRIPT_BODY = {
    "requestBody": {
        "required": True,
        "content": {kind: {"schema": {"type": "string"}} for kind in sorted(RAW_SCRIPT_TYPES)},
    }
}
TEXT_ANSWER = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}
BYTES_ANSWER = {
    200: {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    }
}
AGAIN = {200: {"description": "the same body (or idempotency key) again: what is already stored"}}
READY_TIMEOUT_S = 2.0


BEARER = HTTPBearer(
    auto_error=False,
    description="A user's API token; the admin token (CHRONORAY_ADMIN_TOKEN) for users and tokens.",
)


async def _caller(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Security(BEARER)
) -> Caller:
    if credentials is None:
        raise Unauthorized("send Authorization: Bearer <token>", "authorization")
    auth: Authenticator = request.app.state.auth
    token = credentials.credentials
    return auth.cached(token) or await asyncio.to_thread(auth.authenticate, token)


async def _owner(request: Request, caller: Caller = Depends(_caller)) -> int:
    user_id = caller.require_user()
    request.app.state.limiter.take(user_id)
    request.scope[WriteTracker.OWNER_KEY] = user_id  # so a write's LSN is remembered for reads
    return user_id


async def _admin(caller: Caller = Depends(_caller)) -> Caller:
    caller.require_admin()
    return caller


MAX_ID = 2**63 - 1  # BIGINT: a larger id cannot exist, and must be a 422, not a database error
ObjectId = Annotated[int, Path(ge=1, le=MAX_ID)]
Attempt = Annotated[int, Path(ge=1, le=2**31 - 1)]
Owner = Annotated[int, Depends(_owner)]  # the user a request speaks for; 401 without a token
Admin = Annotated[Caller, Depends(_admin)]


def create_api(backend: Backend) -> FastAPI:
    api = FastAPI(
        title="chronoray",
        version="0.1.0",
        description="Schedule scripts once or on CRON. Every /v1 route and /sendTask "
        "takes Authorization: Bearer; another user's objects are 404.",
        responses=ERROR_RESPONSES,
    )
    api.router.route_class = StrictJsonRoute  # NaN, repeated keys, huge ints, bad UTF-8: 422
    install_error_handlers(api)
    repo, settings = backend.repo, backend.settings
    api_metrics = ApiMetrics()
    api.add_middleware(WriteTracker, repo=repo)
    api.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_request_bytes,
        tighter=((r"/v1/scripts/[^/]+", settings.max_script_bytes),),
    )
    api.state.auth = Authenticator(
        repo.user_for_token, admin_token=settings.admin_token, cache_s=settings.token_cache_s
    )
    api.state.limiter = RateLimiter(
        per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst
    )

    def now() -> datetime:
        return datetime.now(timezone.utc)

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics of every actor, each series labelled with its
        ``source``; ``chronoray_metrics_source_up{actor}`` says which answered."""
        gathered = await backend.submitter.metrics()
        up = GaugeMetricFamily(
            "chronoray_metrics_source_up", "1 when the actor answered", labels=["actor"]
        )
        for source, families in gathered.items():
            up.add_metric([source], 0 if families is None else 1)
        by_source = {s: f for s, f in gathered.items() if f is not None}
        by_source["api"] = [*api_metrics.families(), up]
        return Response(exposition(by_source), media_type=CONTENT_TYPE_LATEST)

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

    # -- users and tokens (admin) ---------------------------------------------
    @api.post("/v1/users", status_code=201)
    async def create_user(_: Admin, body: UserIn) -> dict:
        user = await asyncio.to_thread(
            repo.add_user, first_name=body.first_name, last_name=body.last_name, now=now()
        )
        return user_out(user)

    @api.get("/v1/users")
    async def list_users(_: Admin) -> dict:
        return {"users": [user_out(u) for u in await asyncio.to_thread(repo.list_users)]}

    @api.get("/v1/users/{user_id}")
    async def get_user(_: Admin, user_id: ObjectId) -> dict:
        return user_out(await asyncio.to_thread(repo.get_user, user_id))

    @api.post("/v1/users/{user_id}/tokens", status_code=201)
    async def create_token(_: Admin, user_id: ObjectId, body: TokenIn | None = None) -> dict:
        """The token is in this answer only; chronoray keeps its hash."""
        label = (body or TokenIn()).label
        record, token = await asyncio.to_thread(
            issue_token, repo, user_id=user_id, label=label, now=now()
        )
        return {**token_out(record), "token": token}

    @api.delete("/v1/tokens/{token_id}")
    async def revoke_token(_: Admin, token_id: ObjectId) -> dict:
        record = await asyncio.to_thread(repo.revoke_token, token_id, now=now())
        api.state.auth.forget()
        return token_out(record)

    @api.get("/v1/me")
    async def who_am_i(owner: Owner) -> dict:
        """The user the token belongs to."""
        return user_out(await asyncio.to_thread(repo.get_user, owner))

    # -- scripts ---------------------------------------------------------------
    async def stored_script(owner: int, name: str, interpreter, payload: bytes) -> JSONResponse:
        script, created = await asyncio.to_thread(
            store_script,
            repo,
            settings,
            owner_id=owner,
            name=name,
            interpreter=interpreter,
            body=payload,
            now=now(),
        )
        return JSONResponse(script_out(script), status_code=201 if created else 200)

    @api.post("/v1/scripts", status_code=201, responses=AGAIN)
    async def register_script(owner: Owner, body: ScriptIn) -> JSONResponse:
        """Register a script from JSON; the same body again is the same version (200)."""
        return await stored_script(owner, body.name, body.interpreter, body.body.encode())

    @api.put("/v1/scripts/{name}", status_code=201, openapi_extra=RAW_SCRIPT_BODY, responses=AGAIN)
    async def upload_script(
        owner: Owner, name: str, request: Request, interpreter: Interpreter = Interpreter.BASH
    ) -> JSONResponse:
        """Upload a script as the raw request body (text/plain or
        application/octet-stream); a changed body is a new version."""
        validate_script_name(name, "name")  # before the body is read
        content_type = request.headers.get("content-type", "")
        if media_type(content_type) not in RAW_SCRIPT_TYPES:
            raise UnsupportedMediaType(
                f"send the script as text/plain or application/octet-stream, "
                f"not {content_type[:64]!r}",
                "content-type",
            )
        return await stored_script(owner, name, interpreter, await request.body())

    @api.get("/v1/scripts")
    async def list_scripts(owner: Owner) -> dict:
        """The newest version of each of the caller's scripts."""
        found = await asyncio.to_thread(repo.list_scripts, owner_id=owner)
        return {"scripts": [script_out(s) for s in found]}

    @api.get("/v1/scripts/{name}")
    async def get_script(
        owner: Owner, name: str, version: int | None = Query(None, ge=1, le=2**31 - 1)
    ) -> dict:
        script = await asyncio.to_thread(
            repo.get_script, owner_id=owner, name=name, version=version
        )
        return script_out(script)

    @api.get("/v1/scripts/{name}/versions")
    async def script_versions(owner: Owner, name: str) -> dict:
        """Every live version, newest first, each with its content hash."""
        found = await asyncio.to_thread(repo.script_versions, owner_id=owner, name=name)
        return {"name": name, "versions": [script_out(s) for s in found]}

    @api.get("/v1/scripts/{name}/body", responses=BYTES_ANSWER)
    async def script_body(
        owner: Owner, name: str, version: int | None = Query(None, ge=1, le=2**31 - 1)
    ) -> Response:
        """The script itself (the newest version unless ``version`` is given)."""
        script = await asyncio.to_thread(
            repo.get_script, owner_id=owner, name=name, version=version
        )
        body = await asyncio.to_thread(repo.get_script_body, script.script_id)
        return Response(body, media_type="application/octet-stream")

    @api.delete("/v1/scripts/{name}")
    async def delete_script(owner: Owner, name: str) -> dict:
        """Delete every version; 409 while a pending task or a schedule uses it."""
        versions = await asyncio.to_thread(repo.delete_script, owner_id=owner, name=name, now=now())
        return {"name": name, "deleted_versions": versions}

    async def submit(owner: Owner, body: TaskIn) -> JSONResponse:
        new = new_task(body, owner_id=owner, settings=settings)
        await asyncio.to_thread(check_caps, repo, settings, owner, tasks=1)
        [result] = await backend.submitter.submit([new])
        if isinstance(result, ChronorayError):
            raise result
        api_metrics.submissions.labels(kind="task").inc()
        return JSONResponse(task_out(result.task), status_code=201 if result.created else 200)

    api.post("/v1/tasks", status_code=201, responses=AGAIN)(submit)

    @api.post("/v1/tasks:batch", status_code=201, responses=AGAIN)
    async def submit_batch(owner: Owner, body: TaskBatchIn) -> JSONResponse:
        """Up to ``max_batch_tasks`` tasks in one transaction: all are
        stored, or none (the error names the item)."""
        news = new_batch(body.tasks, owner_id=owner, settings=settings)
        await asyncio.to_thread(check_caps, repo, settings, owner, tasks=len(news))
        results = await asyncio.to_thread(store_batch, repo, news, now=now())
        await backend.submitter.track([(r.task.task_id, r.task.execute_at) for r in results])
        created = sum(r.created for r in results)
        api_metrics.submissions.labels(kind="batch").inc()
        api_metrics.batch_tasks.inc(created)
        return JSONResponse(
            {"tasks": [task_out(r.task) for r in results], "created": created},
            status_code=201 if created else 200,
        )

    @api.post("/sendTask", status_code=201, responses=AGAIN)
    async def send_task(owner: Owner, body: SendTaskIn) -> JSONResponse:
        """The original API: once at ``execute_at``, or on a ``cron``."""
        if body.cron is None:
            if body.timezone is not None:
                raise InvalidInput("timezone goes with cron", "timezone")
            return await submit(owner, TaskIn.parse(body.model_dump(exclude={"cron", "timezone"})))
        if body.execute_at is not None:
            raise InvalidInput("give execute_at or cron, not both", "cron")
        fields = body.model_dump(exclude_unset=True, exclude={"execute_at", "idempotency_key"})
        return await create_schedule(owner, ScheduleIn.parse(fields))

    async def watch(follow_up) -> None:
        if follow_up is not None:
            await backend.submitter.track([follow_up])

    @api.post("/v1/schedules", status_code=201)
    async def create_schedule(owner: Owner, body: ScheduleIn) -> JSONResponse:
        new = new_schedule(body, owner_id=owner, settings=settings, now=now())
        await asyncio.to_thread(check_caps, repo, settings, owner, schedules=1)
        schedule, follow_up = await asyncio.to_thread(repo.add_schedule, new, now=now())
        await watch(follow_up)
        api_metrics.submissions.labels(kind="schedule").inc()
        return JSONResponse(schedule_out(schedule), status_code=201)

    @api.get("/v1/schedules")
    async def list_schedules(owner: Owner) -> dict:
        found = await asyncio.to_thread(repo.list_schedules, owner_id=owner)
        return {"schedules": [schedule_out(s) for s in found]}

    @api.get("/v1/schedules/{schedule_id}")
    async def get_schedule(owner: Owner, schedule_id: ObjectId) -> dict:
        schedule = await asyncio.to_thread(repo.get_schedule, schedule_id, owner_id=owner)
        return schedule_out(schedule)

    @api.patch("/v1/schedules/{schedule_id}")
    async def change_schedule(owner: Owner, schedule_id: ObjectId, body: SchedulePatch) -> dict:
        current = await asyncio.to_thread(repo.get_schedule, schedule_id, owner_id=owner)
        changes = schedule_changes(body, settings=settings, now=now())
        if "cron" in changes or "timezone" in changes:
            validate_schedule(
                changes.get("cron", current.cron),
                changes.get("timezone", current.timezone),
                now=now(),
                min_interval_s=settings.min_schedule_interval_s,
            )
        schedule, follow_up = await asyncio.to_thread(
            repo.change_schedule, schedule_id, owner_id=owner, changes=changes, now=now()
        )
        await watch(follow_up)
        return schedule_out(schedule)

    @api.delete("/v1/schedules/{schedule_id}")
    async def delete_schedule(owner: Owner, schedule_id: ObjectId) -> dict:
        await asyncio.to_thread(repo.delete_schedule, schedule_id, owner_id=owner, now=now())
        return {"schedule_id": schedule_id, "deleted": True}

    @api.post("/v1/schedules/{schedule_id}/trigger", status_code=202)
    async def trigger_schedule(owner: Owner, schedule_id: ObjectId) -> dict:
        task_id, at = await asyncio.to_thread(
            repo.trigger_schedule, schedule_id, owner_id=owner, now=now()
        )
        await watch((task_id, at))
        return {"schedule_id": schedule_id, "task_id": task_id, "nominal_at": at.isoformat()}

    @api.get("/v1/schedules/{schedule_id}/preview")
    async def preview_schedule(
        owner: Owner, schedule_id: ObjectId, count: int = Query(10, ge=1, le=100)
    ) -> dict:
        schedule = await asyncio.to_thread(repo.get_schedule, schedule_id, owner_id=owner)
        zone = schedule.cron_schedule.zone
        return {
            "schedule_id": schedule_id,
            "timezone": schedule.timezone,
            "fires": [
                {"utc": f.isoformat(), "local": f.astimezone(zone).isoformat()}
                for f in upcoming_fires(schedule, count)
            ],
        }

    @api.get("/v1/schedules/{schedule_id}/runs")
    async def schedule_runs(
        owner: Owner, schedule_id: ObjectId, limit: int = Query(100, ge=1, le=1000)
    ) -> dict:
        history = await asyncio.to_thread(
            repo.schedule_history, schedule_id, owner_id=owner, limit=limit
        )
        return {"schedule_id": schedule_id, "occurrences": [history_out(h) for h in history]}

    @api.get("/v1/tasks/{task_id}")
    async def get_task(owner: Owner, task_id: ObjectId) -> dict:
        task = await asyncio.to_thread(repo.get_task, task_id, owner_id=owner)
        runs = await asyncio.to_thread(repo.list_runs, task_id)
        return task_out(task, runs)

    @api.delete("/v1/tasks/{task_id}")
    async def cancel_task(owner: Owner, task_id: ObjectId) -> dict:
        task = await asyncio.to_thread(repo.cancel_task, task_id, owner_id=owner, now=now())
        return task_out(task)

    @api.get("/v1/tasks")
    async def list_tasks(
        owner: Owner,
        status: list[str] = Query(default=[], description="repeatable: scheduled, dead, …"),
        script: str | None = None,
        schedule_id: int | None = Query(None, ge=1, le=MAX_ID),
        due_from: str | None = Query(None, description="ISO 8601 with offset, or epoch s"),
        due_before: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = Query(None, description="next_cursor of the previous page"),
    ) -> dict:
        """The caller's tasks, newest first, one page at a time."""
        query = task_query(
            owner_id=owner,
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
    async def list_runs(owner: Owner, task_id: ObjectId) -> dict:
        """Every attempt of one task: executor, tier, node, times, fire lag,
        exit code, failure class and the output's tail."""
        runs = await asyncio.to_thread(task_runs, repo, task_id, owner_id=owner)
        return {"task_id": task_id, "runs": [run_out(run) for run in runs]}

    @api.get("/v1/tasks/{task_id}/runs/{attempt}/output", responses=TEXT_ANSWER)
    async def run_output(owner: Owner, task_id: ObjectId, attempt: Attempt) -> PlainTextResponse:
        """The tail of one attempt's stdout and stderr, as text."""
        runs = await asyncio.to_thread(task_runs, repo, task_id, owner_id=owner)
        return PlainTextResponse(run_of(runs, task_id, attempt).output_tail)

    @api.get("/v1/executors")
    async def list_executors(owner: Owner) -> dict:
        """Executors as the pool sees them: each tier's live, starting and
        unplaceable executors, and each executor's state and heartbeat age."""
        return await backend.submitter.executors()

    @api.get("/v1/dead")
    async def list_dead(owner: Owner, limit: int = Query(100, ge=1, le=1000)) -> dict:
        """Tasks that used up their attempts; ``POST /v1/tasks/{id}/retry``
        runs one again."""
        dead = await asyncio.to_thread(
            repo.list_tasks,
            TaskQuery(owner_id=owner, statuses=frozenset({TaskStatus.DEAD}), limit=limit),
        )
        return {"tasks": [task_out(task) for task in dead]}

    @api.post("/v1/tasks/{task_id}/retry")
    async def retry_task(owner: Owner, task_id: ObjectId, body: RetryIn | None = None) -> dict:
        attempts = (body or RetryIn()).attempts
        task = await asyncio.to_thread(
            redrive, repo, settings, task_id, owner_id=owner, attempts=attempts, now=now()
        )
        await backend.submitter.track([(task.task_id, task.execute_at)])
        return task_out(task)

    return api
