"""The schedules API over SQLite (no server): create, preview, change,
trigger, delete, /sendTask with cron, and bad input naming the field with
nothing stored."""

from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from chronoray.settings import Settings
from serve_app.app import create_api
from service.core import Service
from storage.engines import make_engine
from storage.migrate import upgrade
from storage.schema import schedules, tasks
from storage.sql import SqlTaskRepository
from tests.unit.fakes import RepoRouter, user_api

SETTINGS = Settings(database_url="sqlite://", min_schedule_interval_s=2)


@pytest.fixture
def repo(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'api.db'}")
    upgrade(engine)
    yield SqlTaskRepository(engine)
    engine.dispose()


@pytest.fixture
def submitter(repo):
    return RepoRouter(repo, lambda: datetime.now(timezone.utc))


@pytest.fixture
def client(repo, submitter):
    api = user_api(repo, SETTINGS, submitter)
    assert api.post("/v1/scripts", json={"name": "tick.sh", "body": "date"}).status_code == 201
    return api


def counts(repo):
    with repo.engine.connect() as conn:
        return (
            conn.execute(select(func.count()).select_from(schedules)).scalar(),
            conn.execute(select(func.count()).select_from(tasks)).scalar(),
        )


def test_create_preview_and_first_occurrence(client, submitter):
    created = client.post(
        "/v1/schedules",
        json={
            "script": "tick.sh",
            "cron": "30 2 * * *",
            "timezone": "Europe/Berlin",
            "variables": {"A": "1"},
        },
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["misfire_policy"] == "fire_once" and body["overlap_policy"] == "skip"
    assert body["next_fire_local"][11:16] in ("02:30", "03:00")  # 03:00 on spring-forward day
    preview = client.get(f"/v1/schedules/{body['schedule_id']}/preview?count=5").json()
    assert len(preview["fires"]) == 5 and preview["fires"][0]["utc"] == body["next_fire_at"]
    assert [t for _, t in submitter.tracked] == [datetime.fromisoformat(body["next_fire_at"])]
    assert client.get("/v1/schedules").json()["schedules"][0]["schedule_id"] == body["schedule_id"]


def test_change_trigger_runs_and_delete(client):
    schedule_id = client.post(
        "/v1/schedules", json={"script": "tick.sh", "cron": "@hourly"}
    ).json()["schedule_id"]
    paused = client.patch(f"/v1/schedules/{schedule_id}", json={"paused": True}).json()
    assert paused["paused"] and paused["next_fire_at"] is None
    changed = client.patch(
        f"/v1/schedules/{schedule_id}", json={"paused": False, "cron": "*/5 * * * *"}
    ).json()
    assert changed["cron"] == "*/5 * * * *" and changed["next_fire_at"]
    triggered = client.post(f"/v1/schedules/{schedule_id}/trigger")
    assert triggered.status_code == 202
    history = client.get(f"/v1/schedules/{schedule_id}/runs").json()["occurrences"]
    assert triggered.json()["task_id"] in [h["task_id"] for h in history]
    assert client.delete(f"/v1/schedules/{schedule_id}").json()["deleted"]
    assert client.get(f"/v1/schedules/{schedule_id}").status_code == 404
    assert client.patch(f"/v1/schedules/{schedule_id}", json={"paused": True}).status_code == 404


def test_send_task_takes_cron_or_execute_at(client):
    scheduled = client.post(
        "/sendTask", json={"script": "tick.sh", "cron": "0 * * * *", "timezone": "Asia/Kolkata"}
    )
    assert scheduled.status_code == 201 and scheduled.json()["timezone"] == "Asia/Kolkata"
    once = client.post("/sendTask", json={"script": "tick.sh", "execute_at": 1900000000})
    assert once.status_code == 201 and once.json()["status"] == "scheduled"
    both = client.post(
        "/sendTask", json={"script": "tick.sh", "execute_at": 1900000000, "cron": "0 * * * *"}
    )
    assert both.status_code == 422 and both.json()["field"] == "cron"
    neither = client.post("/sendTask", json={"script": "tick.sh"})
    assert neither.status_code == 422 and neither.json()["field"] == "execute_at"


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"script": "tick.sh", "cron": "61 * * * *"}, 422, "cron"),
        ({"script": "tick.sh", "cron": "0 0 30 2 *"}, 422, "cron"),
        ({"script": "tick.sh", "cron": "0 * * * *", "timezone": "Mars/Base"}, 422, "timezone"),
        ({"script": "tick.sh", "cron": "* * * * * *"}, 422, "cron"),  # every second < 2 s minimum
        (
            {"script": "tick.sh", "cron": "0 * * * *", "misfire_policy": "sometimes"},
            422,
            "misfire_policy",
        ),
        (
            {"script": "tick.sh", "cron": "0 * * * *", "overlap_policy": "queue_all"},
            422,
            "overlap_policy",
        ),
        ({"script": "tick.sh", "cron": "0 * * * *", "priority": -1}, 422, "priority"),
        (
            {"script": "tick.sh", "cron": "0 * * * *", "end_at": "2020-01-01T00:00:00Z"},
            422,
            "end_at",
        ),
        (
            {"script": "tick.sh", "cron": "0 * * * *", "start_at": "2030-01-01T00:00:00"},
            422,
            "start_at",
        ),
        ({"script": "tick.sh", "cron": "0 * * * *", "owner_id": 3}, 422, "owner_id"),
        ({"script": "nope.sh", "cron": "0 * * * *"}, 404, "script"),
    ],
)
def test_bad_schedules_name_the_field_and_store_nothing(client, repo, body, status, field):
    before = counts(repo)
    response = client.post("/v1/schedules", json=body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert counts(repo) == before


def test_bad_patch_stores_nothing(client, repo):
    schedule_id = client.post(
        "/v1/schedules", json={"script": "tick.sh", "cron": "@hourly"}
    ).json()["schedule_id"]
    before = client.get(f"/v1/schedules/{schedule_id}").json()
    response = client.patch(f"/v1/schedules/{schedule_id}", json={"cron": "0 0 31 2 *"})
    assert response.status_code == 422 and response.json()["field"] == "cron"
    assert client.get(f"/v1/schedules/{schedule_id}").json() == before
    assert client.get(f"/v1/schedules/{schedule_id}/preview?count=0").status_code == 422


def test_readyz_is_503_with_retry_after_when_a_dependency_is_down(client, submitter, repo):
    submitter.probes["shard-0"] = "unavailable: GetTimeoutError"
    response = client.get("/readyz")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["checks"]["shard-0"].startswith("unavailable")


def test_readyz_names_an_unreachable_database(submitter):
    broken = SqlTaskRepository(make_engine("sqlite:////nonexistent/dir/chronoray.db"))
    api = TestClient(create_api(Service(repo=broken, router=submitter, settings=SETTINGS)))
    response = api.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "unavailable: Unavailable"


def test_the_schedule_cap_is_429_and_deleting_one_frees_a_place(repo, submitter):
    api = user_api(repo, SETTINGS.with_(max_schedules=1), submitter)
    api.post("/v1/scripts", json={"name": "tick.sh", "body": "date"})
    first = api.post("/v1/schedules", json={"script": "tick.sh", "cron": "@hourly"})
    over = api.post("/v1/schedules", json={"script": "tick.sh", "cron": "@daily"})
    assert first.status_code == 201 and over.status_code == 429
    assert over.json()["field"] == "schedules" and over.headers["retry-after"] == "30"
    over_send = api.post("/sendTask", json={"script": "tick.sh", "cron": "@daily"})
    assert over_send.status_code == 429
    api.delete(f"/v1/schedules/{first.json()['schedule_id']}")
    assert (
        api.post("/v1/schedules", json={"script": "tick.sh", "cron": "@daily"}).status_code == 201
    )
