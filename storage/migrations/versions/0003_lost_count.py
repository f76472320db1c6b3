"""Executor losses per task: only the first one uses up an attempt.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("lost_count", sa.Integer, nullable=False, server_default="0"))
        batch.create_index("ix_tasks_owner_status", ["owner_id", "status"])


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ix_tasks_owner_status")
        batch.drop_column("lost_count")
