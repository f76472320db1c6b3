"""1,000 tasks due within the same 2 s all run exactly once."""

from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import ray

from actors.handles import POOL_NAME
from tests.conftest import shared_file
from tests.ray_cluster import run_rows, runs_per_task

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow]


def test_a_thousand_tasks_due_within_two_seconds_run_exactly_once(deployment, client, tmp_path):
    ledger = shared_file(tmp_path, "ledger")
    # The script writes its own ledger line: proof of execution that does not
    # depend on chronoray's bookkeeping. O_APPEND writes of one line are atomic.
    client.register_script("ledger.sh", f'echo "$CHRONORAY_TASK_ID $CHRONORAY_ATTEMPT" >> {ledger}')
    start = datetime.now(timezone.utc) + timedelta(seconds=8)
    requests = [
        {
            "script": "ledger.sh",
            "execute_at": start + timedelta(milliseconds=2 * i),
            "max_attempts": 1,
        }
        for i in range(1000)
    ]
    tasks = client.submit_many(requests)
    ids = {t.task_id for t in tasks}
    assert len(ids) == 1000
    views = client.wait(sorted(ids), timeout_s=180, poll_s=1.0)
    failed = {
        v.task.task_id: [
            (r.failure and r.failure.value, r.exit_code, r.output_tail) for r in v.runs
        ]
        for v in views
        if v.task.status.value != "succeeded"
    }
    assert failed == {}
    per_task = runs_per_task(deployment, ids)
    assert set(per_task) == ids and set(per_task.values()) == {1}
    executed = Counter(line.split()[0] for line in Path(ledger).read_text().splitlines())
    twice = {int(t): n for t, n in executed.items() if n != 1}
    # on failure: each doubled task's ledger lines and its runs rows
    assert twice == {}, (
        [line for line in Path(ledger).read_text().splitlines() if int(line.split()[0]) in twice],
        run_rows(deployment, twice),
    )
    assert {int(t) for t in executed} == ids  # none missing
    # the queue grew the small tier from its minimum (2) to its maximum (3)
    pool = ray.get_actor(POOL_NAME, namespace=deployment.settings.namespace)
    small = ray.get(pool.status.remote())["tiers"]["small"]
    assert (small["min"], small["live"] + small["starting"]) == (2, 3)
