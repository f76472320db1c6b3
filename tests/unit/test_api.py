"""The HTTP API over a SQLite repository: status codes, error bodies
naming the field, and nothing stored on bad input."""

from datetime import datetime, timedelta, timezone

import pytest

from chronoray.settings import Settings
from scheduling.errors import Unavailable
from tests.sqlite import rows_in, sqlite_repository
from tests.unit.fakes import RepoRouter, user_api

SETTINGS = Settings(database_url="sqlite://", max_script_bytes=1024, max_request_bytes=4096)


@pytest.fixture
def repo():
    return sqlite_repository()


@pytest.fixture
def client(repo):
    api = user_api(repo, SETTINGS)
    assert (
        api.post("/v1/scripts", json={"name": "hello.sh", "body": "echo hello $NAME"}).status_code
        == 201
    )
    return api


def soon() -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=5)).isoformat()


def test_register_script_is_versioned_by_content(client):
    same = client.post("/v1/scripts", json={"name": "hello.sh", "body": "echo hello $NAME"})
    assert same.status_code == 200 and same.json()["version"] == 1
    changed = client.post("/v1/scripts", json={"name": "hello.sh", "body": "echo hi"})
    assert changed.status_code == 201 and changed.json()["version"] == 2
    assert client.get("/v1/scripts/hello.sh").json()["version"] == 2
    assert client.get("/v1/scripts/nope").status_code == 404


@pytest.mark.parametrize("path", ["/v1/tasks", "/sendTask"])
def test_submit_then_get(client, path):
    created = client.post(
        path, json={"script": "hello.sh", "execute_at": soon(), "variables": {"NAME": "world"}}
    )
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["status"] == "scheduled" and task["variables"] == {"NAME": "world"}
    shown = client.get(f"/v1/tasks/{task['task_id']}").json()
    assert shown["runs"] == [] and shown["output"] is None


def test_epoch_seconds_and_offsets_are_the_same_instant(client):
    at = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=30)
    by_epoch = client.post(
        "/v1/tasks", json={"script": "hello.sh", "execute_at": at.timestamp()}
    ).json()
    by_offset = client.post(
        "/v1/tasks",
        json={
            "script": "hello.sh",
            "execute_at": at.astimezone(timezone(timedelta(hours=-5))).isoformat(),
        },
    ).json()
    assert by_epoch["execute_at"] == by_offset["execute_at"] == at.isoformat()


