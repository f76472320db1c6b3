"""The one table that maps domain errors to HTTP answers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from chronoray.errors import (
    ChronorayError,
    Conflict,
    InvalidInput,
    MalformedJson,
    NotFound,
    TooLarge,
    Unavailable,
    UnknownField,
)

log = logging.getLogger(__name__)

STATUS_BY_ERROR: list[tuple[type[ChronorayError], int]] = [
    (MalformedJson, 400),
    (TooLarge, 413),
    (InvalidInput, 422),
    (NotFound, 404),
    (Conflict, 409),
    (Unavailable, 503),
]
RETRY_AFTER_S = {503: 5}


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


def error_response(error: ChronorayError) -> JSONResponse:
    status = status_for(error)
    headers = {"Retry-After": str(RETRY_AFTER_S[status])} if status in RETRY_AFTER_S else None
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
        return UnknownField(f"unknown field {field!r}", field)
    ctx_error = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_error, ChronorayError):  # raised by our own validators
        return type(ctx_error)(ctx_error.detail, ctx_error.field or field)
    return InvalidInput(str(first.get("msg", "invalid value")), field)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ChronorayError)
    async def _domain(_: Request, exc: ChronorayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(error_from_validation(exc.errors()))
