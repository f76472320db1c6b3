"""Scripts: versioned bodies by (owner, name). A version number never names
two bodies, and an upload of the newest body again stores nothing."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, insert, select, update

from scheduling.errors import ScriptInUse, ScriptNotFound
from scheduling.models import Interpreter, Script
from storage.repository import sha256_hex
from storage.schema import newest_script, schedules, scripts, tasks
from storage.sql import rows
from storage.sql.schedules import live_schedules


def live(owner_id: int, name: str | None = None) -> list[Any]:
    where = [scripts.c.owner_id == owner_id, scripts.c.deleted_at.is_(None)]
    return where if name is None else [*where, scripts.c.name == name]


def add_script(
    conn: Connection,
    *,
    owner_id: int,
    name: str,
    interpreter: Interpreter,
    body: bytes,
    now: datetime,
) -> tuple[Script, bool]:
    """The script and whether a version was created. Two uploads racing for
    the next version number: one fails on the unique key (the caller retries)."""
    digest = sha256_hex(body)
    latest = conn.execute(newest_script(owner_id, name, *rows.SCRIPT_COLUMNS)).first()
    if latest is not None and latest.sha256 == digest and latest.interpreter == interpreter.value:
        return rows.script(latest), False
    # deleted versions keep their numbers: a version never names two bodies
    highest = conn.execute(
        select(func.max(scripts.c.version)).where(
            scripts.c.owner_id == owner_id, scripts.c.name == name
        )
    ).scalar()
    script_id = conn.execute(
        insert(scripts)
        .values(
            owner_id=owner_id,
            name=name,
            version=(highest or 0) + 1,
            sha256=digest,
            interpreter=interpreter.value,
            body=body,
            created_at=now,
        )
        .returning(scripts.c.script_id)
    ).scalar_one()
    row = conn.execute(select(*rows.SCRIPT_COLUMNS).where(scripts.c.script_id == script_id)).one()
    return rows.script(row), True


def latest(conn: Connection, owner_names: set[tuple[int, str]]) -> dict[tuple[int, str], Script]:
    """The newest live version of each (owner, name) that has one."""
    found = {}
    for owner_id, name in owner_names:
        row = conn.execute(newest_script(owner_id, name, *rows.SCRIPT_COLUMNS)).first()
        if row is not None:
            found[(owner_id, name)] = rows.script(row)
    return found


def get_script(conn: Connection, *, owner_id: int, name: str, version: int | None) -> Script:
    if version is None:
        script = latest(conn, {(owner_id, name)}).get((owner_id, name))
    else:
        row = conn.execute(
            select(*rows.SCRIPT_COLUMNS).where(*live(owner_id, name), scripts.c.version == version)
        ).first()
        script = None if row is None else rows.script(row)
    if script is None:
        where = "" if version is None else f" of version {version}"
        raise ScriptNotFound(f"no script named {name!r}{where}", "script")
    return script


def list_scripts(conn: Connection, *, owner_id: int) -> list[Script]:
    """The newest live version of each of an owner's scripts, by name."""
    newest = (
        select(scripts.c.name, func.max(scripts.c.version).label("version"))
        .where(*live(owner_id))
        .group_by(scripts.c.name)
        .subquery()
    )
    found = conn.execute(
        select(*rows.SCRIPT_COLUMNS)
        .join(newest, and_(scripts.c.name == newest.c.name, scripts.c.version == newest.c.version))
        .where(scripts.c.owner_id == owner_id)
        .order_by(scripts.c.name)
    ).all()
    return [rows.script(row) for row in found]


def script_versions(conn: Connection, *, owner_id: int, name: str) -> list[Script]:
    found = conn.execute(
        select(*rows.SCRIPT_COLUMNS).where(*live(owner_id, name)).order_by(scripts.c.version.desc())
    ).all()
    if not found:
        raise ScriptNotFound(f"no script named {name!r}", "script")
    return [rows.script(row) for row in found]


def delete_script(conn: Connection, *, owner_id: int, name: str, now: datetime) -> int:
    """Delete every version of a script that no pending task and no live
    schedule uses; finished tasks keep naming it. Returns the versions
    deleted."""
    version_ids = select(scripts.c.script_id).where(*live(owner_id, name))
    pending = rows.count(
        conn, tasks, tasks.c.script_id.in_(version_ids), tasks.c.status.in_(rows.ACTIVE)
    )
    scheduled = rows.count(
        conn, schedules, *live_schedules(owner_id), schedules.c.script_name == name
    )
    if pending or scheduled:
        raise ScriptInUse(
            f"script {name!r} is used by {pending} pending tasks and {scheduled} schedules",
            "script",
        )
    deleted = int(
        conn.execute(update(scripts).where(*live(owner_id, name)).values(deleted_at=now)).rowcount
    )
    if not deleted:
        raise ScriptNotFound(f"no script named {name!r}", "script")
    return deleted


def script_body(conn: Connection, script_id: int) -> bytes:
    body = conn.execute(select(scripts.c.body).where(scripts.c.script_id == script_id)).scalar()
    if body is None:
        raise ScriptNotFound(f"no script with id {script_id}", "script_id")
    return bytes(body)
