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


def test_failing_script_climbs_priority_and_ends_dead(http):
    http.post("/v1/scripts", json={"name": "fail.sh", "body": "echo failing; exit 1"})
    created = http.post(
        "/v1/tasks", json={"script": "fail.sh", "execute_at": time.time(), "max_attempts": 3}
    )
    body = final(http, created.json()["task_id"])
    assert body["status"] == "dead" and body["attempt"] == 3
    assert [(r["attempt"], r["priority"], r["failure"], r["exit_code"]) for r in body["runs"]] == [
        (1, 0, "exit_code", 1),
        (2, 1, "exit_code", 1),
        (3, 2, "exit_code", 1),
    ]


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
