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
    NotFound,
    TooLarge,
    Unavailable,
)

log = logging.getLogger(__name__)

STATUS_BY_ERROR: list[tuple[type[ChronorayError], int]] = [
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


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or "body"
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body("malformed_json", "request body is not valid JSON", "body"), 400)
    if first.get("type") == "extra_forbidden":
        return JSONResponse(error_body("unknown_field", f"unknown field {field!r}", field), 422)
    detail = str(first.get("msg", "invalid value"))
    ctx_error = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_error, ChronorayError):  # raised by our own validators
        return error_response(type(ctx_error)(ctx_error.detail, ctx_error.field or field))
    return JSONResponse(error_body("invalid_input", detail, field), 422)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ChronorayError)
    async def _domain(_: Request, exc: ChronorayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)
