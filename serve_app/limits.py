"""Refuse an oversized body before buffering it."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.routing import APIRoute

from chronoray.errors import InvalidInput


class BodySizeLimit:
    """ASGI middleware: 413 when Content-Length, or the bytes actually
    received, pass ``max_bytes``."""

    def __init__(self, app, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(
            {
                "error": "too_large",
                "detail": f"request body over {self.max_bytes} bytes",
                "field": "body",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


MAX_JSON_INT = 2**63 - 1


def _reject_constant(name: str):
    raise InvalidInput(f"{name} is not a JSON number chronoray accepts", "body")


def _checked_int(text: str) -> int:
    value = int(text)
    if not -MAX_JSON_INT - 1 <= value <= MAX_JSON_INT:
        raise InvalidInput(f"integer {text[:24]}… does not fit in 64 bits", "body")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidInput(f"key {key[:64]!r} appears twice in one object", "body")
        seen[key] = value
    return seen


def check_json_body(body: bytes) -> None:
    """What Python's json module lets through but a strict API must not:
    invalid UTF-8, NaN/Infinity, integers beyond 64 bits and repeated keys
    (each a 422 naming the problem). Plain syntax errors are left to the
    framework (400)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"body is not valid UTF-8 (byte {exc.start})", "body") from None
    try:
        json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_checked_int,
            object_pairs_hook=_no_duplicate_keys,
        )
    except json.JSONDecodeError:
        return  # malformed: FastAPI answers 400


class StrictJsonRoute(APIRoute):
    """Routes whose JSON bodies pass ``check_json_body`` first."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            if request.method in ("POST", "PUT", "PATCH"):
                body = await request.body()
                if body and "json" in request.headers.get("content-type", "json"):
                    check_json_body(body)
            return await handler(request)

        return strict