def test_idempotency_key_replays_or_conflicts(client, repo):
    body = {"script": "hello.sh", "execute_at": soon(), "idempotency_key": "abc"}
    first = client.post("/v1/tasks", json=body)
    again = client.post("/v1/tasks", json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["task_id"] == again.json()["task_id"]
    other = client.post("/v1/tasks", json={**body, "priority": 3})
    assert other.status_code == 409 and other.json()["error"] == "idempotency_conflict"
    assert rows_in(repo, "tasks") == 1


def test_cancel_scheduled_task_once_then_conflict_when_started(client, repo):
    task_id = client.post("/v1/tasks", json={"script": "hello.sh", "execute_at": soon()}).json()[
        "task_id"
    ]
    assert client.delete(f"/v1/tasks/{task_id}").json()["status"] == "cancelled"
    assert client.delete(f"/v1/tasks/{task_id}").status_code == 200  # idempotent
    other = client.post("/v1/tasks", json={"script": "hello.sh", "execute_at": soon()}).json()[
        "task_id"
    ]
    repo.start_shard(0, now=datetime.now(timezone.utc))
    repo.claim(
        [other],
        shard=0,
        epoch=1,
        lease_until=datetime.now(timezone.utc),
        now=datetime.now(timezone.utc),
    )
    refused = client.delete(f"/v1/tasks/{other}")
    assert refused.status_code == 409 and refused.json()["error"] == "task_not_cancellable"
    assert client.delete("/v1/tasks/999999").status_code == 404


BAD_TASKS = [
    ({"script": "nope.sh", "execute_at": "2030-01-01T00:00:00Z"}, 404, "script"),
    ({"script": "hello.sh\n", "execute_at": 1900000000}, 422, "script"),  # "$" before a newline
    (
        {"script": "hello.sh", "execute_at": 1900000000, "variables": {"A\n": "x"}},
        422,
        "variables.A\n",
    ),
    ({"script": "hello.sh", "execute_at": "2030-01-01T00:00:00"}, 422, "execute_at"),
    ({"script": "hello.sh", "execute_at": "tomorrow"}, 422, "execute_at"),
    ({"script": "hello.sh", "execute_at": True}, 422, "execute_at"),
    ({"script": "hello.sh", "execute_at": -5}, 422, "execute_at"),
    ({"script": "hello.sh", "execute_at": 1e30}, 422, "execute_at"),
    ({"script": "hello.sh", "execute_at": [1]}, 422, "execute_at"),
    ({"script": "hello.sh"}, 422, "execute_at"),
    ({"script": "hello.sh", "execute_at": 1900000000, "priority": -1}, 422, "priority"),
    ({"script": "hello.sh", "execute_at": 1900000000, "priority": 10}, 422, "priority"),
    ({"script": "hello.sh", "execute_at": 1900000000, "priority": "1"}, 422, "priority"),
    ({"script": "hello.sh", "execute_at": 1900000000, "max_attempts": 0}, 422, "max_attempts"),
    ({"script": "hello.sh", "execute_at": 1900000000, "timeout_s": 0}, 422, "timeout_s"),
    ({"script": "hello.sh", "execute_at": 1900000000, "owner_id": 2}, 422, "owner_id"),
    ({"script": "hello.sh", "execute_at": 1900000000, "status": "succeeded"}, 422, "status"),
    (
        {"script": "hello.sh", "execute_at": 1900000000, "variables": {"PATH": "/x"}},
        422,
        "variables.PATH",
    ),
    (
        {"script": "hello.sh", "execute_at": 1900000000, "variables": {"LD_PRELOAD": "x"}},
        422,
        "variables.LD_PRELOAD",
    ),
    (
        {"script": "hello.sh", "execute_at": 1900000000, "variables": {"lower": "x"}},
        422,
        "variables.lower",
    ),
    (
        {"script": "hello.sh", "execute_at": 1900000000, "variables": {"A": "x\ny"}},
        422,
        "variables.A",
    ),
    ({"script": "hello.sh", "execute_at": 1900000000, "variables": {"A": 1}}, 422, "variables.A"),
    ({"script": "../etc/passwd", "execute_at": 1900000000}, 422, "script"),
    *(
        (
            {"script": "hello.sh", "execute_at": 1900000000, "variables": {name: "x"}},
            422,
            f"variables.{name}",
        )
        for name in ("PYTHONPATH", "BASH_ENV", "LD_LIBRARY_PATH", "A" * 65, "1A", "A-B", "")
    ),
    (
        {"script": "hello.sh", "execute_at": 1900000000, "variables": {"A": "x\x00y"}},
        422,
        "variables.A",
    ),
    (
        {"script": "hello.sh", "execute_at": 1900000000, "variables": {"A": "x\ry"}},
        422,
        "variables.A",
    ),
    ({"script": "hello.sh", "execute_at": 1900000000, "task_id": 5}, 422, "task_id"),
    ({"script": "hello.sh", "execute_at": 1900000000, "attempt": 2}, 422, "attempt"),
]


def test_variable_count_and_size_are_capped(repo):
    api = user_api(repo, SETTINGS.with_(max_request_bytes=1024 * 1024))
    api.post("/v1/scripts", json={"name": "hello.sh", "body": "echo"})
    many = {f"V{i}": "x" for i in range(65)}
    response = api.post(
        "/v1/tasks", json={"script": "hello.sh", "execute_at": 1900000000, "variables": many}
    )
    assert response.status_code == 422 and response.json()["field"] == "variables"
    big = {"BIG": "x" * 4097}
    response = api.post(
        "/v1/tasks", json={"script": "hello.sh", "execute_at": 1900000000, "variables": big}
    )
    assert response.status_code == 413 and response.json()["field"] == "variables.BIG"
    ok = {f"V{i}": "x" * 4096 for i in range(64)}
    response = api.post(
        "/v1/tasks", json={"script": "hello.sh", "execute_at": 1900000000, "variables": ok}
    )
    assert response.status_code == 201
    assert rows_in(repo, "tasks") == 1


@pytest.mark.parametrize("body, status, field", BAD_TASKS)
def test_bad_task_input_names_the_field_and_stores_nothing(client, repo, body, status, field):
    response = client.post("/v1/tasks", json=body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert response.json()["detail"]
    assert rows_in(repo, "tasks") == 0


def test_malformed_json_is_400(client, repo):
    response = client.post(
        "/v1/tasks", content=b'{"script": "hello.sh",', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": "malformed_json",
        "detail": "request body is not valid JSON",
        "field": "body",
    }
    assert rows_in(repo, "tasks") == 0


def test_script_over_the_size_limit_is_413_and_not_stored(client, repo):
    before = rows_in(repo, "scripts")
    response = client.post("/v1/scripts", json={"name": "big.sh", "body": "x" * 2000})
    assert response.status_code == 413 and response.json()["field"] == "body"
    huge = client.post("/v1/scripts", json={"name": "huge.sh", "body": "x" * 10_000})
    assert huge.status_code == 413
    assert rows_in(repo, "scripts") == before


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "a b", "body": "x"}, "name"),
        ({"name": "ok.sh", "body": "x", "interpreter": "perl"}, "interpreter"),
        ({"name": "ok.sh"}, "body"),
        ({"name": "ok.sh", "body": "x", "extra": 1}, "extra"),
    ],
)
def test_bad_script_input(client, repo, body, field):
    before = rows_in(repo, "scripts")
    response = client.post("/v1/scripts", json=body)
    assert response.status_code == 422 and response.json()["field"] == field
    assert rows_in(repo, "scripts") == before


