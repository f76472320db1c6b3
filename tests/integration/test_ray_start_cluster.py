"""A real multi-node Ray on this machine, as an operator builds one: `ray
start --head`, worker nodes from `ray start --address`, each with other
resources, and `chronoray up --address … --config …` with four tiers. Each tier's executors
land on the node that offers its resource; stopping a worker node moves
its executors to a node that offers the same and retries its tasks; both
`chronoray executors` and the ZooKeeper mirror show the move."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from chronoray.deploy import free_port, free_ports
from tests.conftest import create_postgres_database
from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow]

BIN = Path(sys.executable).parent
TIERS = {"tiny": 0, "small": 2, "medium": 4, "large": 6}  # name → lowest priority
RAY_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("CHRONORAY_", "RAY_"))},
    "RAY_AUTH_MODE": "disabled",
    # a node told to stop drains this long before it kills its processes
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",
    "PATH": f"{BIN}:{os.environ['PATH']}",
}


class Node:
    """One `ray start --block` in a session of its own: stopping it stops
    that node's raylet, agents and workers, and nothing of the others."""

    def __init__(
        self, name: str, args: list[str], temp_dir: Path, ports: list[int] | None = None
    ) -> None:
        """``ports``: the agent's and the metrics exporter's, when the caller
        chose them with its own (ports chosen apart can repeat)."""
        agent, metrics = ports or free_ports(2)
        self.name, self.log = name, temp_dir / f"{name}.log"
        self.process = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--block",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
                f"--dashboard-agent-listen-port={agent}",
                f"--metrics-export-port={metrics}",
                *args,
            ],
            env=RAY_ENV,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        """As an operator stops a node: `ray start` gets SIGTERM, drains the
        node and stops its processes."""
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        finally:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


