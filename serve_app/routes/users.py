from __future__ import annotations

from fastapi import APIRouter

from serve_app.deps import Admin, ObjectId, Owner, Svc
from serve_app.limits import StrictJsonRoute
from serve_app.render import token_out, user_out
from service.requests import TokenIn, UserIn

router = APIRouter(tags=["users"], route_class=StrictJsonRoute)


@router.post("/v1/users", status_code=201)
async def create_user(service: Svc, _: Admin, body: UserIn) -> dict:
    return user_out(await service.create_user(body))


@router.get("/v1/users")
async def list_users(service: Svc, _: Admin) -> dict:
    return {"users": [user_out(u) for u in await service.list_users()]}


@router.get("/v1/users/{user_id}")
async def get_user(service: Svc, _: Admin, user_id: ObjectId) -> dict:
    return user_out(await service.get_user(user_id))


@router.post("/v1/users/{user_id}/tokens", status_code=201)
async def issue_token(
    service: Svc, _: Admin, user_id: ObjectId, body: TokenIn | None = None
) -> dict:
    """The token is in this answer only; chronoray keeps its hash."""
    record, token = await service.issue_token(user_id, body or TokenIn())
    return {**token_out(record), "token": token}


@router.delete("/v1/tokens/{token_id}")
async def revoke_token(service: Svc, _: Admin, token_id: ObjectId) -> dict:
    return token_out(await service.revoke_token(token_id))


@router.get("/v1/me")
async def me(service: Svc, owner: Owner) -> dict:
    """The user the token belongs to."""
    return user_out(await service.me(owner))
