from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily

from chronoray.metrics import exposition
from serve_app.deps import Owner, Svc
from serve_app.limits import StrictJsonRoute
from serve_app.render import JsonAnswer

router = APIRouter(tags=["operations"], route_class=StrictJsonRoute)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(service: Svc, request: Request) -> Response:
    """Prometheus metrics of every actor, each series labelled with its
    ``source``; ``chronoray_metrics_source_up{actor}`` says which answered."""
    gathered = await service.metrics_by_source()
    up = GaugeMetricFamily(
        "chronoray_metrics_source_up", "1 when the actor answered", labels=["actor"]
    )
    for source, families in gathered.items():
        up.add_metric([source], 0 if families is None else 1)
    by_source = {s: f for s, f in gathered.items() if f is not None}
    by_source["api"] = [*request.app.state.metrics.families(), up]
    return Response(exposition(by_source), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz() -> dict:
    """The API process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: Svc) -> JsonAnswer:
    """The database, the dispatcher and every shard answer."""
    checks = await service.readiness()
    ready = all(v == "ok" for v in checks.values())
    headers = None if ready else {"Retry-After": "5"}
    return JsonAnswer({"ready": ready, "checks": checks}, 200 if ready else 503, headers=headers)


@router.get("/v1/executors")
async def list_executors(service: Svc, owner: Owner) -> dict:
    """Executors as the pool sees them: each tier's live, starting and
    unplaceable executors, and each executor's state and heartbeat age."""
    return await service.list_executors()
