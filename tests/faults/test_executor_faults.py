"""Executors dying, stopping, and ZooKeeper going away, on the session
deployment (real Ray, PostgreSQL and the ZooKeeper `make test` started)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from actors.handles import DISPATCHER_NAME, POOL_NAME
from actors.zk_mirror import read_tree
from tests.conftest import shared_file
from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.zookeeper, pytest.mark.slow]

SERVICES = Path(__file__).resolve().parents[2] / "scripts" / "test-services.sh"


@pytest.fixture
def zookeeper(deployment):
    hosts = deployment.settings.zookeeper_hosts
    if not hosts:
        pytest.fail("CHRONORAY_TEST_ZOOKEEPER_HOSTS is not set: run the suite with `make test`")
    return hosts


def actor(deployment, name):
    return ray.get_actor(name, namespace=deployment.settings.namespace)


def live_executor_ids(deployment) -> set[str]:
    status = ray.get(actor(deployment, POOL_NAME).status.remote())
    return {e["executor_id"] for e in status["executors"] if e["state"] != "starting"}


def mirrored(zookeeper) -> dict[str, dict]:
    return {e["executor_id"]: e for e in read_tree(zookeeper)["executors"]}


def running_on(deployment, task_id: int) -> str:
    """The executor whose attempt of this task is running."""

    def find():
        stats = ray.get(actor(deployment, DISPATCHER_NAME).stats.remote())
        for executor_id, state in stats["executors"].items():
            if state["running"] and executor_id.startswith("large-"):
                return executor_id
        return None

    return wait_for(find, timeout_s=30, what=f"task {task_id} to run")


def submit_now(client, name, body, **fields):
    client.register_script(name, body)
    return client.submit(name, time.time(), **fields)


def test_sigkill_of_an_executor_mid_run(deployment, client, zookeeper, tmp_path):
    ledger = shared_file(tmp_path, "ledger")
    task = submit_now(
        client,
        "slow-kill.sh",
        f'echo "$CHRONORAY_ATTEMPT" >> {ledger}; sleep 4; echo done',
        priority=3,  # the large tier: two executors, so there is another
    )
    victim = running_on(deployment, task.task_id)
    pid = wait_for(lambda: mirrored(zookeeper).get(victim), timeout_s=10, what="znode")["pid"]
    # Kill mid-run: once the script has written its first line (a kill that
    # lands before the start is a free retry, another test's subject).
    wait_for(lambda: ledger.read_text().split() == ["1"], timeout_s=30, what="the script to start")
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(
        lambda: victim not in mirrored(zookeeper), timeout_s=30, interval_s=0.1, what="znode gone"
    )
    gone_after = time.monotonic() - killed_at
    print(f"znode of SIGKILLed executor gone after {gone_after:.2f} s")
    session_s, tick_s = deployment.settings.zookeeper_session_timeout_s, 1.0
    assert gone_after <= session_s + tick_s + 0.5  # + the polling above

    [view] = client.wait([task.task_id], timeout_s=60)
    assert view.task.status.value == "succeeded" and view.task.attempt == 2
    first, second = view.runs
    assert (first.failure.value, first.executor_id) == ("executor_lost", victim)
    assert second.failure is None and second.executor_id != victim
    assert ledger.read_text().split() == ["1", "2"]  # ran again once
    assert victim not in live_executor_ids(deployment)


def test_stale_result_of_a_stopped_executor_is_ignored(deployment, client, zookeeper, tmp_path):
    ledger = shared_file(tmp_path, "ledger")
    task = submit_now(
        client,
        "slow-stop.sh",
        f'echo "$CHRONORAY_ATTEMPT" >> {ledger}; sleep 2; echo "done $CHRONORAY_ATTEMPT"',
        priority=3,
        timeout_s=3,
    )
    victim = running_on(deployment, task.task_id)
    pid = wait_for(lambda: mirrored(zookeeper).get(victim), timeout_s=10, what="znode")["pid"]
    lease_until = wait_for(
        lambda: client.get(task.task_id).task.lease_expires_at, timeout_s=10, what="lease"
    )
    dispatcher = actor(deployment, DISPATCHER_NAME)
    os.kill(pid, signal.SIGSTOP)
    try:
        [view] = client.wait([task.task_id], timeout_s=60)  # retried elsewhere meanwhile
        assert view.task.status.value == "succeeded" and view.task.attempt == 2
        # beyond the stopped attempt's lease
        time.sleep(max(0.0, lease_until.timestamp() - time.time()) + 1.0)
        late_before = ray.get(dispatcher.stats.remote())["late_results"]
    finally:
        os.kill(pid, signal.SIGCONT)
    # The stopped executor's script finished while it was stopped; on waking
    # it reports that result, which arrives late and changes nothing.
    wait_for(
        lambda: ray.get(dispatcher.stats.remote())["late_results"] > late_before,
        timeout_s=20,
        what="the late result to arrive",
    )
    time.sleep(1.0)
    after = client.get(task.task_id)
    assert after.task.status.value == "succeeded" and after.task.attempt == 2
    assert [(r.attempt, r.failure and r.failure.value) for r in after.runs] == [
        (1, "executor_lost"),
        (2, None),
    ]
    assert after.runs[0].executor_id == victim and after.runs[1].output_tail == "done 2\n"
    # the stale executor learnt it was declared dead, and left
    wait_for(lambda: victim not in mirrored(zookeeper), timeout_s=30, what="stale executor gone")


def test_zookeeper_down_for_a_minute(deployment, client, zookeeper, tmp_path):
    services_dir = os.environ["CHRONORAY_TEST_ZOOKEEPER_DIR"].rsplit("/zk", 1)[0]
    ledger = shared_file(tmp_path, "ledger")
    client.register_script("zk-outage.sh", f'echo "$CHRONORAY_TASK_ID" >> {ledger}')
    subprocess.run([str(SERVICES), "stop-zookeeper", services_dir], check=True)
    try:
        start = time.time() + 2
        tasks = [
            client.submit("zk-outage.sh", start + 5 * i, max_attempts=1) for i in range(13)
        ]  # one every 5 s through the outage
        views = client.wait([t.task_id for t in tasks], timeout_s=90)
        stopped_for = time.time() - (start - 2)
        lags = [v.runs[0].fire_lag_ms for v in views]
        print(f"ZooKeeper down {stopped_for:.0f} s; fire lag max {max(lags):.1f} ms")
        assert stopped_for >= 60
        assert all(v.task.status.value == "succeeded" for v in views)
        assert max(lags) < 500  # fired on time without ZooKeeper
    finally:
        subprocess.run([str(SERVICES), "start-zookeeper", services_dir], check=True)
    restarted = time.monotonic()

    seen = {}

    def matches():
        try:
            seen["mirror"], seen["pool"] = set(mirrored(zookeeper)), live_executor_ids(deployment)
        except Exception as exc:
            seen["error"] = repr(exc)
            return False
        return seen["mirror"] == seen["pool"]

    try:
        wait_for(matches, timeout_s=10, interval_s=0.2, what="the mirror to match the pool")
    except TimeoutError:
        pytest.fail(f"mirror and pool differ 10 s after the restart: {seen}")
    print(f"mirror matched the live executors {time.monotonic() - restarted:.1f} s after restart")
    assert read_tree(zookeeper)["dispatcher"] is not None
    # what operators see: `chronoray executors` reads the same mirror
    listed = subprocess.run(
        [sys.executable, "-m", "chronoray", "executors", "--zookeeper", zookeeper, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    body = json.loads(listed.stdout)
    assert {e["executor_id"] for e in body["executors"]} == live_executor_ids(deployment)
    assert all(e["pid"] > 0 and e["slots"] == 8 for e in body["executors"])


def test_a_new_executor_builds_its_sandbox_before_its_first_heartbeat(deployment):
    """Defect 11: the first run built actors/launch.c on the event loop and
    could stall heartbeats past the death threshold. A replacement executor
    that has heartbeated has run the sandbox probe already."""
    from actors.executor import EXECUTOR_PREFIX

    pool = actor(deployment, POOL_NAME)

    def small(status):
        return {e["executor_id"]: e for e in status["executors"] if e["tier"] == "small"}

    before = small(ray.get(pool.status.remote()))
    victim = next(e for e, entry in sorted(before.items()) if entry["state"] == "live")
    os.kill(
        ray.get(actor(deployment, EXECUTOR_PREFIX + victim).info.remote())["pid"], signal.SIGKILL
    )

    def heartbeating_newcomer():
        now = small(ray.get(pool.status.remote()))
        return next(
            (
                e
                for e, entry in now.items()
                if e not in before and entry["heartbeat_age_s"] is not None
            ),
            None,
        )

    newcomer = wait_for(heartbeating_newcomer, timeout_s=60, what="a replacement executor")
    info = ray.get(actor(deployment, EXECUTOR_PREFIX + newcomer).info.remote())
    assert info["sandbox_ready"] and info["running"] == 0
