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
    # 100 tasks over 8 s, all in one range (so one shard owns them): from
    # 2 s on, or from the next range's start when this one ends sooner.
    now = datetime.now(timezone.utc)
    first = now + timedelta(seconds=2)
    wheel = settings.wheel
    if wheel.range_of(first + timedelta(seconds=8.5)) != wheel.range_of(first):
        next_range = (wheel.range_of(first) + 1) * wheel.range_s
        first = datetime.fromtimestamp(next_range + 0.5, timezone.utc)
    victim = wheel.shard_of(first)
    times = [first + timedelta(milliseconds=80 * i) for i in range(100)]
    assert {wheel.shard_of(t) for t in times} == {victim}
    tasks = client.submit_many(
        [{"script": "ledger-kill.sh", "execute_at": t, "max_attempts": 1} for t in times]
    )
    ids = {t.task_id for t in tasks}
    assert len(ids) == 100

    handle = shard_handle(victim, settings.namespace)
    pid = ray.get(handle.pid.remote())
    # some of the tasks have fired, most are still to come
    time.sleep(max(0.0, (first - datetime.now(timezone.utc)).total_seconds() + 1))
    os.kill(pid, signal.SIGKILL)
    assert ray.get(handle.pid.remote(), timeout=60) != pid  # restarted by Ray

    views = client.wait(sorted(ids), timeout_s=180, poll_s=1.0)
    assert {v.task.status.value for v in views} == {"succeeded"}
    per_task = runs_per_task(deployment, ids)
    assert set(per_task.values()) == {1}
    executed = [int(line) for line in Path(ledger).read_text().split()]
    assert sorted(executed) == sorted(ids)
