"""Users, their API tokens, and what counts against their caps."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, insert, select, update

from scheduling.errors import TokenNotFound, UserNotFound
from scheduling.models import ApiToken, User
from storage.schema import api_tokens, schedules, tasks, users
from storage.sql import rows
from storage.sql.schedules import live_schedules


def ensure_user(conn: Connection, *, first_name: str, last_name: str, now: datetime) -> int:
    """The first user of this name, created when there is none."""
    found = conn.execute(
        select(users.c.user_id)
        .where(users.c.first_name == first_name, users.c.last_name == last_name)
        .order_by(users.c.user_id)
        .limit(1)
    ).scalar()
    if found is not None:
        return int(found)
    return int(
        conn.execute(
            insert(users)
            .values(first_name=first_name, last_name=last_name, created_at=now)
            .returning(users.c.user_id)
        ).scalar_one()
    )


def add_user(conn: Connection, *, first_name: str, last_name: str, now: datetime) -> User:
    row = conn.execute(
        insert(users)
        .values(first_name=first_name, last_name=last_name, created_at=now)
        .returning(*users.c)
    ).one()
    return rows.user(row)


def get_user(conn: Connection, user_id: int) -> User:
    row = conn.execute(select(*users.c).where(users.c.user_id == user_id)).first()
    if row is None:
        raise UserNotFound(f"no user {user_id}", "user_id")
    return rows.user(row)


def list_users(conn: Connection) -> list[User]:
    return [rows.user(r) for r in conn.execute(select(*users.c).order_by(users.c.user_id))]


def add_token(
    conn: Connection, *, user_id: int, token_hash: str, label: str, now: datetime
) -> ApiToken:
    get_user(conn, user_id)
    row = conn.execute(
        insert(api_tokens)
        .values(user_id=user_id, token_hash=token_hash, label=label, created_at=now)
        .returning(*api_tokens.c)
    ).one()
    return rows.token(row)


def revoke_token(conn: Connection, token_id: int, *, now: datetime) -> ApiToken:
    conn.execute(
        update(api_tokens)
        .where(api_tokens.c.token_id == token_id, api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    row = conn.execute(select(*api_tokens.c).where(api_tokens.c.token_id == token_id)).first()
    if row is None:
        raise TokenNotFound(f"no token {token_id}", "token_id")
    return rows.token(row)


def user_for_token(conn: Connection, token_hash: str) -> int | None:
    """The user a live token belongs to."""
    found = conn.execute(
        select(api_tokens.c.user_id).where(
            api_tokens.c.token_hash == token_hash, api_tokens.c.revoked_at.is_(None)
        )
    ).scalar()
    return None if found is None else int(found)


def count_active(conn: Connection, owner_id: int) -> tuple[int, int]:
    """An owner's tasks not yet final, and live schedules (for the caps)."""
    active = rows.count(conn, tasks, tasks.c.owner_id == owner_id, tasks.c.status.in_(rows.ACTIVE))
    live = rows.count(conn, schedules, *live_schedules(owner_id))
    return active, live
