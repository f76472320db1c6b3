"""The one table that maps domain errors to HTTP answers."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from scheduling.errors import (
    ChronorayError,
    Conflict,
    Forbidden,
    InvalidInput,
    MalformedJson,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnknownField,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)

STATUS_BY_ERROR: list[tuple[type[ChronorayError], int]] = [
    (MalformedJson, 400),
    (Unauthorized, 401),
    (Forbidden, 403),
    (TooLarge, 413),
    (UnsupportedMediaType, 415),
    (RateLimited, 429),
    (InvalidInput, 422),
    (NotFound, 404),
    (Conflict, 409),
    (Unavailable, 503),
]
RETRY_AFTER_S = {503: 5}
# What a client may never set; named in the error so it is not taken for a typo.
SERVER_FIELDS = frozenset(
    {
        "owner",
        "owner_id",
        "user_id",
        "status",
        "attempt",
        "task_id",
        "script_id",
        "schedule_id",
        "run_id",
        "epoch",
        "created_at",
        "updated_at",
        "lease_expires_at",
        "lost_count",
        "bucket",
    }
)


class ErrorOut(BaseModel):
    error: str
    detail: str
    field: str | None = None


ERROR_STATUS_MEANING = {
    400: "malformed JSON",
    401: "no token, or an unknown or revoked one",
    403: "a token of the wrong kind (admin vs user)",
    404: "no such object for this user",
    409: "conflict with the object's state",
    413: "body or script too large",
    415: "unsupported content type",
    422: "a field is invalid; 'field' names it",
    429: "rate limit or cap reached; see Retry-After",
    503: "a dependency is unavailable; see Retry-After",
}
# Documented on every route of the OpenAPI document.
ERROR_RESPONSES = {
    status: {"model": ErrorOut, "description": meaning}
    for status, meaning in ERROR_STATUS_MEANING.items()
}


def status_for(error: ChronorayError) -> int:
    for kind, status in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return status
    return 500  # a ChronorayError nobody mapped is a bug


def error_body(code: str, detail: str, field: str | None = None) -> dict:
    body = {"error": code, "detail": detail}
    if field:
        body["field"] = field
    return body


def error_headers(error: ChronorayError, status: int) -> dict[str, str] | None:
    if isinstance(error, RateLimited):
        return {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    return {"Retry-After": str(RETRY_AFTER_S[status])} if status in RETRY_AFTER_S else None


def error_response(error: ChronorayError) -> JSONResponse:
    status = status_for(error)
    headers = error_headers(error, status)
    return JSONResponse(error_body(error.code, error.detail, error.field), status, headers=headers)


def error_from_validation(errors: list[dict]) -> ChronorayError:
    """The first pydantic error as a domain error naming its field."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or "body"
    kind = first.get("type")
    if kind == "json_invalid":
        return MalformedJson("request body is not valid JSON", "body")
    if kind == "extra_forbidden":
        if location and location[-1] in SERVER_FIELDS:
            return UnknownField(f"{field!r} is set by the server, not the client", field)
        return UnknownField(f"unknown field {field!r}", field)
    ctx_error = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_error, ChronorayError):  # raised by our own validators
        return type(ctx_error)(ctx_error.detail, ctx_error.field or field)
    return InvalidInput(str(first.get("msg", "invalid value")), field)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ChronorayError)
    async def _domain(_: Request, exc: ChronorayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Not a domain error: a bug. Logged with its traceback; the client
        # gets JSON like every other error, and nothing of the internals.
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "an unexpected error; it is logged"), 500)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(error_from_validation(exc.errors()))
