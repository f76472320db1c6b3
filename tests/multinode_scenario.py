"""Placement across nodes with different resources, on a simulated Ray
cluster (``ray.cluster_utils.Cluster``: several raylets on this machine).

Run by tests/integration/test_multinode.py in a process of its own (a driver
joins one cluster only, and the suite's session cluster is already joined).
Prints one JSON object of facts for the test to check.

    python -m tests.multinode_scenario DATABASE_URL
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import ray
from ray.cluster_utils import Cluster

from chronoray.settings import Settings
from scheduling.lifecycle import RetryPolicy
from scheduling.tiers import PoolTiming, TierTable, slot_tier

HEALTH = {
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 1000,
}
TIERS = TierTable(
    [
        slot_tier("small", 0, executors=2, slots=2),
        slot_tier("large", 1, executors=1, slots=2),
        slot_tier("gpu", 8, executors=1, slots=1),  # no node offers it: the pool must say so
    ]
)


def wait_for(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)
    return value


def main(database_url: str) -> dict:
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="crm-"))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "resources": {"chronoray_control": 100},
            "_system_config": HEALTH,
        },
    )
    try:
        nodes = {
            "small-a": cluster.add_node(num_cpus=0, resources={"chronoray_small": 1}),
            "small-b": cluster.add_node(num_cpus=0, resources={"chronoray_small": 2}),
            "large": cluster.add_node(num_cpus=0, resources={"chronoray_large": 1}),
        }
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="multinode", log_to_driver=False)
        return scenario(cluster, nodes, database_url)
    finally:
        ray.shutdown()
        cluster.shutdown()


def scenario(cluster, nodes, database_url: str) -> dict:
    from chronoray import Client
    from chronoray.deploy import deploy

    settings = Settings(
        database_url=database_url,
        namespace="multinode",
        num_shards=1,
        sweep_interval_s=1.0,
        lease_grace_s=10.0,
        tiers=TIERS,
        retry=RetryPolicy(backoff_base_s=0.2, backoff_max_s=1.0),
        pool_timing=PoolTiming(placement_timeout_s=5.0),
        control_plane_resources={"chronoray_control": 1},
    )
    deploy(settings, http=False)
    node_names = {node.node_id: name for name, node in nodes.items()}
    node_names[cluster.head_node.node_id] = "head"
    client = Client(address=cluster.address, namespace="multinode")
    facts: dict = {}

    def runs_of(view):
        return [
            {
                "attempt": r.attempt,
                "priority": r.priority,
                "tier": r.tier,
                "node": node_names.get(r.node_id, r.node_id),
                "failure": r.failure and r.failure.value,
            }
            for r in view.runs
        ]

    # 1. low priority runs on the small nodes (as many as their slots: more
    # would spill over to free slots of the stronger tier, which is allowed)
    client.register_script("quick.sh", "echo quick")
    quick = [client.submit("quick.sh", time.time()) for _ in range(4)]
    facts["low_priority"] = [runs_of(v) for v in client.wait([t.task_id for t in quick])]

    # 2. an escalated retry runs on the large node
    client.register_script(
        "fails-once.sh", '[ "$CHRONORAY_ATTEMPT" -ge 2 ] || { echo first; exit 1; }; echo second'
    )
    escalating = client.submit("fails-once.sh", time.time(), max_attempts=3)
    facts["escalated"] = runs_of(client.wait([escalating.task_id])[0])

    # 3. removing a node retries its in-flight tasks elsewhere
    client.register_script("long.sh", "sleep 6; echo survived")
    long_tasks = [client.submit("long.sh", time.time()) for _ in range(3)]

    def placement():
        import ray as ray_

        pool = ray_.get_actor("chronoray-executor-pool", namespace="multinode")
        infos = ray_.get(pool.executors.remote())
        described = ray_.get([i.handle.info.remote() for i in infos])
        busy = [d for d in described if d["running"] and d["tier"] == "small"]
        return busy if sum(d["running"] for d in busy) == 3 else None

    busy = wait_for(placement, 30, "the long tasks to start")
    victim_node = node_names[busy[0]["node"]]
    facts["removed_node"] = victim_node
    per_node: dict[str, int] = {}
    for d in busy:
        per_node[node_names[d["node"]]] = per_node.get(node_names[d["node"]], 0) + d["running"]
    facts["running_before_removal"] = per_node
    cluster.remove_node(nodes[victim_node], allow_graceful=False)
    removed_at = time.monotonic()
    views = client.wait([t.task_id for t in long_tasks], timeout_s=120)
    facts["retried_after_removal_s"] = round(time.monotonic() - removed_at, 1)
    facts["after_removal"] = [{"status": v.task.status.value, "runs": runs_of(v)} for v in views]
    facts["pool"] = ray.get(
        ray.get_actor("chronoray-executor-pool", namespace="multinode").status.remote()
    )["tiers"]
    return facts


if __name__ == "__main__":
    print("FACTS " + json.dumps(main(sys.argv[1]), default=str), flush=True)
