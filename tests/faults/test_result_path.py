"""The executor commits its own results: a dispatcher and an owner shard
that do not answer (SIGSTOP) hold up no result's row. Before, a restarting
dispatcher or shard stood between a script's exit and its row, and a
schedule with overlap ``skip`` skipped its next occurrence (chaos 7)."""

import os
import signal
from datetime import UTC, datetime, timedelta

import pytest
import ray

from actors.handles import DISPATCHER_NAME, shard_handle
from tests.conftest import shared_file
from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow]


def test_results_commit_while_the_dispatcher_and_the_owner_shard_are_frozen(
    deployment, client, tmp_path
):
    settings = deployment.settings
    ledger = shared_file(tmp_path, "ledger")
    # Each script writes its line, then waits for the harness's go, so both
    # are running when the control plane freezes.
    go = tmp_path / "go"
    client.register_script(
        "frozen-ok.sh",
        f'echo "ok $CHRONORAY_ATTEMPT" >> {ledger}; while [ ! -e {go} ]; do sleep 0.05; done',
    )
    client.register_script(
        "frozen-fail.sh",
        f'echo "fail $CHRONORAY_ATTEMPT" >> {ledger}; '
        f'while [ ! -e {go} ]; do sleep 0.05; done; [ "$CHRONORAY_ATTEMPT" = 2 ]',
    )
    due = datetime.now(UTC) + timedelta(seconds=1)
    ok = client.submit("frozen-ok.sh", due)
    fail = client.submit("frozen-fail.sh", due, max_attempts=2)
    wait_for(
        lambda: sorted(ledger.read_text().splitlines()) == ["fail 1", "ok 1"],
        timeout_s=30,
        what="both scripts to start",
    )
    dispatcher = ray.get_actor(DISPATCHER_NAME, namespace=settings.namespace)
    pids = {
        ray.get(dispatcher.pid.remote(), timeout=30),
        *(
            ray.get(shard_handle(shard, settings.namespace).pid.remote(), timeout=30)
            for shard in {settings.wheel.owner_of(t.task_id, due) for t in (ok, fail)}
        ),
    }
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        go.touch()
        wait_for(
            lambda: client.get(ok.task_id).task.status.value == "succeeded",
            timeout_s=20,
            what="the success committed with the control plane frozen",
        )
        retried = wait_for(
            lambda: (
                (view := client.get(fail.task_id)).task.status.value == "scheduled"
                and view.task.attempt == 2
                and view
            ),
            timeout_s=20,
            what="the failure committed and its retry scheduled",
        )
        [run] = retried.runs
        assert run.exit_code == 1 and run.failure.value == "exit_code"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    [view] = client.wait([fail.task_id], timeout_s=60)
    assert view.task.status.value == "succeeded" and view.task.attempt == 2
    assert sorted(ledger.read_text().splitlines()) == ["fail 1", "fail 2", "ok 1"]
    assert [r.attempt for r in client.get(ok.task_id).runs] == [1]
