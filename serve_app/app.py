"""The FastAPI app, independent of how it is served: Ray Serve in
production (serve_app/deployment.py), a TestClient in unit tests. Routes
live in serve_app/routes, one module per tag; each calls one Service
method, whose name is the operation id."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute

from chronoray.metrics import ApiMetrics
from serve_app import console
from serve_app.errors import ERROR_RESPONSES, install_error_handlers
from serve_app.limits import BodySizeLimit, WriteTracker
from serve_app.render import JsonAnswer
from serve_app.routes import operations, schedules, scripts, tasks, users
from service.auth import RateLimiter
from service.core import Service


def operation_id(route: APIRoute) -> str:
    return route.name  # the route function's name: the Service method it calls


def create_api(service: Service) -> FastAPI:
    settings = service.settings
    api = FastAPI(
        title="chronoray",
        version="0.1.0",
        description="Schedule scripts once or on CRON. Every /v1 route and /sendTask "
        "takes Authorization: Bearer; another user's objects are 404.",
        responses=ERROR_RESPONSES,
        generate_unique_id_function=operation_id,
        default_response_class=JsonAnswer,
    )
    install_error_handlers(api)
    api.add_middleware(WriteTracker, repo=service.repo)
    api.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_request_bytes,
        tighter=((r"/v1/scripts/[^/]+", settings.max_script_bytes),),
    )
    api.state.service = service
    api.state.metrics = ApiMetrics()
    api.state.limiter = RateLimiter(
        per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst
    )
    for module in (operations, users, scripts, tasks, schedules):
        api.include_router(module.router)
    console.install(api)
    return api
