"""GET /metrics on the real deployment: the fire lag of a task that just
ran, and every actor answering."""

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres]


def samples(http) -> list:
    response = http.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 200
    return [s for f in text_string_to_metric_families(response.text) for s in f.samples]


def lag_count(found, tier: str) -> float:
    return sum(
        s.value
        for s in found
        if s.name == "chronoray_fire_lag_seconds_count" and s.labels["tier"] == tier
    )


def test_metrics_show_the_fire_lag_of_a_task_that_just_ran(deployment, http):
    http.post("/v1/scripts", json={"name": "metrics.sh", "body": "echo measured"})
    before = samples(http)
    task = http.post("/v1/tasks", json={"script": "metrics.sh", "execute_at": time.time() + 1})
    task_id = task.json()["task_id"]
    wait_for(
        lambda: http.get(f"/v1/tasks/{task_id}").json()["status"] == "succeeded",
        timeout_s=60,
        what="the task",
    )
    [run] = http.get(f"/v1/tasks/{task_id}/runs").json()["runs"]
    after = samples(http)
    assert lag_count(after, run["tier"]) == lag_count(before, run["tier"]) + 1
    lag_s = run["fire_lag_ms"] / 1000
    buckets = [
        s
        for s in after
        if s.name == "chronoray_fire_lag_seconds_bucket" and s.labels["tier"] == run["tier"]
    ]
    assert any(float(b.labels["le"]) >= lag_s and b.value >= 1 for b in buckets)
    up = {s.labels["actor"]: s.value for s in after if s.name == "chronoray_metrics_source_up"}
    assert up == {"dispatcher": 1, "pool": 1, "shard-0": 1, "shard-1": 1}
    alive = sum(s.value for s in after if s.name == "chronoray_executors_alive")
    assert alive >= 1
    names = {s.name for s in after}
    for name in (
        "chronoray_fires_total",
        "chronoray_tasks_submitted_total",
        "chronoray_submissions_total",
        "chronoray_running",
    ):
        assert name in names, name
