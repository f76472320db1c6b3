"""Schedules; occurrences are unique by their nominal time, not execute_at
(which a retry moves).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from storage.schema import Id, UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("schedule_id", Id, primary_key=True, autoincrement=True),
        sa.Column("owner_id", Id, sa.ForeignKey("users.user_id"), nullable=False),
        sa.Column("script_name", sa.String(128), nullable=False),
        sa.Column("cron", sa.String(200), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("variables", sa.JSON, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("timeout_s", sa.Float, nullable=False),
        sa.Column("misfire_policy", sa.String(16), nullable=False),
        sa.Column("overlap_policy", sa.String(16), nullable=False),
        sa.Column("jitter_s", sa.Float, nullable=False),
        sa.Column("start_at", UtcDateTime, nullable=True),
        sa.Column("end_at", UtcDateTime, nullable=True),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("next_fire_at", UtcDateTime, nullable=True),
        sa.Column("missed_fires", sa.Integer, nullable=False),
        sa.Column("skipped_fires", sa.Integer, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("nominal_at", UtcDateTime, nullable=True))
        batch.add_column(
            sa.Column("buffered", sa.Boolean, nullable=False, server_default=sa.false())
        )
    op.execute("UPDATE tasks SET nominal_at = execute_at")
    with op.batch_alter_table("tasks") as batch:
        batch.alter_column("nominal_at", existing_type=UtcDateTime, nullable=False)
        batch.drop_constraint("uq_tasks_schedule_occurrence", type_="unique")
        batch.create_unique_constraint(
            "uq_tasks_schedule_occurrence", ["schedule_id", "nominal_at"]
        )
        batch.create_foreign_key("fk_tasks_schedule", "schedules", ["schedule_id"], ["schedule_id"])


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_constraint("fk_tasks_schedule", type_="foreignkey")
        batch.drop_constraint("uq_tasks_schedule_occurrence", type_="unique")
        batch.create_unique_constraint(
            "uq_tasks_schedule_occurrence", ["schedule_id", "execute_at"]
        )
        batch.drop_column("buffered")
        batch.drop_column("nominal_at")
    op.drop_table("schedules")
