from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from scheduling.models import Interpreter
from serve_app.deps import AGAIN, Owner, Svc
from serve_app.limits import StrictJsonRoute
from serve_app.render import JsonAnswer, script_out
from service.requests import ScriptIn

router = APIRouter(tags=["scripts"], route_class=StrictJsonRoute)
Version = Query(None, ge=1, le=2**31 - 1)
# Documented as bytes only, which client generators understand; the route
# also takes the text types in RAW_SCRIPT_TYPES (text/plain, text/x-sh, …).
RAW_SCRIPT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
BYTES_ANSWER = {
    200: {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    }
}


def _stored(answer) -> JsonAnswer:
    script, created = answer
    return JsonAnswer(script_out(script), status_code=201 if created else 200)


@router.post("/v1/scripts", status_code=201, responses=AGAIN)
async def register_script(service: Svc, owner: Owner, body: ScriptIn) -> JsonAnswer:
    """Register a script from JSON; the same body again is the same version (200)."""
    return _stored(
        await service.register_script(
            owner, body.name, body.body.encode(), interpreter=body.interpreter
        )
    )


@router.put("/v1/scripts/{name}", status_code=201, openapi_extra=RAW_SCRIPT_BODY, responses=AGAIN)
async def upload_script(
    service: Svc,
    owner: Owner,
    name: str,
    request: Request,
    interpreter: Interpreter = Interpreter.BASH,
) -> JsonAnswer:
    """Upload a script as the raw request body (application/octet-stream,
    or text/plain, text/x-sh, text/x-shellscript, application/x-sh,
    text/x-python, text/x-script.python); a changed body is a new version."""
    service.check_raw_upload(name, request.headers.get("content-type", ""))
    body = await request.body()
    return _stored(await service.upload_script(owner, name, body, interpreter=interpreter))


@router.get("/v1/scripts")
async def list_scripts(service: Svc, owner: Owner) -> dict:
    """The newest version of each of the caller's scripts."""
    return {"scripts": [script_out(s) for s in await service.list_scripts(owner)]}


@router.get("/v1/scripts/{name}")
async def get_script(service: Svc, owner: Owner, name: str, version: int | None = Version) -> dict:
    return script_out(await service.get_script(owner, name, version))


@router.get("/v1/scripts/{name}/versions")
async def script_versions(service: Svc, owner: Owner, name: str) -> dict:
    """Every live version, newest first, each with its content hash."""
    found = await service.script_versions(owner, name)
    return {"name": name, "versions": [script_out(s) for s in found]}


@router.get("/v1/scripts/{name}/body", responses=BYTES_ANSWER)
async def script_body(
    service: Svc, owner: Owner, name: str, version: int | None = Version
) -> Response:
    """The script itself (the newest version unless ``version`` is given)."""
    body = await service.script_body(owner, name, version)
    return Response(body, media_type="application/octet-stream")


@router.delete("/v1/scripts/{name}")
async def delete_script(service: Svc, owner: Owner, name: str) -> dict:
    """Delete every version; 409 while a pending task or a schedule uses it."""
    return {"name": name, "deleted_versions": await service.delete_script(owner, name)}
