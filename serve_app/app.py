"""The FastAPI app, independent of how it is served: Ray Serve in
production (serve_app/deployment.py), a TestClient in unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from chronoray.errors import ChronorayError, InvalidInput, TooLarge
from chronoray.settings import Settings
from scheduling.models import NewTask, SubmitResult
from serve_app.errors import install_error_handlers
from serve_app.limits import BodySizeLimit
from serve_app.schemas import ScriptIn, TaskIn, parse_instant, script_out, task_out
from storage.repository import TaskRepository


class Submitter(Protocol):
    """Hands validated submissions to the shards that own them."""

    async def submit(self, new_tasks: Sequence[NewTask]) -> list[SubmitResult | ChronorayError]: ...


@dataclass(frozen=True, kw_only=True)
class Backend:
    repo: TaskRepository
    submitter: Submitter
    settings: Settings
    owner_id: int  # one local user until users and tokens arrive


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


def create_api(backend: Backend) -> FastAPI:
    api = FastAPI(title="chronoray", version="0.1.0")
    install_error_handlers(api)
    api.add_middleware(BodySizeLimit, max_bytes=backend.settings.max_request_bytes)
    repo, settings = backend.repo, backend.settings

    def now() -> datetime:
        return datetime.now(timezone.utc)

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

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
    api.post("/sendTask", status_code=201)(submit)

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

    return api
