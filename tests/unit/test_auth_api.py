"""Tokens, scripts as raw bodies, and the abuse limits of the HTTP API
(over a SQLite repository)."""

import time

import pytest

from chronoray.settings import Settings
from scheduling.errors import RateLimited
from service.auth import RateLimiter
from tests.sqlite import rows_in, sqlite_repository
from tests.unit.fakes import user_api

SETTINGS = Settings(
    database_url="sqlite://", max_script_bytes=1024, max_request_bytes=4096, admin_token="root"
)
TEXT = {"content-type": "text/plain"}


@pytest.fixture
def repo():
    return sqlite_repository()


def later(seconds: float = 3600) -> float:
    return time.time() + seconds


def test_admin_creates_users_and_their_tokens_work(repo):
    api = user_api(repo, SETTINGS)
    admin = {"Authorization": "Bearer root"}
    user = api.post("/v1/users", json={"first_name": "Ada", "last_name": "L"}, headers=admin)
    assert user.status_code == 201
    issued = api.post(f"/v1/users/{user.json()['user_id']}/tokens", json={}, headers=admin)
    assert issued.status_code == 201 and issued.json()["token"].startswith("cr_")
    theirs = {"Authorization": f"Bearer {issued.json()['token']}"}
    assert api.get("/v1/me", headers=theirs).json()["first_name"] == "Ada"
    assert api.get("/v1/users", headers=admin).status_code == 200
    assert api.get("/v1/users", headers=theirs).status_code == 403
    assert api.get("/v1/me", headers=admin).status_code == 403
    revoked = api.delete(f"/v1/tokens/{issued.json()['token_id']}", headers=admin)
    assert revoked.status_code == 200
    assert api.get("/v1/me", headers=theirs).status_code == 401  # at once, not after the cache


def test_no_admin_token_configured_means_no_admin(repo):
    api = user_api(repo, SETTINGS.with_(admin_token=None))
    response = api.post(
        "/v1/users",
        json={"first_name": "a", "last_name": "b"},
        headers={"Authorization": "Bearer "},
    )
    assert response.status_code == 401
    assert api.get("/v1/users", headers={"Authorization": "Bearer root"}).status_code == 401


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer nope"}]
)
def test_missing_or_wrong_tokens_are_401(repo, headers):
    api = user_api(repo, SETTINGS)
    api.headers.pop("Authorization")
    response = api.get("/v1/tasks", headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_scripts_upload_raw_are_versioned_listed_and_deleted_when_unused(repo):
    api = user_api(repo, SETTINGS)
    first = api.put("/v1/scripts/job.py?interpreter=python", content=b"print(1)", headers=TEXT)
    assert first.status_code == 201 and first.json()["interpreter"] == "python"
    again = api.put("/v1/scripts/job.py?interpreter=python", content=b"print(1)", headers=TEXT)
    assert again.status_code == 200 and again.json()["version"] == 1
    octets = {"content-type": "application/octet-stream"}
    second = api.put("/v1/scripts/job.py?interpreter=python", content=b"print(2)", headers=octets)
    assert second.json()["version"] == 2
    assert [v["version"] for v in api.get("/v1/scripts/job.py/versions").json()["versions"]] == [
        2,
        1,
    ]
    assert api.get("/v1/scripts/job.py/body?version=1").content == b"print(1)"
    assert [s["name"] for s in api.get("/v1/scripts").json()["scripts"]] == ["job.py"]
    task = api.post("/v1/tasks", json={"script": "job.py", "execute_at": later()}).json()
    in_use = api.delete("/v1/scripts/job.py")
    assert in_use.status_code == 409 and in_use.json()["error"] == "script_in_use"
    api.delete(f"/v1/tasks/{task['task_id']}")
    deleted = api.delete("/v1/scripts/job.py")
    assert deleted.status_code == 200 and deleted.json()["deleted_versions"] == 2
    assert api.get("/v1/scripts/job.py").status_code == 404
    assert (
        api.post("/v1/tasks", json={"script": "job.py", "execute_at": later()}).status_code == 404
    )


@pytest.mark.parametrize(
    "method, path, body, headers",
    [
        ("put", "/v1/scripts/a.sh", b"echo", {"content-type": "application/json"}),
        ("put", "/v1/scripts/a.sh", b"echo", {"content-type": "image/png"}),
        (
            "post",
            "/v1/scripts",
            b"name=a.sh",
            {"content-type": "application/x-www-form-urlencoded"},
        ),
        ("post", "/v1/tasks", b"<task/>", {"content-type": "application/xml"}),
    ],
)
def test_wrong_media_types_are_415_and_store_nothing(repo, method, path, body, headers):
    api = user_api(repo, SETTINGS)
    response = api.request(method, path, content=body, headers=headers)
    assert response.status_code == 415 and response.json()["field"] == "content-type"
    assert rows_in(repo, "scripts") == 0 and rows_in(repo, "tasks") == 0


def test_a_raw_script_over_the_cap_is_refused_from_its_length(repo):
    api = user_api(repo, SETTINGS)
    response = api.put("/v1/scripts/big.sh", content=b"x" * 1025, headers=TEXT)
    assert response.status_code == 413 and "1024" in response.json()["detail"]
    empty = api.put("/v1/scripts/empty.sh", content=b"", headers=TEXT)
    assert empty.status_code == 422 and empty.json()["field"] == "body"
    bad_name = api.put("/v1/scripts/..sh", content=b"echo", headers=TEXT)
    assert bad_name.status_code == 422 and bad_name.json()["field"] == "name"
    assert rows_in(repo, "scripts") == 0


def test_the_rate_limit_is_429_with_retry_after(repo):
    api = user_api(repo, SETTINGS.with_(rate_limit_per_s=1.0, rate_limit_burst=3))
    answers = [api.get("/v1/tasks") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[-1].headers["retry-after"] == "1"
    assert answers[-1].json()["error"] == "rate_limited"
    other = user_api(repo, SETTINGS.with_(rate_limit_per_s=1.0, rate_limit_burst=3), name="other")
    assert other.get("/v1/tasks").status_code == 200  # a bucket per user and per replica


def test_the_bucket_refills_at_the_sustained_rate():
    now = [0.0]
    limiter = RateLimiter(per_s=2.0, burst=2, clock=lambda: now[0])
    limiter.take(1)
    limiter.take(1)
    with pytest.raises(RateLimited) as refused:
        limiter.take(1)
    assert refused.value.retry_after_s == pytest.approx(0.5)
    now[0] = 0.5
    limiter.take(1)


def test_caps_on_active_tasks_and_schedules_are_429(repo):
    api = user_api(repo, SETTINGS.with_(max_active_tasks=2, max_schedules=0))
    api.post("/v1/scripts", json={"name": "a.sh", "body": "echo"})
    first = api.post("/v1/tasks", json={"script": "a.sh", "execute_at": later()})
    batch = api.post(
        "/v1/tasks:batch",
        json={"tasks": [{"script": "a.sh", "execute_at": later(i)} for i in (1, 2)]},
    )
    assert first.status_code == 201 and batch.status_code == 429
    assert batch.headers["retry-after"] == "30" and batch.json()["field"] == "tasks"
    assert rows_in(repo, "tasks") == 1
    assert api.post("/v1/tasks", json={"script": "a.sh", "execute_at": later(5)}).status_code == 201
    assert api.post("/v1/tasks", json={"script": "a.sh", "execute_at": later(6)}).status_code == 429
    api.delete(f"/v1/tasks/{first.json()['task_id']}")  # cancelled: no longer active
    assert api.post("/v1/tasks", json={"script": "a.sh", "execute_at": later(7)}).status_code == 201
