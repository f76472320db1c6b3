from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from serve_app.deps import ObjectId, Owner, Svc, count
from serve_app.limits import StrictJsonRoute
from serve_app.render import history_out, schedule_out
from service.requests import ScheduleIn, SchedulePatch

router = APIRouter(tags=["schedules"], route_class=StrictJsonRoute)


@router.post("/v1/schedules", status_code=201)
async def create_schedule(
    service: Svc, owner: Owner, body: ScheduleIn, request: Request
) -> JSONResponse:
    schedule = await service.create_schedule(owner, body)
    count(request, "schedule")
    return JSONResponse(schedule_out(schedule), status_code=201)


@router.get("/v1/schedules")
async def list_schedules(service: Svc, owner: Owner) -> dict:
    return {"schedules": [schedule_out(s) for s in await service.list_schedules(owner)]}


@router.get("/v1/schedules/{schedule_id}")
async def get_schedule(service: Svc, owner: Owner, schedule_id: ObjectId) -> dict:
    return schedule_out(await service.get_schedule(owner, schedule_id))


@router.patch("/v1/schedules/{schedule_id}")
async def change_schedule(
    service: Svc, owner: Owner, schedule_id: ObjectId, body: SchedulePatch
) -> dict:
    return schedule_out(await service.change_schedule(owner, schedule_id, body))


@router.delete("/v1/schedules/{schedule_id}")
async def delete_schedule(service: Svc, owner: Owner, schedule_id: ObjectId) -> dict:
    await service.delete_schedule(owner, schedule_id)
    return {"schedule_id": schedule_id, "deleted": True}


@router.post("/v1/schedules/{schedule_id}/trigger", status_code=202)
async def trigger_schedule(service: Svc, owner: Owner, schedule_id: ObjectId) -> dict:
    task_id, at = await service.trigger_schedule(owner, schedule_id)
    return {"schedule_id": schedule_id, "task_id": task_id, "nominal_at": at.isoformat()}


@router.get("/v1/schedules/{schedule_id}/preview")
async def preview_schedule(
    service: Svc, owner: Owner, schedule_id: ObjectId, count: int = Query(10, ge=1, le=100)
) -> dict:
    schedule, fires = await service.preview_schedule(owner, schedule_id, count)
    zone = schedule.cron_schedule.zone
    return {
        "schedule_id": schedule_id,
        "timezone": schedule.timezone,
        "fires": [{"utc": f.isoformat(), "local": f.astimezone(zone).isoformat()} for f in fires],
    }


@router.get("/v1/schedules/{schedule_id}/runs")
async def schedule_history(
    service: Svc, owner: Owner, schedule_id: ObjectId, limit: int = Query(100, ge=1, le=1000)
) -> dict:
    history = await service.schedule_history(owner, schedule_id, limit)
    return {"schedule_id": schedule_id, "occurrences": [history_out(h) for h in history]}
