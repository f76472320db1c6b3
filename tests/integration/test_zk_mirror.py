"""The ZooKeeper mirror against the real ZooKeeper `make test` started
(no Ray needed)."""

import json
import os
import time
import uuid

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from actors.zk_mirror import ZnodeMirror, executor_path, read_tree
from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.zookeeper]


@pytest.fixture
def hosts():
    value = os.environ.get("CHRONORAY_TEST_ZOOKEEPER_HOSTS")
    if not value:
        pytest.fail("CHRONORAY_TEST_ZOOKEEPER_HOSTS is not set: run the suite with `make test`")
    return value


def read(hosts, path):
    client = KazooClient(hosts=hosts)
    client.start(timeout=5)
    try:
        data, stat = client.get(path)
        return json.loads(data), stat.ephemeralOwner
    except NoNodeError:  # absent, or between the old node's removal and the new one
        return None
    finally:
        client.stop()
        client.close()


def test_publish_keeps_one_ephemeral_znode_with_the_newest_state(hosts):
    tier, executor_id = "small", f"small-{uuid.uuid4().hex[:8]}"
    path = executor_path(tier, executor_id)
    mirror = ZnodeMirror(hosts, path, session_timeout_s=4.0)
    try:
        for running in range(5):
            mirror.publish({"executor_id": executor_id, "tier": tier, "running": running})
            time.sleep(0.05)
        state = wait_for(
            lambda: (r := read(hosts, path)) and r[0]["running"] == 4 and r,
            timeout_s=10,
            what="the newest state",
        )
        assert state[1] != 0  # ephemeral
        assert executor_id in [e["executor_id"] for e in read_tree(hosts)["executors"]]
    finally:
        mirror.close()
    wait_for(lambda: read(hosts, path) is None, timeout_s=10, what="znode gone with its session")


def test_a_node_left_by_an_earlier_session_is_replaced(hosts):
    """A restarted executor finds the znode its previous session still holds
    (not yet expired): it must take it over, not fail on NodeExists."""
    path = executor_path("large", f"large-{uuid.uuid4().hex[:8]}")
    old = KazooClient(hosts=hosts, timeout=20)
    old.start(timeout=5)
    old.create(path, b'{"running": 99}', ephemeral=True, makepath=True)
    old_owner = old.client_id[0]
    mirror = ZnodeMirror(hosts, path, session_timeout_s=4.0)
    try:
        mirror.publish({"running": 1})
        state = wait_for(
            lambda: (r := read(hosts, path)) and r[1] != old_owner and r,
            timeout_s=10,
            what="the new session to own the znode",
        )
        assert state[0] == {"running": 1}
    finally:
        mirror.close()
        old.stop()
        old.close()


def test_publishing_without_zookeeper_returns_at_once():
    mirror = ZnodeMirror("127.0.0.1:1", "/chronoray/executors/small/x", session_timeout_s=2.0)
    try:
        started = time.monotonic()
        for _ in range(100):
            mirror.publish({"running": 0})
        assert time.monotonic() - started < 0.1
    finally:
        mirror.close()
