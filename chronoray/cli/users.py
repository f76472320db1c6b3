"""`chronoray users …`."""

from __future__ import annotations

import typer

from chronoray.cli.base import (
    JSON_OPTION,
    api,
    show,
    table,
)

users_app = typer.Typer(
    help="Users and API tokens (CHRONORAY_ADMIN_TOKEN; `me` takes a user's token).",
    no_args_is_help=True,
)


@users_app.command("create")
def users_create(
    first_name: str,
    last_name: str,
    token: bool = typer.Option(True, help="also issue the user's first token"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a user (admin), and by default a token for them."""
    user = api().call(
        "POST",
        "/v1/users",
        admin=True,
        json={"first_name": first_name, "last_name": last_name},
    )
    if token:
        user["token"] = api().call(
            "POST", f"/v1/users/{user['user_id']}/tokens", admin=True, json={}
        )
    line = f"user {user['user_id']} {first_name} {last_name}"
    if token:
        line += f"\ntoken {user['token']['token_id']}: {user['token']['token']}  (shown once)"
    show(user, as_json, line)


@users_app.command("list")
def users_list(as_json: bool = JSON_OPTION) -> None:
    """Every user (admin)."""
    body = api().call("GET", "/v1/users", admin=True)
    columns = {
        "id": "user_id",
        "first name": "first_name",
        "last name": "last_name",
        "created": "created_at",
    }
    show(body, as_json, table(body["users"], columns))


@users_app.command("token")
def users_token(
    user_id: int,
    label: str = typer.Option("", help="what the token is for"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Issue a token for a user (admin); it is shown once."""
    body = api().call("POST", f"/v1/users/{user_id}/tokens", admin=True, json={"label": label})
    show(body, as_json, f"token {body['token_id']}: {body['token']}  (shown once)")


@users_app.command("revoke")
def users_revoke(token_id: int, as_json: bool = JSON_OPTION) -> None:
    """Revoke a token (admin); it stops working at once."""
    body = api().call("DELETE", f"/v1/tokens/{token_id}", admin=True)
    show(body, as_json, f"token {token_id} revoked at {body['revoked_at']}")


@users_app.command("me")
def users_me(as_json: bool = JSON_OPTION) -> None:
    """The user your token belongs to."""
    body = api().call("GET", "/v1/me")
    show(body, as_json, f"user {body['user_id']} {body['first_name']} {body['last_name']}")
