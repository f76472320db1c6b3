"""The tables (DESIGN.md, data model). Alembic migrations create them; this
metadata is what queries are written against and must match the head
revision (tests/contract checks that)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import Select
from sqlalchemy.types import TypeDecorator

# BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every backend.

    PostgreSQL stores timestamptz; SQLite stores text, so values are turned
    into UTC first, which also keeps its string comparisons in time order.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} cannot be stored")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("user_id", Id, primary_key=True, autoincrement=True),
    Column("first_name", String(100), nullable=False),
    Column("last_name", String(100), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

scripts = Table(
    "scripts",
    metadata,
    Column("script_id", Id, primary_key=True, autoincrement=True),
    Column("owner_id", Id, ForeignKey("users.user_id"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("interpreter", String(16), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    # deleted scripts keep their rows: finished tasks and runs still name them
    Column("deleted_at", UtcDateTime, nullable=True),
    UniqueConstraint("owner_id", "name", "version", name="uq_scripts_owner_name_version"),
)

# Only a token's SHA-256 is stored; the token itself is shown once, at issue.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("token_id", Id, primary_key=True, autoincrement=True),
    Column("user_id", Id, ForeignKey("users.user_id"), nullable=False),
    Column("token_hash", String(64), nullable=False),
    Column("label", String(100), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("revoked_at", UtcDateTime, nullable=True),
    UniqueConstraint("token_hash", name="uq_api_tokens_hash"),
)

schedules = Table(
    "schedules",
    metadata,
    Column("schedule_id", Id, primary_key=True, autoincrement=True),
    Column("owner_id", Id, ForeignKey("users.user_id"), nullable=False),
    Column("script_name", String(128), nullable=False),
    Column("cron", String(200), nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("variables", JSON, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("timeout_s", Float, nullable=False),
    Column("misfire_policy", String(16), nullable=False),
    Column("overlap_policy", String(16), nullable=False),
    Column("jitter_s", Float, nullable=False),
    Column("start_at", UtcDateTime, nullable=True),
    Column("end_at", UtcDateTime, nullable=True),
    Column("paused", Boolean, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("next_fire_at", UtcDateTime, nullable=True),
    Column("missed_fires", Integer, nullable=False),
    Column("skipped_fires", Integer, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    Column("task_id", Id, primary_key=True, autoincrement=True),
    # No foreign keys on owner and script on PostgreSQL (migration 0008: a
    # third of an insert's time; users and scripts are never deleted).
    Column("owner_id", Id, nullable=False),
    Column("script_id", Id, nullable=False),
    Column("schedule_id", Id, ForeignKey("schedules.schedule_id"), nullable=True),
    # the occurrence's own time: execute_at moves with retries, this does not
    Column("nominal_at", UtcDateTime, nullable=False),
    Column("buffered", Boolean, nullable=False, default=False),  # waits behind a run (buffer_one)
    Column("execute_at", UtcDateTime, nullable=False),
    Column("bucket", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("variables", JSON, nullable=False),
    Column("timeout_s", Float, nullable=False),
    Column("idempotency_key", String(200), nullable=True),
    Column("request_hash", String(64), nullable=True),
    Column("request_id", String(64), nullable=True),  # minted per submission: replays are no-ops
    Column("lease_expires_at", UtcDateTime, nullable=True),
    Column("epoch", Integer, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("lost_count", Integer, nullable=False, server_default="0"),
    # set on occurrences a backfill created: they run under this overlap
    # policy, are never misfires and do not move the schedule's plan
    Column("backfill_overlap", String(16), nullable=True),
    # Unique over the rows that have the key (partial on PostgreSQL: 0008).
    Index(
        "uq_tasks_schedule_occurrence",
        "schedule_id",
        "nominal_at",
        unique=True,
        postgresql_where=text("schedule_id IS NOT NULL"),
    ),
    Index(
        "uq_tasks_owner_idempotency_key",
        "owner_id",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
    UniqueConstraint("request_id", name="uq_tasks_request_id"),
    Index("ix_tasks_status_bucket", "status", "bucket"),
    Index("ix_tasks_status_lease", "status", "lease_expires_at"),
    Index("ix_tasks_owner_status", "owner_id", "status"),  # the caps' counts
    Index("ix_tasks_owner_task", "owner_id", "task_id"),  # a user's list, newest first
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", Id, primary_key=True, autoincrement=True),
    Column("task_id", Id, ForeignKey("tasks.task_id"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("executor_id", String(100), nullable=False),
    Column("tier", String(32), nullable=False),
    Column("node_id", String(100), nullable=False),
    Column("due_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime, nullable=True),
    Column("finished_at", UtcDateTime, nullable=False),
    Column("exit_code", Integer, nullable=True),
    Column("output_tail", Text, nullable=False),
    Column("failure", String(32), nullable=True),
    UniqueConstraint("task_id", "attempt", name="uq_runs_task_attempt"),
    Index("ix_runs_started_at", "started_at"),  # the console's last-hour charts
)

# Console sign-ins: a random session id (only its SHA-256 stored) for the
# API token it was exchanged for; that token's revocation ends the session.
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("session_hash", String(64), primary_key=True),
    Column("token_hash", String(64), nullable=True),  # NULL for the admin
    Column("admin", Boolean, nullable=False),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
)

# A shard's epoch rises every time it (re)starts; a claim names the epoch it
# holds, so a superseded incarnation's claims change nothing.
shards = Table(
    "shards",
    metadata,
    Column("shard", Integer, primary_key=True, autoincrement=False),
    Column("epoch", Integer, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
)


def newest_script(owner_id: int, name: str, *columns: Any) -> Select[Any]:
    """The newest live version of an owner's script by name (one row at most)."""
    return (
        select(*columns)
        .where(
            scripts.c.owner_id == owner_id,
            scripts.c.name == name,
            scripts.c.deleted_at.is_(None),
        )
        .order_by(scripts.c.version.desc())
        .limit(1)
    )
