"""Refuse an oversized body before buffering it."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute

from scheduling.errors import InvalidInput, UnknownField, UnsupportedMediaType
from service.requests import media_type


class BodySizeLimit:
    """ASGI middleware: 413 when Content-Length, or the bytes actually
    received, pass ``max_bytes``."""

    def __init__(self, app, *, max_bytes: int, tighter: tuple[tuple[str, int], ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # (path regex, cap): e.g. a raw script upload is capped at the script size
        self.tighter = [(re.compile(pattern), cap) for pattern, cap in tighter]

    def cap_for(self, path: str) -> int:
        return min([self.max_bytes, *(cap for rx, cap in self.tighter if rx.fullmatch(path))])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = self.cap_for(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return await self._refuse(send, cap)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(send, cap)

    async def _refuse(self, send, cap: int) -> None:
        body = json.dumps(
            {
                "error": "too_large",
                "detail": f"request body over {cap} bytes",
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


def check_json_body(body: bytes) -> Any:
    """What Python's json module lets through but a strict API must not:
    invalid UTF-8, NaN/Infinity, integers beyond 64 bits and repeated keys
    (each a 422 naming the problem). Plain syntax errors are left to the
    framework (400): ``NOT_PARSED``. Returns the parsed body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"body is not valid UTF-8 (byte {exc.start})", "body") from None
    try:
        return json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_checked_int,
            object_pairs_hook=_no_duplicate_keys,
        )
    except json.JSONDecodeError:
        return NOT_PARSED  # malformed: FastAPI answers 400


NOT_PARSED = object()


def is_json(content_type: str) -> bool:
    media = media_type(content_type)
    return media == "application/json" or media.endswith("+json")


def _query_names(dependant) -> set[str]:
    """Every query parameter a route declares, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


class StrictJsonRoute(APIRoute):
    """Routes whose JSON bodies pass ``check_json_body`` first; a body of
    another declared media type is a 415 (no Content-Type: read as JSON)."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        takes_json = self.body_field is not None
        known_query = _query_names(self.dependant)

        async def strict(request: Request):
            for name in request.query_params:
                if name not in known_query:  # a typo must not silently widen a query
                    raise UnknownField(f"unknown query parameter {name[:64]!r}", name[:64])
            if takes_json and request.method in ("POST", "PUT", "PATCH"):
                body = await request.body()
                content_type = request.headers.get("content-type", "application/json")
                if body and not is_json(content_type):
                    raise UnsupportedMediaType(
                        f"send application/json, not {content_type[:64]!r}", "content-type"
                    )
                if body and (parsed := check_json_body(body)) is not NOT_PARSED:
                    # Starlette's Request.json() keeps what it parsed in
                    # ``_json``: FastAPI then validates this body without
                    # parsing it again (a 1,000-task batch is 100 KB).
                    request._json = parsed
            return await handler(request)

        return strict


class WriteTracker:
    """ASGI middleware: after a user's successful write, and before the
    answer leaves, the repository notes where the primary's log stands,
    so that user's next reads wait for a replica to catch up or go to the
    primary (read-your-writes with read replicas)."""

    OWNER_KEY = "chronoray.owner"
    READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app, *, repo) -> None:
        self.app = app
        self.repo = repo
        self.tracking = repo.tracks_writes  # no replicas: nothing to note

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.tracking or scope["method"] in self.READ_METHODS:
            return await self.app(scope, receive, send)

        async def noting_send(message):
            owner = scope.get(self.OWNER_KEY)
            if message["type"] == "http.response.start" and owner and message["status"] < 400:
                await asyncio.to_thread(self.repo.note_write, owner)
            await send(message)

        await self.app(scope, receive, noting_send)
