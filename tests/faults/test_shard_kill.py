"""SIGKILL of a shard actor while it holds 100 tasks due in the next 10 s:
all 100 still run, none twice."""

import os
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import ray

from actors.handles import shard_handle
from tests.conftest import shared_file
from tests.ray_cluster import runs_per_task

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow]


def test_killed_shard_restarts_and_every_task_runs_once(deployment, client, tmp_path):
    settings = deployment.settings
    ledger = shared_file(tmp_path, "ledger")
    client.register_script("ledger-kill.sh", f'echo "$CHRONORAY_TASK_ID" >> {ledger}')
    # 100 tasks spread over the next 10 s, all inside ranges of one shard.
    now = datetime.now(timezone.utc)
    first = now + timedelta(seconds=2)
    victim = settings.wheel.shard_of(first)
    times = [first + timedelta(milliseconds=80 * i) for i in range(100)]
    times = [
        t if settings.wheel.shard_of(t) == victim else t + timedelta(seconds=settings.range_s)
        for t in times
    ]
    tasks = client.submit_many(
        [{"script": "ledger-kill.sh", "execute_at": t, "max_attempts": 1} for t in times]
    )
    ids = {t.task_id for t in tasks}
    assert len(ids) == 100

    handle = shard_handle(victim, settings.namespace)
    pid = ray.get(handle.pid.remote())
    time.sleep(3)  # some of the tasks have fired, most are still to come
    os.kill(pid, signal.SIGKILL)
    assert ray.get(handle.pid.remote(), timeout=60) != pid  # restarted by Ray

    views = client.wait(sorted(ids), timeout_s=180, poll_s=1.0)
    assert {v.task.status.value for v in views} == {"succeeded"}
    per_task = runs_per_task(deployment, ids)
    assert set(per_task.values()) == {1}
    executed = [int(line) for line in Path(ledger).read_text().split()]
    assert sorted(executed) == sorted(ids)
