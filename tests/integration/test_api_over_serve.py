"""Bad input through the real Serve proxy: a 4xx naming the field, and
nothing stored in PostgreSQL."""

import time

import pytest
from sqlalchemy import func, select

from storage.schema import scripts, tasks

pytestmark = [pytest.mark.ray, pytest.mark.postgres]


def counts(deployment):
    with deployment.repo.engine.connect() as conn:
        return (
            conn.execute(select(func.count()).select_from(tasks)).scalar(),
            conn.execute(select(func.count()).select_from(scripts)).scalar(),
        )


@pytest.fixture(scope="module", autouse=True)
def hello(http):
    http.post(
        "/v1/scripts", json={"name": "hello.sh", "interpreter": "bash", "body": "echo hello $NAME"}
    )


@pytest.mark.parametrize(
    "path, body, status, field",
    [
        ("/v1/tasks", {"script": "unknown.sh", "execute_at": 1900000000}, 404, "script"),
        (
            "/v1/tasks",
            {"script": "hello.sh", "execute_at": "2030-01-01T10:00:00"},
            422,
            "execute_at",
        ),
        ("/sendTask", {"script": "hello.sh", "execute_at": "half past ten"}, 422, "execute_at"),
        (
            "/v1/tasks",
            {"script": "hello.sh", "execute_at": 1900000000, "priority": -1},
            422,
            "priority",
        ),
        (
            "/v1/tasks",
            {"script": "hello.sh", "execute_at": 1900000000, "colour": "red"},
            422,
            "colour",
        ),
        ("/v1/scripts", {"name": "big.sh", "body": "x" * (5 * 1024 * 1024 + 1)}, 413, "body"),
        ("/v1/scripts", {"name": "huge.sh", "body": "x" * (7 * 1024 * 1024)}, 413, "body"),
    ],
)
def test_bad_input_is_refused_with_the_field_and_nothing_is_stored(
    deployment, http, path, body, status, field
):
    before = counts(deployment)
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field and response.json()["error"]
    assert counts(deployment) == before


def test_malformed_json_is_400_and_nothing_is_stored(deployment, http):
    before = counts(deployment)
    response = http.post(
        "/v1/tasks", content=b'{"script": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"] == "malformed_json"
    assert counts(deployment) == before


def test_idempotent_submission_over_http(http):
    body = {
        "script": "hello.sh",
        "execute_at": time.time() + 3600,
        "idempotency_key": f"key-{time.time()}",
    }
    first, again = http.post("/v1/tasks", json=body), http.post("/v1/tasks", json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["task_id"] == again.json()["task_id"]
    assert http.post("/v1/tasks", json={**body, "priority": 2}).status_code == 409
    assert http.delete(f"/v1/tasks/{first.json()['task_id']}").status_code == 200


@pytest.mark.parametrize(
    "body, field",
    [
        ({"script": "hello.sh", "cron": "0 0 30 2 *"}, "cron"),
        ({"script": "hello.sh", "cron": "0 * * * *", "timezone": "Europe/Atlantis"}, "timezone"),
        ({"script": "hello.sh", "cron": "0 * * * *", "misfire_policy": "maybe"}, "misfire_policy"),
        (
            {"script": "hello.sh", "cron": "0 * * * *", "overlap_policy": "pile_up"},
            "overlap_policy",
        ),
    ],
)
def test_bad_schedules_over_serve_store_nothing(deployment, http, body, field):
    from storage.schema import schedules

    with deployment.repo.engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(schedules)).scalar()
    response = http.post("/v1/schedules", json=body)
    assert response.status_code == 422 and response.json()["field"] == field
    with deployment.repo.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schedules)).scalar() == before


def test_readyz_sees_database_dispatcher_and_every_shard(deployment, http):
    body = http.get("/readyz").json()
    assert body["ready"] is True
    assert set(body["checks"]) == {"database", "dispatcher"} | {
        f"shard-{i}" for i in range(deployment.settings.num_shards)
    }


def test_a_batch_of_a_thousand_commits_all_or_nothing(deployment, http):
    due = time.time() + 7200
    items = [{"script": "hello.sh", "execute_at": due + i} for i in range(1000)]
    before = counts(deployment)
    items[999] = {"script": "unknown.sh", "execute_at": due}
    refused = http.post("/v1/tasks:batch", json={"tasks": items})
    assert refused.status_code == 404 and refused.json()["field"] == "tasks[999].script"
    assert counts(deployment) == before  # nothing of the 999 good ones
    items[999] = {"script": "hello.sh", "execute_at": due + 999}
    stored = http.post("/v1/tasks:batch", json={"tasks": items})
    assert stored.status_code == 201 and stored.json()["created"] == 1000
    assert counts(deployment)[0] == before[0] + 1000
    ids = [t["task_id"] for t in stored.json()["tasks"]]
    assert http.get(f"/v1/tasks/{ids[500]}").json()["status"] == "scheduled"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"script": "hello.sh", "execute_at": NaN}',
        b'{"script": "hello.sh", "script": "hello.sh", "execute_at": 1900000000}',
        b'{"script": "hello.sh", "execute_at": 1900000000, "max_attempts": 18446744073709551616}',
    ],
)
def test_json_edge_cases_through_serve(deployment, http, raw):
    before = counts(deployment)
    response = http.post("/v1/tasks", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["field"] == "body"
    assert counts(deployment) == before
