"""Users, scripts, tasks, runs and shard epochs.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from storage.schema import Id, UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("user_id", Id, primary_key=True, autoincrement=True),
        sa.Column("first_name", sa.String(100), nullable=False),
        sa.Column("last_name", sa.String(100), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "scripts",
        sa.Column("script_id", Id, primary_key=True, autoincrement=True),
        sa.Column("owner_id", Id, sa.ForeignKey("users.user_id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("interpreter", sa.String(16), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.UniqueConstraint("owner_id", "name", "version", name="uq_scripts_owner_name_version"),
    )
    op.create_table(
        "tasks",
        sa.Column("task_id", Id, primary_key=True, autoincrement=True),
        sa.Column("owner_id", Id, sa.ForeignKey("users.user_id"), nullable=False),
        sa.Column("script_id", Id, sa.ForeignKey("scripts.script_id"), nullable=False),
        sa.Column("schedule_id", Id, nullable=True),
        sa.Column("execute_at", UtcDateTime, nullable=False),
        sa.Column("bucket", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("variables", sa.JSON, nullable=False),
        sa.Column("timeout_s", sa.Float, nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", UtcDateTime, nullable=True),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.UniqueConstraint("schedule_id", "execute_at", name="uq_tasks_schedule_occurrence"),
        sa.UniqueConstraint("owner_id", "idempotency_key", name="uq_tasks_owner_idempotency_key"),
    )
    op.create_index("ix_tasks_status_bucket", "tasks", ["status", "bucket"])
    op.create_index("ix_tasks_status_lease", "tasks", ["status", "lease_expires_at"])
    op.create_table(
        "runs",
        sa.Column("run_id", Id, primary_key=True, autoincrement=True),
        sa.Column("task_id", Id, sa.ForeignKey("tasks.task_id"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("executor_id", sa.String(100), nullable=False),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("node_id", sa.String(100), nullable=False),
        sa.Column("due_at", UtcDateTime, nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=True),
        sa.Column("finished_at", UtcDateTime, nullable=False),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("output_tail", sa.Text, nullable=False),
        sa.Column("failure", sa.String(32), nullable=True),
        sa.UniqueConstraint("task_id", "attempt", name="uq_runs_task_attempt"),
    )
    op.create_table(
        "shards",
        sa.Column("shard", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
    )


def downgrade() -> None:
    for table in ("shards", "runs", "tasks", "scripts", "users"):
        op.drop_table(table)