def ray_nodes(address: str) -> list[dict]:
    """The cluster's live nodes, asked from a driver of its own."""
    code = f"""
import json, ray
ray.init(address={address!r}, logging_level="error")
nodes = [{{"id": n["NodeID"], "resources": n["Resources"]}} for n in ray.nodes() if n["Alive"]]
print(json.dumps(nodes))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], env=RAY_ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def node_offering(address: str, resource: str, not_in: set[str] = frozenset()) -> str:
    found = [n["id"] for n in ray_nodes(address) if resource in n["resources"]]
    found = [node for node in found if node not in not_in]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def cluster(tmp_path):
    """A head offering the control plane and three tiers' resources."""
    temp_dir = Path(tempfile.mkdtemp(prefix="crn-", dir="/tmp"))  # short: Ray's socket paths
    port, client, *agent_ports = free_ports(4)
    nodes = {
        "head": Node(
            "head",
            [
                "--head",
                f"--port={port}",
                f"--ray-client-server-port={client}",
                "--num-cpus=1",
                '--resources={"chronoray_control": 10, "chronoray_tiny": 2, '
                '"chronoray_small": 2, "chronoray_medium": 2}',
                "--include-dashboard=false",
            ],
            temp_dir,
            agent_ports,
        )
    }
    address = f"127.0.0.1:{port}"
    try:
        wait_for(
            lambda: (
                "Ray runtime started" in nodes["head"].log.read_text()
                or nodes["head"].process.poll() is not None
            ),
            timeout_s=90,
            what="the head",
        )
        assert nodes["head"].process.poll() is None, nodes["head"].log.read_text()[-3000:]

        def add(name: str, resources: str) -> Node:
            node = Node(
                name, [f"--address={address}", "--num-cpus=1", f"--resources={resources}"], temp_dir
            )
            nodes[name] = node
            return node

        yield address, add, nodes
    finally:
        for node in reversed(list(nodes.values())):
            node.kill()
        subprocess.run(["pkill", "-9", "-f", str(temp_dir)], check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_tiers_land_on_their_nodes_and_move_when_a_node_stops(tmp_path, cluster):
    address, add_node, nodes = cluster
    add_node("a", '{"chronoray_large": 2}')
    wait_for(lambda: len(ray_nodes(address)) == 2, timeout_s=90, what="node a to join")
    zookeeper = os.environ.get("CHRONORAY_TEST_ZOOKEEPER_HOSTS")
    if not zookeeper:
        pytest.fail("CHRONORAY_TEST_ZOOKEEPER_HOSTS is not set: run the suite with `make test`")
    zookeeper = f"{zookeeper}/crn-{os.getpid()}"
    http_port = free_port()
    config = tmp_path / "chronoray.yaml"
    config.write_text(
        f"""
database_url: {create_postgres_database("raystart")}
namespace: raystart
num_shards: 1
sweep_interval_s: 1
lease_grace_s: 10
retry_backoff_s: 0.2
http_port: {http_port}
zookeeper_hosts: {zookeeper}
control_plane_resource: chronoray_control
tiers:
  - {{name: tiny, min_priority: 0, resources: {{chronoray_tiny: 1}}, slots: 2}}
  - {{name: small, min_priority: 2, resources: {{chronoray_small: 1}}, slots: 2}}
  - {{name: medium, min_priority: 4, resources: {{chronoray_medium: 1}}, slots: 2}}
  - {{name: large, min_priority: 6, resources: {{chronoray_large: 1}},
      min_executors: 1, max_executors: 2, slots: 2}}
pool: {{heartbeat_s: 0.5, misses: 4, placement_timeout_s: 10}}
"""
    )
    env = {**RAY_ENV, "CHRONORAY_DATA_DIR": str(tmp_path / "data")}
    log = open(tmp_path / "up.log", "w+")
    up = subprocess.Popen(
        [str(BIN / "chronoray"), "up", "--address", address, "--config", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    up_log = tmp_path / "up.log"
    try:
        wait_for(
            lambda: "chronoray is up at" in up_log.read_text() or up.poll() is not None,
            timeout_s=120,
            what="chronoray up",
        )
        assert up.poll() is None, up_log.read_text()[-3000:]
        token = re.search(r"^export CHRONORAY_TOKEN=(\S+)$", up_log.read_text(), re.M).group(1)
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{http_port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        head = node_offering(address, "chronoray_control")
        node_a = node_offering(address, "chronoray_large")

        def executors() -> list[dict]:
            shown = subprocess.run(
                [str(BIN / "chronoray"), "--url", str(api.base_url), "executors", "--json"],
                env={**env, "CHRONORAY_TOKEN": token},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert shown.returncode == 0, shown.stderr
            return json.loads(shown.stdout)["executors"]

        def mirrored() -> list[dict]:
            shown = subprocess.run(
                [str(BIN / "chronoray"), "executors", "--zookeeper", zookeeper, "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert shown.returncode == 0, shown.stderr
            return json.loads(shown.stdout)["executors"]

        def placed_on() -> dict[str, set[str]] | None:
            live = [e for e in executors() if e["state"] == "live"]
            by_tier = {t: {e["node"] for e in live if e["tier"] == t} for t in TIERS}
            return by_tier if all(by_tier.values()) else None

        # the file's four tiers, each on the node offering its resource, in both views
        on_head = {("tiny", head), ("small", head), ("medium", head)}
        assert wait_for(placed_on, timeout_s=60, what="the four tiers live") == {
            "tiny": {head},
            "small": {head},
            "medium": {head},
            "large": {node_a},
        }
        wait_for(
            lambda: {(e["tier"], e["node"]) for e in mirrored()} == on_head | {("large", node_a)},
            timeout_s=30,
            what="the ZooKeeper mirror to show the four tiers",
        )

        # a task of each priority runs on its tier: two per tier below large
        # and four for large, so none finds its own tier full and takes a
        # stronger tier's free slot (which is allowed)
        api.post("/v1/scripts", json={"name": "where.sh", "body": "echo here"}).raise_for_status()
        batch = api.post(
            "/v1/tasks:batch",
            json={
                "tasks": [
                    {"script": "where.sh", "execute_at": time.time(), "priority": priority}
                    for priority in range(10)
                ]
            },
        )
        assert batch.status_code == 201, batch.text
        for priority, created in enumerate(batch.json()["tasks"]):
            view = wait_for(
                lambda task=created["task_id"]: (
                    (v := api.get(f"/v1/tasks/{task}").json())["status"] == "succeeded" and v
                ),
                timeout_s=30,
                what=f"the priority {priority} task",
            )
            wanted = max(TIERS, key=lambda name: (TIERS[name] <= priority, TIERS[name]))
            [run] = view["runs"]
            assert (priority, run["tier"]) == (priority, wanted)
            assert run["node_id"] == (node_a if wanted == "large" else head)

        api.post(
            "/v1/scripts",
            json={
                "name": "long.sh",
                # the first attempt outlasts the test: only the node's stop ends it
                "body": '[ "$CHRONORAY_ATTEMPT" -gt 1 ] || sleep 600; echo survived',
            },
        ).raise_for_status()
        tasks = [
            api.post(
                "/v1/tasks",
                json={
                    "script": "long.sh",
                    "execute_at": time.time(),
                    "priority": 6,
                    "max_attempts": 3,
                },
            ).json()["task_id"]
            for _ in range(2)
        ]
        wait_for(
            lambda: all(api.get(f"/v1/tasks/{t}").json()["status"] == "running" for t in tasks),
            timeout_s=60,
            what="the long tasks to run on node a",
        )

        # node b offers what a does; then a stops, as `ray stop` would stop it
        add_node("b", '{"chronoray_large": 2}')
        wait_for(lambda: len(ray_nodes(address)) == 3, timeout_s=90, what="node b to join")
        node_b = node_offering(address, "chronoray_large", not_in={node_a})
        nodes["a"].stop()

        def finished() -> list[dict] | None:
            views = [api.get(f"/v1/tasks/{t}").json() for t in tasks]
            return views if all(v["status"] == "succeeded" for v in views) else None

        views = wait_for(finished, timeout_s=120, what="the tasks to be retried and succeed")
        for view in views:
            runs = view["runs"]
            assert (runs[0]["node_id"], runs[0]["failure"]) == (node_a, "executor_lost"), runs
            assert (runs[-1]["node_id"], runs[-1]["status"]) == (node_b, "succeeded"), runs
            assert runs[-1]["output"] == "survived\n"
            assert sum(run["status"] == "succeeded" for run in runs) == 1

        def moved() -> bool:
            live = {(e["tier"], e["node"]) for e in executors() if e["state"] == "live"}
            return ("large", node_b) in live and ("large", node_a) not in live

        wait_for(moved, timeout_s=60, what="`chronoray executors` to show the move")
        assert all(e["node"] != node_a for e in executors())
        wait_for(
            lambda: {(e["tier"], e["node"]) for e in mirrored()} == on_head | {("large", node_b)},
            timeout_s=60,
            what="the ZooKeeper mirror to show the move",
        )
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
    assert up.returncode == 0, up_log.read_text()[-3000:]
