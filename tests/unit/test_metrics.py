"""The metrics of several actors merge into one valid exposition."""

from datetime import timedelta

from prometheus_client.parser import text_string_to_metric_families

from chronoray.metrics import (
    ShardMetrics,
    dispatcher_families,
    exposition,
    pool_families,
)
from chronoray.settings import Settings
from scheduling.models import FailureClass, RunResult, TaskStatus
from tests.conftest import T0
from tests.sqlite import sqlite_repository
from tests.unit.fakes import user_api


def run(*, tier="small", lag_ms=4.0, failure=None) -> RunResult:
    return RunResult(
        task_id=1,
        attempt=1,
        epoch=1,
        shard=0,
        priority=0,
        due_at=T0,
        executor_id="small-1",
        tier=tier,
        node_id="n",
        started_at=T0 + timedelta(milliseconds=lag_ms),
        finished_at=T0 + timedelta(seconds=1),
        exit_code=0 if failure is None else 1,
        output_tail="",
        failure=failure,
    )


def parsed(text: bytes) -> dict:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def test_shards_dispatcher_and_pool_merge_with_a_source_label():
    shard0, shard1 = ShardMetrics(), ShardMetrics()
    shard0.outcome(run(lag_ms=4), TaskStatus.SUCCEEDED, None)
    shard1.outcome(run(lag_ms=30, tier="large"), TaskStatus.SUCCEEDED, 7)
    shard1.outcome(run(failure=FailureClass.TIMEOUT), TaskStatus.SCHEDULED, None)
    shard1.outcome(run(failure=FailureClass.EXIT_CODE), TaskStatus.DEAD, None)
    shard0.fired.inc(2)
    text = exposition(
        {
            "shard-0": shard0.families(),
            "shard-1": shard1.families(),
            "dispatcher": dispatcher_families({0: 3, 2: 1}, {"small": 2, "large": 0}),
            "pool": pool_families({"tiers": {"small": {"live": 2}, "large": {"live": 1}}}),
        }
    )
    samples = parsed(text)
    lag = "chronoray_fire_lag_seconds"
    assert (
        samples[(f"{lag}_count", (("schedule", ""), ("source", "shard-0"), ("tier", "small")))] == 1
    )
    assert (
        samples[(f"{lag}_count", (("schedule", "7"), ("source", "shard-1"), ("tier", "large")))]
        == 1
    )
    assert (
        samples[
            (
                f"{lag}_bucket",
                (("le", "0.005"), ("schedule", ""), ("source", "shard-0"), ("tier", "small")),
            )
        ]
        == 1
    )
    assert samples[("chronoray_fires_total", (("source", "shard-0"),))] == 2
    assert (
        samples[("chronoray_retries_total", (("failure", "timeout"), ("source", "shard-1")))] == 1
    )
    assert (
        samples[("chronoray_dead_tasks_total", (("failure", "exit_code"), ("source", "shard-1")))]
        == 1
    )
    assert samples[("chronoray_queue_depth", (("priority", "0"), ("source", "dispatcher")))] == 3
    assert samples[("chronoray_running", (("source", "dispatcher"), ("tier", "small")))] == 2
    assert samples[("chronoray_executors_alive", (("source", "pool"), ("tier", "large")))] == 1
    assert text.count(b"# TYPE chronoray_fire_lag_seconds histogram") == 1


def test_the_api_serves_metrics_without_a_token():
    api = user_api(sqlite_repository(), Settings(database_url="sqlite://"))
    api.post("/v1/scripts", json={"name": "a.sh", "body": "echo"})
    api.post("/v1/tasks", json={"script": "a.sh", "execute_at": 1900000000})
    response = api.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = parsed(response.content)
    up = "chronoray_metrics_source_up"
    assert samples[(up, (("actor", "shard-0"), ("source", "api")))] == 1
    assert samples[("chronoray_executors_alive", (("source", "pool"), ("tier", "small")))] == 1
    assert samples[("chronoray_submissions_total", (("kind", "task"), ("source", "api")))] == 1
