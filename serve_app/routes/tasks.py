from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse

from scheduling.models import SubmitResult
from serve_app.deps import AGAIN, MAX_ID, Attempt, ObjectId, Owner, Svc, count
from serve_app.limits import StrictJsonRoute
from serve_app.render import JsonAnswer, run_out, schedule_out, task_out, tasks_out
from service.requests import RetryIn, SendTaskIn, TaskBatchIn, TaskIn

router = APIRouter(tags=["tasks"], route_class=StrictJsonRoute)
TEXT_ANSWER = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


def _submitted(request: Request, result: SubmitResult) -> JsonAnswer:
    count(request, "task")
    return JsonAnswer(task_out(result.task), status_code=201 if result.created else 200)


@router.post("/v1/tasks", status_code=201, responses=AGAIN)
async def submit_task(service: Svc, owner: Owner, body: TaskIn, request: Request) -> JsonAnswer:
    return _submitted(request, await service.submit_task(owner, body))


@router.post("/v1/tasks:batch", status_code=201, responses=AGAIN)
async def submit_batch(
    service: Svc, owner: Owner, body: TaskBatchIn, request: Request
) -> JsonAnswer:
    """Up to ``max_batch_tasks`` tasks in one transaction: all are
    stored, or none (the error names the item)."""
    results = await service.submit_batch(owner, body.tasks)
    created = sum(r.created for r in results)
    count(request, "batch", created)
    return JsonAnswer(
        {"tasks": tasks_out([r.task for r in results]), "created": created},
        status_code=201 if created else 200,
    )


@router.post("/sendTask", status_code=201, responses=AGAIN)
async def send_task(service: Svc, owner: Owner, body: SendTaskIn, request: Request) -> JsonAnswer:
    """The original API: once at ``execute_at``, or on a ``cron``."""
    answer = await service.send_task(owner, body)
    if isinstance(answer, SubmitResult):
        return _submitted(request, answer)
    count(request, "schedule")
    return JsonAnswer(schedule_out(answer), status_code=201)


@router.get("/v1/tasks/{task_id}")
async def get_task(service: Svc, owner: Owner, task_id: ObjectId) -> dict:
    view = await service.get_task(owner, task_id)
    return task_out(view.task, view.runs)


@router.delete("/v1/tasks/{task_id}")
async def cancel_task(service: Svc, owner: Owner, task_id: ObjectId) -> dict:
    return task_out(await service.cancel_task(owner, task_id))


@router.get("/v1/tasks")
async def list_tasks(
    service: Svc,
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
    page, next_cursor = await service.list_tasks(
        owner,
        status=status,
        script=script,
        schedule_id=schedule_id,
        due_from=due_from,
        due_before=due_before,
        limit=limit,
        cursor=cursor,
    )
    return {"tasks": tasks_out(page), "next_cursor": next_cursor}


@router.get("/v1/tasks/{task_id}/runs")
async def list_runs(service: Svc, owner: Owner, task_id: ObjectId) -> dict:
    """Every attempt of one task: executor, tier, node, times, fire lag,
    exit code, failure class and the output's tail."""
    runs = await service.list_runs(owner, task_id)
    return {"task_id": task_id, "runs": [run_out(run) for run in runs]}


@router.get("/v1/tasks/{task_id}/runs/{attempt}/output", responses=TEXT_ANSWER)
async def run_output(
    service: Svc, owner: Owner, task_id: ObjectId, attempt: Attempt
) -> PlainTextResponse:
    """The tail of one attempt's stdout and stderr, as text."""
    return PlainTextResponse(await service.run_output(owner, task_id, attempt))


@router.get("/v1/dead")
async def list_dead(service: Svc, owner: Owner, limit: int = Query(100, ge=1, le=1000)) -> dict:
    """Tasks that used up their attempts; ``POST /v1/tasks/{id}/retry``
    runs one again."""
    return {"tasks": tasks_out(await service.list_dead(owner, limit))}


@router.post("/v1/tasks/{task_id}/retry")
async def retry_task(
    service: Svc, owner: Owner, task_id: ObjectId, body: RetryIn | None = None
) -> dict:
    return task_out(await service.retry_task(owner, task_id, (body or RetryIn()).attempts))
