"""Users, tokens and tenant isolation through the real Serve proxy on
PostgreSQL: every route of the OpenAPI document, called by user B with
user A's ids, is a 404 or leaves A's objects out."""

import hashlib
import re
import time

import httpx
import pytest
from sqlalchemy import select

from storage.schema import api_tokens, scripts
from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres]

PUBLIC = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")}
ADMIN = {
    ("post", "/v1/users"),
    ("get", "/v1/users"),
    ("get", "/v1/users/{user_id}"),
    ("post", "/v1/users/{user_id}/tokens"),
    ("delete", "/v1/tokens/{token_id}"),
}


def session(deployment, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=deployment.url, timeout=30, headers={"Authorization": f"Bearer {token}"}
    )


@pytest.fixture(scope="module")
def tenants(deployment):
    """User A with a script, a pending task, a finished task with a run, a
    dead task and a schedule; user B with nothing."""
    a_id, a_token = deployment.new_user("alice")
    b_id, b_token = deployment.new_user("bob")
    a, b = session(deployment, a_token), session(deployment, b_token)
    a.put("/v1/scripts/a.sh", content="echo from A", headers={"content-type": "text/plain"})
    a.put("/v1/scripts/a-fails.sh", content="exit 3", headers={"content-type": "text/plain"})
    pending = a.post("/v1/tasks", json={"script": "a.sh", "execute_at": time.time() + 3600})
    ran = a.post("/v1/tasks", json={"script": "a.sh", "execute_at": time.time()})
    dead = a.post(
        "/v1/tasks", json={"script": "a-fails.sh", "execute_at": time.time(), "max_attempts": 1}
    )
    schedule = a.post("/v1/schedules", json={"script": "a.sh", "cron": "0 0 1 1 *"})
    for response in (pending, ran, dead, schedule):
        assert response.status_code == 201, response.text
    ids = {
        "pending": pending.json()["task_id"],
        "ran": ran.json()["task_id"],
        "dead": dead.json()["task_id"],
        "schedule": schedule.json()["schedule_id"],
    }
    for key, status in (("ran", "succeeded"), ("dead", "dead")):
        wait_for(
            lambda k=key, s=status: a.get(f"/v1/tasks/{ids[k]}").json()["status"] == s,
            timeout_s=60,
            what=f"A's {key} task",
        )
    yield {"a": a, "b": b, "a_id": a_id, "b_id": b_id, "ids": ids}
    a.close()
    b.close()


def test_requests_without_a_valid_token_are_401(deployment, tenants):
    anonymous = httpx.Client(base_url=deployment.url, timeout=30)
    for method, path in [("get", "/v1/tasks"), ("post", "/sendTask"), ("get", "/v1/scripts")]:
        response = anonymous.request(method, path, json={} if method == "post" else None)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"] == "unauthorized"
    wrong = anonymous.get("/v1/tasks", headers={"Authorization": "Bearer cr_not-a-token"})
    assert wrong.status_code == 401
    assert anonymous.get("/healthz").status_code == 200


def test_tokens_are_stored_hashed_and_revocation_takes_effect(deployment):
    admin = {"Authorization": f"Bearer {deployment.settings.admin_token}"}
    user_id, token = deployment.new_user("carol")
    with deployment.repo.engine.connect() as conn:
        stored = conn.execute(
            select(api_tokens.c.token_id, api_tokens.c.token_hash).where(
                api_tokens.c.user_id == user_id
            )
        ).one()
    assert stored.token_hash == hashlib.sha256(token.encode()).hexdigest() != token
    with session(deployment, token) as carol:
        assert carol.get("/v1/me").json()["user_id"] == user_id
        revoked = httpx.delete(f"{deployment.url}/v1/tokens/{stored.token_id}", headers=admin)
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        assert carol.get("/v1/me").status_code == 401
    unknown = httpx.delete(f"{deployment.url}/v1/tokens/999999999", headers=admin)
    assert unknown.status_code == 404


def test_admin_and_user_tokens_keep_to_their_routes(deployment, tenants):
    admin = session(deployment, deployment.settings.admin_token)
    assert admin.get("/v1/tasks").status_code == 403
    assert (
        tenants["b"].post("/v1/users", json={"first_name": "x", "last_name": "y"}).status_code
        == 403
    )
    assert tenants["b"].get("/v1/users").status_code == 403
    assert admin.post(f"/v1/users/{10**12}/tokens", json={}).status_code == 404
    bad = admin.post("/v1/users", json={"first_name": "", "last_name": "y"})
    assert bad.status_code == 422 and bad.json()["field"] == "first_name"


@pytest.mark.parametrize(
    "field", ["owner_id", "status", "attempt", "task_id", "script_id", "epoch"]
)
def test_fields_only_the_server_sets_are_refused(tenants, field):
    response = tenants["b"].post(
        "/v1/tasks", json={"script": "a.sh", "execute_at": time.time() + 60, field: 1}
    )
    assert response.status_code == 422
    assert response.json()["field"] == field and "set by the server" in response.json()["detail"]


