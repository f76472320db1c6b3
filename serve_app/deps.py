"""What every route depends on: the service, who calls, and path types."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from scheduling.errors import Unauthorized
from serve_app.limits import WriteTracker
from service.auth import Caller
from service.core import Service

BEARER = HTTPBearer(
    auto_error=False,
    description="A user's API token; the admin token (CHRONORAY_ADMIN_TOKEN) for users and tokens.",
)


async def _service(request: Request) -> Service:
    # async: FastAPI runs a plain def dependency on its thread pool, a thread
    # hop per request (8 % of a replica's CPU in a profile of POST /v1/tasks)
    return request.app.state.service


async def _caller(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Security(BEARER)
) -> Caller:
    if credentials is None:
        raise Unauthorized("send Authorization: Bearer <token>", "authorization")
    service: Service = request.app.state.service
    return await service.caller(credentials.credentials)


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
Svc = Annotated[Service, Depends(_service)]
Owner = Annotated[int, Depends(_owner)]  # the user a request speaks for; 401 without a token
Admin = Annotated[Caller, Depends(_admin)]
AGAIN = {200: {"description": "the same body (or idempotency key) again: what is already stored"}}


def count(request: Request, kind: str, created: int = 0) -> None:
    """API metrics: accepted submissions by kind, tasks created by batches."""
    metrics = request.app.state.metrics
    metrics.submissions.labels(kind=kind).inc()
    if kind == "batch":
        metrics.batch_tasks.inc(created)