def test_unknown_task_is_404_and_healthz_is_up(client):
    assert client.get("/v1/tasks/424242").json()["error"] == "task_not_found"
    assert client.get("/v1/tasks/abc").status_code == 422
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_reports_each_dependency(client):
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {
        "ready": True,
        "checks": {"database": "ok", "dispatcher": "ok"},
    }


def test_list_tasks_filters_and_pages_with_a_cursor(client):
    base = datetime.now(timezone.utc) + timedelta(hours=1)
    client.post("/v1/scripts", json={"name": "other.sh", "body": "echo other"})
    ids = []
    for i in range(5):
        body = {"script": "hello.sh" if i % 2 else "other.sh", "execute_at": base.timestamp() + i}
        ids.append(client.post("/v1/tasks", json=body).json()["task_id"])
    client.delete(f"/v1/tasks/{ids[0]}")

    everything = client.get("/v1/tasks").json()
    assert [t["task_id"] for t in everything["tasks"]] == ids[::-1]  # newest first
    assert everything["next_cursor"] is None

    pages, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/tasks", params=params).json()
        pages.append([t["task_id"] for t in page["tasks"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]

    def listed(**params):
        return [t["task_id"] for t in client.get("/v1/tasks", params=params).json()["tasks"]]

    assert listed(script="hello.sh") == [ids[3], ids[1]]
    assert listed(status="cancelled") == [ids[0]]
    assert listed(status=["cancelled", "scheduled"]) == ids[::-1]
    assert listed(
        due_from=base.timestamp() + 1, due_before=(base + timedelta(seconds=3)).isoformat()
    ) == [
        ids[2],
        ids[1],
    ]


@pytest.mark.parametrize(
    "params, field",
    [
        ({"status": "finished"}, "status"),
        ({"cursor": "bm9wZQ"}, "cursor"),
        ({"cursor": "!!"}, "cursor"),
        ({"due_from": "yesterday"}, "due_from"),
        ({"due_before": "2026-01-01T00:00:00"}, "due_before"),  # no offset
    ],
)
def test_list_tasks_refuses_bad_filters(client, params, field):
    response = client.get("/v1/tasks", params=params)
    assert response.status_code == 422 and response.json()["field"] == field


@pytest.mark.parametrize("limit", [0, 1001, "x"])
def test_list_tasks_limit_is_bounded(client, limit):
    response = client.get("/v1/tasks", params={"limit": limit})
    assert response.status_code == 422


def batch_item(i, **fields):
    at = (datetime.now(timezone.utc) + timedelta(hours=1, seconds=i)).isoformat()
    return {"script": "hello.sh", "execute_at": at, **fields}


def test_batch_stores_every_task_in_one_go_and_replays_idempotently(client, repo):
    items = [batch_item(i, idempotency_key=f"k{i}") for i in range(5)]
    created = client.post("/v1/tasks:batch", json={"tasks": items})
    assert created.status_code == 201 and created.json()["created"] == 5
    assert rows_in(repo, "tasks") == 5
    again = client.post("/v1/tasks:batch", json={"tasks": items})
    assert again.status_code == 200 and again.json()["created"] == 0
    assert [t["task_id"] for t in again.json()["tasks"]] == [
        t["task_id"] for t in created.json()["tasks"]
    ]


def test_a_batch_tells_the_shards_only_of_tasks_inside_their_look_ahead(repo):
    """Tasks due beyond the look-ahead are left to the shards' sweeps: a
    million future tasks need no hint each."""
    router = RepoRouter(repo, lambda: datetime.now(timezone.utc))
    api = user_api(repo, SETTINGS, router=router)
    assert api.post("/v1/scripts", json={"name": "hello.sh", "body": "echo"}).status_code == 201
    soon = (datetime.now(timezone.utc) + timedelta(seconds=5)).isoformat()
    items = [batch_item(0), {"script": "hello.sh", "execute_at": soon}, batch_item(2)]
    response = api.post("/v1/tasks:batch", json={"tasks": items})
    assert response.status_code == 201 and rows_in(repo, "tasks") == 3
    assert [task_id for task_id, _ in router.tracked] == [response.json()["tasks"][1]["task_id"]]
    far = api.post("/v1/tasks:batch", json={"tasks": [batch_item(3), batch_item(4)]})
    assert far.status_code == 201 and len(router.tracked) == 1  # no call for them at all


@pytest.mark.parametrize("failure", [Unavailable("shard 0 is down"), RuntimeError("a bug")])
def test_a_hint_the_shard_does_not_take_leaves_a_committed_batch_answered_2xx(repo, failure):
    """The batch is committed before its shards are told; a shard down then
    finds the tasks in its sweep, so the answer is the commit's (a 5xx here
    would make a client without a key send the tasks twice)."""
    router = RepoRouter(repo, lambda: datetime.now(timezone.utc))
    router.track_fails_with = failure
    api = user_api(repo, SETTINGS, router=router)
    assert api.post("/v1/scripts", json={"name": "hello.sh", "body": "echo"}).status_code == 201
    soon = (datetime.now(timezone.utc) + timedelta(seconds=5)).isoformat()
    response = api.post(
        "/v1/tasks:batch", json={"tasks": [{"script": "hello.sh", "execute_at": soon}]}
    )
    assert response.status_code == 201, response.text
    assert rows_in(repo, "tasks") == 1 and router.tracked == []


@pytest.mark.parametrize(
    "bad_item, status, field",
    [
        ({"script": "nope.sh"}, 404, "tasks[2].script"),
        ({"execute_at": "tomorrow"}, 422, "tasks[2].execute_at"),
        ({"variables": {"LD_PRELOAD": "x"}}, 422, "tasks[2].variables"),
        ({"owner_id": 7}, 422, "tasks[2].owner_id"),
        ({"idempotency_key": "k0"}, 409, "tasks[2].idempotency_key"),  # repeats item 0's
    ],
)
def test_one_bad_item_stores_nothing_and_names_the_item(client, repo, bad_item, status, field):
    items = [batch_item(i) for i in range(4)]
    items[0]["idempotency_key"] = "k0"
    items[2].update(bad_item)
    response = client.post("/v1/tasks:batch", json={"tasks": items})
    assert response.status_code == status, response.json()
    assert response.json()["field"].startswith(field)
    assert rows_in(repo, "tasks") == 0


@pytest.mark.parametrize(
    "first, second",
    [
        ({"priority": 10}, {"execute_at": "tomorrow"}),  # new_task's limit, then TaskIn's check
        ({"execute_at": "tomorrow"}, {"priority": 10}),
        ("not an object", {"priority": 10}),
    ],
)
def test_a_batch_names_its_first_bad_item_whichever_check_finds_it(client, repo, first, second):
    """The list is validated in one call; where that fails, item by item, so
    that the item named is the lowest bad one, not the first TaskIn refuses."""
    items: list = [batch_item(i) for i in range(4)]
    items[1] = first if isinstance(first, str) else {**items[1], **first}
    items[3].update(second)
    response = client.post("/v1/tasks:batch", json={"tasks": items})
    assert response.status_code == 422
    assert response.json()["field"].startswith("tasks[1]"), response.json()
    assert rows_in(repo, "tasks") == 0


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"tasks": []}, 422, "tasks"),
        ({"tasks": ["not an object"]}, 422, "tasks[0]"),
        ({"task": []}, 422, "tasks"),  # the missing field comes first
    ],
)
def test_batch_shape_errors(client, repo, body, status, field):
    response = client.post("/v1/tasks:batch", json=body)
    assert response.status_code == status and response.json()["field"] == field
    assert rows_in(repo, "tasks") == 0


