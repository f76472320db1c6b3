"""A shard removed for good and deployed anew: Serve, the dispatcher and
other shards find the new actor (their cached handles are refreshed)."""

import time
from datetime import datetime, timezone

import pytest
import ray

from actors.handles import shard_name
from chronoray.deploy import deploy_actors
from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres]


def test_submissions_and_results_reach_a_redeployed_shard(deployment, http):
    settings = deployment.settings
    http.post("/v1/scripts", json={"name": "redeploy.sh", "body": "echo again"})
    due = time.time() + 2
    victim = settings.wheel.shard_of(datetime.fromtimestamp(due, timezone.utc))
    # warm every cache with the old actor, then remove it for good
    assert (
        http.post("/v1/tasks", json={"script": "redeploy.sh", "execute_at": due}).status_code == 201
    )
    old = ray.get_actor(shard_name(victim), namespace=settings.namespace)
    ray.kill(old, no_restart=True)
    deploy_actors(settings)
    # the same instant, so the same (redeployed) shard owns it
    created = http.post("/v1/tasks", json={"script": "redeploy.sh", "execute_at": due})
    assert created.status_code == 201, created.text
    task_id = created.json()["task_id"]
    body = wait_for(
        lambda: (b := http.get(f"/v1/tasks/{task_id}").json())["status"] == "succeeded" and b,
        timeout_s=60,
        what="the task on the new shard",
    )
    assert body["output"] == "again\n"
