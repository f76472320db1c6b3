"""One-shot tasks end to end on real Ray, Serve and PostgreSQL."""

import time
from datetime import datetime, timedelta, timezone

import pytest

from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres]


def final(http, task_id, timeout_s=30):
    return wait_for(
        lambda: (
            (body := http.get(f"/v1/tasks/{task_id}").json())["status"]
            in ("succeeded", "dead", "cancelled")
            and body
        ),
        timeout_s=timeout_s,
        what=f"task {task_id} to finish",
    )


def test_hello_world_over_http_runs_on_time(http):
    assert http.post(
        "/v1/scripts", json={"name": "hello.sh", "interpreter": "bash", "body": "echo hello $NAME"}
    ).status_code in (200, 201)
    at = datetime.now(timezone.utc) + timedelta(seconds=3)
    created = http.post(
        "/v1/tasks",
        json={"script": "hello.sh", "execute_at": at.isoformat(), "variables": {"NAME": "world"}},
    )
    assert created.status_code == 201, created.text
    body = final(http, created.json()["task_id"])
    assert body["status"] == "succeeded"
    assert body["output"] == "hello world\n"
    assert 0 <= body["fire_lag_ms"] < 100, body
    [run] = body["runs"]
    assert run["tier"] == "small" and run["exit_code"] == 0
    task_id = body["task_id"]
    assert http.get(f"/v1/tasks/{task_id}/runs").json()["runs"] == body["runs"]
    assert http.get(f"/v1/tasks/{task_id}/runs/1/output").text == "hello world\n"
    executors = http.get("/v1/executors").json()
    assert run["executor_id"] in {e["executor_id"] for e in executors["executors"]}
    assert set(executors["tiers"]) == {"small", "medium", "large"}


def test_send_task_epoch_seconds(http):
    http.post(
        "/v1/scripts", json={"name": "hello.sh", "interpreter": "bash", "body": "echo hello $NAME"}
    )
    created = http.post(
        "/sendTask",
        json={"script": "hello.sh", "execute_at": time.time() + 1, "variables": {"NAME": "epoch"}},
    )
    assert created.status_code == 201
    assert final(http, created.json()["task_id"])["output"] == "hello epoch\n"


def test_failing_script_climbs_the_tiers_ends_dead_and_can_be_redriven(http, deployment):
    """The test tier table (tests/ray_cluster.py): small 0-1, medium 2,
    large 3+. Each exit 1 raises the priority by one."""
    http.post("/v1/scripts", json={"name": "fail.sh", "body": "echo failing; exit 1"})
    created = http.post(
        "/v1/tasks", json={"script": "fail.sh", "execute_at": time.time(), "max_attempts": 4}
    )
    task_id = created.json()["task_id"]
    body = final(http, task_id)
    assert body["status"] == "dead" and body["attempt"] == 4
    runs = [(r["attempt"], r["priority"], r["tier"], r["failure"]) for r in body["runs"]]
    assert runs == [
        (1, 0, "small", "exit_code"),
        (2, 1, "small", "exit_code"),
        (3, 2, "medium", "exit_code"),
        (4, 3, "large", "exit_code"),
    ]
    assert all(r["executor_id"].startswith(r["tier"] + "-") for r in body["runs"])

    dead = http.get("/v1/dead").json()["tasks"]
    assert task_id in [t["task_id"] for t in dead]
    assert http.post(f"/v1/tasks/{task_id + 10**6}/retry").status_code == 404
    retried = http.post(f"/v1/tasks/{task_id}/retry", json={"attempts": 1})
    assert retried.status_code == 200 and retried.json()["status"] == "scheduled"
    body = final(http, task_id)
    assert body["status"] == "dead" and body["attempt"] == 5
    assert [(r["attempt"], r["tier"]) for r in body["runs"]][-1] == (5, "large")


def test_timeout_is_a_failure_and_retry_can_succeed(http, tmp_path):
    flag = tmp_path / "second-time"
    script = f"if [ -e {flag} ]; then echo recovered; else touch {flag}; sleep 30; fi"
    http.post("/v1/scripts", json={"name": "flaky.sh", "body": script})
    created = http.post(
        "/v1/tasks", json={"script": "flaky.sh", "execute_at": time.time(), "timeout_s": 1}
    )
    body = final(http, created.json()["task_id"])
    assert body["status"] == "succeeded"
    assert [r["failure"] for r in body["runs"]] == ["timeout", None]
    assert body["output"] == "recovered\n"


def test_cancel_before_it_fires(http):
    http.post(
        "/v1/scripts", json={"name": "hello.sh", "interpreter": "bash", "body": "echo hello $NAME"}
    )
    created = http.post(
        "/v1/tasks", json={"script": "hello.sh", "execute_at": time.time() + 2}
    ).json()
    assert http.delete(f"/v1/tasks/{created['task_id']}").json()["status"] == "cancelled"
    time.sleep(3)  # past its due time: it must not have run
    body = http.get(f"/v1/tasks/{created['task_id']}").json()
    assert body["status"] == "cancelled" and body["runs"] == []