def test_a_batch_beyond_the_configured_count_is_refused(repo):
    api = user_api(repo, SETTINGS.with_(max_batch_tasks=3))
    api.post("/v1/scripts", json={"name": "hello.sh", "body": "echo hello"})
    response = api.post("/v1/tasks:batch", json={"tasks": [batch_item(i) for i in range(4)]})
    assert response.status_code == 413 and response.json()["field"] == "tasks"
    assert rows_in(repo, "tasks") == 0
    assert api.post("/v1/tasks:batch", json={"tasks": [batch_item(0)]}).status_code == 201


def test_runs_and_their_output_per_task(client, repo):
    from tests.contract.test_repository import result

    task_id = client.post("/v1/tasks", json={"script": "hello.sh", "execute_at": soon()}).json()[
        "task_id"
    ]
    assert client.get(f"/v1/tasks/{task_id}/runs").json() == {"task_id": task_id, "runs": []}
    from scheduling.timeline import Wheel

    wheel = Wheel(num_shards=1, range_s=60)
    epoch = repo.start_shard(0, now=datetime.now(timezone.utc))
    due = repo.due_tasks(
        wheel=wheel, shard=0, before=datetime.now(timezone.utc) + timedelta(minutes=1), limit=10
    )
    [spec] = repo.claim(
        [task_id for task_id, _ in due],
        shard=0,
        epoch=epoch,
        lease_until=datetime.now(timezone.utc) + timedelta(minutes=1),
        now=datetime.now(timezone.utc),
    ).specs
    repo.record_results([result(spec)], policy=SETTINGS.retry, now=datetime.now(timezone.utc))
    [run] = client.get(f"/v1/tasks/{task_id}/runs").json()["runs"]
    assert run["attempt"] == 1 and run["executor_id"] == "small-0" and run["status"] == "succeeded"
    output = client.get(f"/v1/tasks/{task_id}/runs/1/output")
    assert output.status_code == 200 and output.headers["content-type"].startswith("text/plain")
    assert output.text == "x" * 4096  # the kept tail
    assert client.get(f"/v1/tasks/{task_id}/runs/2/output").json()["field"] == "attempt"
    assert client.get(f"/v1/tasks/{task_id + 999}/runs").status_code == 404


