"""The one table that maps domain errors to HTTP answers."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
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
    UnsupportedMediaType,
)
from serve_app.render import JsonAnswer
from service.requests import error_from_validation

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


def error_response(error: ChronorayError) -> JsonAnswer:
    status = status_for(error)
    headers = error_headers(error, status)
    return JsonAnswer(error_body(error.code, error.detail, error.field), status, headers=headers)


CONSOLE_PREFIX = "/ui/"


def _console(request: Request) -> Any:
    """The console's error pages, for a request to it (else None: JSON)."""
    pages = getattr(request.app.state, "console_errors", None)
    return pages if pages and request.url.path.startswith(CONSOLE_PREFIX) else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ChronorayError)
    async def _domain(request: Request, exc: ChronorayError) -> Response:
        pages = _console(request)
        return pages(request, exc) if pages else error_response(exc)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JsonAnswer:
        # Not a domain error: a bug. Logged with its traceback; the client
        # gets JSON like every other error, and nothing of the internals.
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JsonAnswer(error_body("internal_error", "an unexpected error; it is logged"), 500)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        pages = _console(request)
        return pages(request, exc) if pages else error_response(error_from_validation(exc.errors()))
