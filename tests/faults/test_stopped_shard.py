"""Defect 7: a shard that does not answer (SIGSTOP: alive to Ray, silent)
bounds the wait of whoever calls it, and stalls no other shard."""

import os
import signal
import time
from datetime import UTC, datetime, timedelta

import pytest
import ray

from actors.handles import CALL_TIMEOUT_S, shard_handle
from chronoray import Client
from scheduling.errors import Unavailable
from tests.conftest import shared_file
from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow]
# The driver's bound, shorter than its 30 s default so the test waits less.
DRIVER_TIMEOUT_S = 5.0


def test_a_stopped_shard_answers_503_in_bounded_time_and_the_other_shard_fires(
    deployment, client, http, tmp_path
):
    settings = deployment.settings
    ledger = shared_file(tmp_path, "ledger")
    client.register_script("stopped-shard.sh", f'echo "$CHRONORAY_TASK_ID" >> {ledger}')
    soon = datetime.now(UTC) + timedelta(seconds=3)
    healthy = settings.wheel.shard_of(soon)  # owns what is due now
    later = soon + timedelta(seconds=settings.range_s)
    victim = settings.wheel.shard_of(later)
    assert victim != healthy
    pid = ray.get(shard_handle(victim, settings.namespace).pid.remote(), timeout=30)

    keyed = {
        "script": "stopped-shard.sh",
        "execute_at": later.isoformat(),
        "idempotency_key": "stopped-shard-http",
    }
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        answer = http.post("/v1/tasks", json=keyed)
        took_http = time.monotonic() - began
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "5"
        assert f"shard {victim} did not answer" in answer.json()["detail"]

        impatient = Client(namespace=settings.namespace, call_timeout_s=DRIVER_TIMEOUT_S)
        began = time.monotonic()
        with pytest.raises(Unavailable, match="did not answer"):
            impatient.submit("stopped-shard.sh", later, idempotency_key="stopped-shard-driver")
        took_driver = time.monotonic() - began

        # meanwhile the other shard takes work and fires it
        fired = http.post(
            "/v1/tasks", json={"script": "stopped-shard.sh", "execute_at": soon.isoformat()}
        )
        assert fired.status_code == 201, fired.text
        task_id = fired.json()["task_id"]
        wait_for(
            lambda: str(task_id) in ledger.read_text().split(),
            timeout_s=30,
            what="the healthy shard's task to run",
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    # bounded: a caller waits for the timeout, not for the shard
    assert took_http <= CALL_TIMEOUT_S + 10
    assert DRIVER_TIMEOUT_S - 0.5 <= took_driver <= DRIVER_TIMEOUT_S + 10

    # A 503 means "not acknowledged", not "not stored": the frozen shard may
    # take the calls still queued for it once it wakes. The same keys again
    # give one task each.
    again = http.post("/v1/tasks", json=keyed)
    assert again.status_code in (200, 201), again.text
    assert http.post("/v1/tasks", json=keyed).json()["task_id"] == again.json()["task_id"]
    driver = client.submit("stopped-shard.sh", later, idempotency_key="stopped-shard-driver")
    stored, _ = client.list_tasks(script="stopped-shard.sh")
    assert sorted(t.task_id for t in stored) == sorted(
        {task_id, again.json()["task_id"], driver.task_id}
    )