def test_executors_come_from_the_pool(client):
    body = client.get("/v1/executors").json()
    assert [e["executor_id"] for e in body["executors"]] == ["small-1"]
    assert body["tiers"]["small"]["live"] == 1


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b'{"script": "hello.sh", "execute_at": NaN}', "NaN"),
        (b'{"script": "hello.sh", "execute_at": Infinity}', "Infinity"),
        (b'{"script": "hello.sh", "script": "other.sh", "execute_at": 1900000000}', "twice"),
        (
            b'{"script": "hello.sh", "execute_at": 1900000000, "priority": 99999999999999999999}',
            "64 bits",
        ),
        (b'{"script": "hello\xff.sh", "execute_at": 1900000000}', "UTF-8"),
        (b'{"tasks": [{"script": "hello.sh", "execute_at": -Infinity}]}', "Infinity"),
    ],
)
def test_json_that_python_accepts_but_an_api_must_not(client, repo, raw, reason):
    path = "/v1/tasks:batch" if raw.startswith(b'{"tasks"') else "/v1/tasks"
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"] and response.json()["field"] == "body"
    assert rows_in(repo, "tasks") == 0


def test_malformed_json_is_still_a_400(client):
    response = client.post(
        "/v1/tasks", content=b'{"script": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"] == "malformed_json"


def test_a_json_body_is_parsed_once_by_the_strict_check(client, monkeypatch):
    """FastAPI validates what the strict check parsed; Starlette's own
    parser is not reached (a 1,000-task batch was parsed twice)."""
    import types

    import starlette.requests

    def second_parse(*args, **kwargs):
        raise AssertionError("the body was parsed a second time")

    monkeypatch.setattr(starlette.requests, "json", types.SimpleNamespace(loads=second_parse))
    single = client.post("/v1/tasks", json={"script": "hello.sh", "execute_at": soon()})
    batch = client.post("/v1/tasks:batch", json={"tasks": [batch_item(0), batch_item(1)]})
    assert single.status_code == 201 and batch.status_code == 201, (single.text, batch.text)
    assert batch.json()["created"] == 2


def test_an_unexpected_exception_is_a_json_500_and_logged(repo, caplog):
    api = user_api(repo, SETTINGS)
    api_app = api.app

    @api_app.get("/v1/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug")

    api = type(api)(api_app, raise_server_exceptions=False, headers=api.headers)
    response = api.get("/v1/boom")
    assert response.status_code == 500
    assert response.json() == {
        "error": "internal_error",
        "detail": "an unexpected error; it is logged",
    }
    assert "a bug" in caplog.text
