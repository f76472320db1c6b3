"""History retention in the deployment: shard 0 removes finished tasks and
their runs once they are older than the retention (30 days), and keeps the
rest. The test ages rows in the database instead of waiting a month."""

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, update

from scheduling.timeline import bucket_of
from storage.schema import runs, tasks
from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres]


def test_shard_zero_removes_finished_history_older_than_the_retention(deployment, client):
    client.register_script("retained.sh", "echo kept or not")
    now = datetime.now(timezone.utc)
    old, recent = client.submit_many(
        [{"script": "retained.sh", "execute_at": now} for _ in range(2)]
    )
    views = client.wait([old.task_id, recent.task_id], timeout_s=60)
    assert {v.task.status.value for v in views} == {"succeeded"}
    assert deployment.settings.retention_days == 30

    aged = now - timedelta(days=31)
    engine = deployment.repo.engine
    with engine.begin() as conn:  # a month passes for `old`
        conn.execute(
            update(tasks)
            .where(tasks.c.task_id == old.task_id)
            .values(execute_at=aged, bucket=bucket_of(aged), updated_at=aged)
        )

    def left(task_id: int) -> tuple[int, int]:
        with engine.connect() as conn:
            return (
                conn.execute(select(func.count()).where(tasks.c.task_id == task_id)).scalar_one(),
                conn.execute(select(func.count()).where(runs.c.task_id == task_id)).scalar_one(),
            )

    retention_round = deployment.settings.retention_interval_s
    wait_for(lambda: left(old.task_id) == (0, 0), timeout_s=10 * retention_round, what="purge")
    assert left(recent.task_id) == (1, 1)  # finished, but young (the rest: contract tests)