def a_script_ids(deployment, a_id: int) -> set[int]:
    with deployment.repo.engine.connect() as conn:
        return set(
            conn.execute(select(scripts.c.script_id).where(scripts.c.owner_id == a_id)).scalars()
        )


def test_every_route_keeps_b_out_of_a(deployment, tenants):
    """Walks the OpenAPI document: a route nobody classified fails the test,
    so a new route cannot skip this check."""
    a, b, ids = tenants["a"], tenants["b"], tenants["ids"]
    a_scripts_before = a.get("/v1/scripts").json()["scripts"]
    a_tasks = set(ids[k] for k in ("pending", "ran", "dead"))
    path_values = {
        "task_id": ids["ran"],
        "schedule_id": ids["schedule"],
        "name": "a.sh",
        "attempt": 1,
    }
    later = time.time() + 3600
    bodies = {
        ("post", "/v1/tasks/{task_id}/retry"): {"attempts": 1},
        ("patch", "/v1/schedules/{schedule_id}"): {"paused": True},
        ("post", "/v1/schedules/{schedule_id}/backfill"): {
            "from": time.time() - 3600,
            "to": time.time() - 60,
        },
    }
    # routes without an id: B's answer must not contain A's objects
    listing = {
        ("get", "/v1/tasks"): lambda: [
            b.get("/v1/tasks"),
            b.get("/v1/tasks", params={"script": "a.sh"}),
            b.get("/v1/tasks", params={"schedule_id": ids["schedule"]}),
        ],
        ("get", "/v1/dead"): lambda: [b.get("/v1/dead")],
        ("get", "/v1/schedules"): lambda: [b.get("/v1/schedules")],
        ("get", "/v1/scripts"): lambda: [b.get("/v1/scripts")],
        ("get", "/v1/me"): lambda: [b.get("/v1/me")],
        ("get", "/v1/executors"): lambda: [b.get("/v1/executors")],  # the pool, no tenant data
        ("get", "/v1/schedules:preview"): lambda: [  # an expression's fires, no tenant data
            b.get("/v1/schedules:preview", params={"cron": "0 0 1 1 *"})
        ],
    }
    # writes without an id that name A's script: B has none by that name
    naming_a = {
        ("post", "/v1/tasks"): {"script": "a.sh", "execute_at": later},
        ("post", "/sendTask"): {"script": "a.sh", "execute_at": later},
        ("post", "/v1/tasks:batch"): {"tasks": [{"script": "a.sh", "execute_at": later}]},
        ("post", "/v1/schedules"): {"script": "a.sh", "cron": "0 0 1 1 *"},
    }
    # B registering a script of the same name makes B's own, leaving A's alone
    own_namespace = {("post", "/v1/scripts"), ("put", "/v1/scripts/{name}")}

    document = b.get("/openapi.json").json()
    seen = set()
    for path, operations in document["paths"].items():
        for method in operations:
            route = (method, path)
            seen.add(route)
            if route in PUBLIC or route in ADMIN:
                continue
            if route in listing:
                for response in listing[route]():
                    assert response.status_code == 200, (route, response.text)
                    shown = [
                        *(("task_id", t) for t in a_tasks),
                        ("schedule_id", ids["schedule"]),
                        ("user_id", tenants["a_id"]),
                        *(("script_id", s["script_id"]) for s in a_scripts_before),
                    ]
                    for key, value in shown:
                        assert not re.search(rf'"{key}":{value}(?!\d)', response.text), route
                continue
            if route in naming_a:
                response = b.request(method, path, json=naming_a[route])
                assert response.status_code == 404, (route, response.text)
                continue
            if route in own_namespace:
                continue  # checked below: A's scripts are unchanged
            assert "{" in path, f"unclassified route without an id: {route}"
            url = path.format(**path_values)
            response = b.request(method, url, json=bodies.get(route))
            assert response.status_code == 404, (route, response.status_code, response.text)
    assert ADMIN <= seen and len(seen) > 30

    for task_id in a_tasks:  # the ids of every kind of A's task, on the id routes
        for method, url in [
            ("get", f"/v1/tasks/{task_id}"),
            ("get", f"/v1/tasks/{task_id}/runs"),
            ("get", f"/v1/tasks/{task_id}/runs/1/output"),
            ("delete", f"/v1/tasks/{task_id}"),
            ("post", f"/v1/tasks/{task_id}/retry"),
        ]:
            assert b.request(method, url).status_code == 404, (method, url)
    b.post("/v1/scripts", json={"name": "a.sh", "body": "echo from B"})
    b.put("/v1/scripts/a.sh", content="echo B again", headers={"content-type": "text/plain"})
    assert a.get("/v1/scripts").json()["scripts"] == a_scripts_before
    assert a.get("/v1/scripts/a.sh/body").text == "echo from A"
    # A's objects are untouched by all of the above
    assert a.get(f"/v1/tasks/{ids['pending']}").json()["status"] == "scheduled"
    assert a.get(f"/v1/tasks/{ids['dead']}").json()["status"] == "dead"
    assert a.get(f"/v1/schedules/{ids['schedule']}").json()["paused"] is False
    assert len(a_script_ids(deployment, tenants["a_id"])) == 2
