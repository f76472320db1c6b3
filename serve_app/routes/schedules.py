from __future__ import annotations

from fastapi import APIRouter, Query, Request

from scheduling.cron import zone_of
from serve_app.deps import ObjectId, Owner, Svc, count
from serve_app.limits import StrictJsonRoute
from serve_app.render import JsonAnswer, audit_out, backfill_out, history_out, schedule_out
from service.core import DEFAULT_LATE_S
from service.requests import BackfillIn, ScheduleIn, SchedulePatch

router = APIRouter(tags=["schedules"], route_class=StrictJsonRoute)


@router.post("/v1/schedules", status_code=201)
async def create_schedule(
    service: Svc, owner: Owner, body: ScheduleIn, request: Request
) -> JsonAnswer:
    schedule = await service.create_schedule(owner, body)
    count(request, "schedule")
    return JsonAnswer(schedule_out(schedule), status_code=201)


@router.get("/v1/schedules")
async def list_schedules(service: Svc, owner: Owner) -> dict:
    return {"schedules": [schedule_out(s) for s in await service.list_schedules(owner)]}


@router.get("/v1/schedules:preview")
async def preview_expression(
    service: Svc,
    owner: Owner,
    cron: str = Query(..., max_length=200),
    timezone: str = Query("UTC", max_length=64),
    count: int = Query(5, ge=1, le=100),
) -> dict:
    """The next fires of an expression before it is stored: a 422 names
    what is wrong with it."""
    fires = await service.preview_expression(cron, timezone, count)
    zone = zone_of(timezone)
    return {
        "cron": cron,
        "timezone": timezone,
        "fires": [{"utc": f.isoformat(), "local": f.astimezone(zone).isoformat()} for f in fires],
    }


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


@router.post("/v1/schedules/{schedule_id}/backfill", status_code=201)
async def backfill_schedule(
    service: Svc, owner: Owner, schedule_id: ObjectId, body: BackfillIn
) -> JsonAnswer:
    """Run the occurrences the expression gives in a past window [from, to),
    each once: a time that has an occurrence already (run, skipped or
    backfilled before) is left alone, so sending it twice runs nothing twice.
    More than ``max_backfill_fires`` times is a 422."""
    result = await service.backfill_schedule(owner, schedule_id, body)
    return JsonAnswer(backfill_out(result), status_code=201 if result.created else 200)


@router.get("/v1/schedules/{schedule_id}/audit")
async def audit_schedule(
    service: Svc,
    owner: Owner,
    schedule_id: ObjectId,
    start: str | None = Query(None, alias="from", description="default: 24 h before to"),
    end: str | None = Query(None, alias="to", description="default: now"),
    late_after_s: float = Query(DEFAULT_LATE_S, ge=0, le=86400),
) -> dict:
    """Expected fires from the expression in [from, to) against what ran:
    missed, late beyond ``late_after_s``, duplicated."""
    _, found, since, until = await service.audit_schedule(
        owner, schedule_id, start=start, end=end, late_after_s=late_after_s
    )
    return audit_out(schedule_id, found, since, until, late_after_s)
