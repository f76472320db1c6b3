"""The web console over a SQLite repository: sign-in and its cookie, CSRF,
the security headers, escaping, another user's objects, every page, and
the backfill and audit operations behind the schedule page."""

import re
from datetime import datetime, timedelta, timezone

import pytest

from chronoray.settings import Settings
from tests.sqlite import rows_in, sqlite_repository
from tests.unit.fakes import user_api

SETTINGS = Settings(database_url="sqlite://", admin_token="root", max_backfill_fires=20)
TEXT = {"content-type": "text/plain"}
UTC = timezone.utc


def signed_in(api, token):
    page = api.get("/ui/login")
    check = re.search(r'name="login_check" value="([^"]+)"', page.text).group(1)
    answer = api.post(
        "/ui/login", data={"token": token, "login_check": check}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    return answer


def csrf_of(page) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


@pytest.fixture
def repo():
    return sqlite_repository()


@pytest.fixture
def api(repo):
    """A browser-like client signed in as a user with one script."""
    client = user_api(repo, SETTINGS)
    client.put("/v1/scripts/hello.sh", content=b"echo '<img src=x onerror=alert(1)>'", headers=TEXT)
    token = client.headers.pop("Authorization").split()[1]
    client.token = token
    signed_in(client, token)
    return client


def test_sign_in_sets_an_httponly_strict_cookie_and_no_token_in_the_url(repo):
    client = user_api(repo, SETTINGS)
    token = client.headers.pop("Authorization").split()[1]
    answer = signed_in(client, token)
    cookie = answer.headers["set-cookie"]
    assert "cr_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert token not in answer.headers["location"] and token not in cookie
    with repo.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT session_hash, token_hash FROM console_sessions").one()
    session_id = re.search(r"cr_session=([^;]+)", cookie).group(1)
    assert session_id not in stored and token not in stored  # only digests are stored


def test_a_bad_token_stays_on_the_sign_in_page(repo):
    client = user_api(repo, SETTINGS)
    client.headers.pop("Authorization")
    page = client.get("/ui/login")
    check = re.search(r'name="login_check" value="([^"]+)"', page.text).group(1)
    answer = client.post("/ui/login", data={"token": "cr_nope", "login_check": check})
    assert answer.status_code == 401 and "Unknown or revoked token" in answer.text
    forged = client.post("/ui/login", data={"token": "cr_nope", "login_check": "forged"})
    assert forged.status_code == 403


def test_without_a_session_pages_go_to_sign_in_and_fragments_answer_401(repo):
    client = user_api(repo, SETTINGS)
    client.headers.pop("Authorization")
    page = client.get("/ui/tasks", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/ui/login"
    fragment = client.get("/ui/fragments/overview", headers={"X-Console-Fragment": "1"})
    assert fragment.status_code == 401


def test_every_page_answers_with_a_csp_without_inline_scripts(api):
    schedule = api.post(
        "/ui/schedules",
        data={"csrf": csrf_of(api.get("/ui/")), "script": "hello.sh", "cron": "*/10 * * * *"},
        follow_redirects=False,
    )
    sid = schedule.headers["location"].split("/")[-1].split("?")[0]
    pages = [
        "/ui/",
        "/ui/tasks",
        "/ui/schedules",
        "/ui/schedules/new",
        f"/ui/schedules/{sid}",
        f"/ui/schedules/{sid}/audit",
        "/ui/scripts",
        "/ui/scripts/hello.sh",
        "/ui/executors",
        "/ui/dead",
        "/ui/fragments/overview",
    ]
    for path in pages:
        page = api.get(path)
        assert page.status_code == 200, (path, page.text[:300])
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "<script>" not in page.text and " on" + "click=" not in page.text
        assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")


def test_forms_need_the_sessions_csrf_token(api, repo):
    no_token = api.post("/ui/tasks", data={"script": "hello.sh"})
    wrong = api.post("/ui/tasks", data={"script": "hello.sh", "csrf": "x" * 43})
    assert no_token.status_code == 403 and wrong.status_code == 403
    assert rows_in(repo, "tasks") == 0


def test_a_submitted_task_shows_its_variables_as_text(api):
    form = {"csrf": csrf_of(api.get("/ui/tasks")), "script": "hello.sh", "variables": "X=<b>x</b>"}
    answer = api.post("/ui/tasks", data=form, follow_redirects=False)
    assert answer.status_code == 303
    page = api.get(answer.headers["location"])
    assert "&lt;b&gt;x&lt;/b&gt;" in page.text and "<b>x</b>" not in page.text
    body = api.get("/ui/scripts/hello.sh").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in body and "<img" not in body


def test_bad_form_input_is_a_422_page_and_stores_nothing(api, repo):
    csrf = csrf_of(api.get("/ui/tasks"))
    answer = api.post("/ui/tasks", data={"csrf": csrf, "script": "hello.sh", "priority": "high"})
    assert answer.status_code == 422 and "priority" in answer.text
    schedule = api.post("/ui/schedules", data={"csrf": csrf, "script": "hello.sh", "cron": "bad"})
    assert schedule.status_code == 422 and "cron" in schedule.text
    assert rows_in(repo, "tasks") == 0 and rows_in(repo, "schedules") == 0


def test_another_users_task_is_the_not_found_page(api, repo):
    other = user_api(repo, SETTINGS, name="other")
    other.put("/v1/scripts/mine.sh", content=b"true", headers=TEXT)
    theirs = other.post(
        "/v1/tasks",
        json={"script": "mine.sh", "execute_at": datetime.now(UTC).isoformat()},
    ).json()["task_id"]
    page = api.get(f"/ui/tasks/{theirs}")
    assert page.status_code == 404 and 'id="not-found"' in page.text
    assert "mine.sh" not in page.text


def test_sign_out_and_a_revoked_token_end_the_session(api, repo):
    csrf = csrf_of(api.get("/ui/"))
    assert api.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    assert api.get("/ui/", follow_redirects=False).headers["location"] == "/ui/login"
    assert rows_in(repo, "console_sessions") == 0

    signed_in(api, api.token)
    assert api.get("/ui/").status_code == 200
    with repo.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE api_tokens SET revoked_at = created_at"
        )  # as DELETE /v1/tokens
    assert api.get("/ui/", follow_redirects=False).status_code == 303


def test_the_admin_sees_users_creates_one_and_issues_a_token(repo):
    client = user_api(repo, SETTINGS)
    client.headers.pop("Authorization")
    signed_in(client, "root")
    users = client.get("/ui/users")
    assert users.status_code == 200
    csrf = csrf_of(users)
    created = client.post("/ui/users", data={"csrf": csrf, "first_name": "Ada", "last_name": "<L>"})
    assert created.status_code == 200 and "Ada &lt;L&gt;" in created.text
    user_id = re.findall(r"/ui/users/(\d+)/tokens", created.text)[-1]
    issued = client.post(f"/ui/users/{user_id}/tokens", data={"csrf": csrf, "label": "ui"})
    token = re.search(r'id="issued-token">([^<]+)<', issued.text).group(1)
    assert token.startswith("cr_")
    assert client.get("/ui/tasks").status_code == 403  # the admin has no tasks of its own


def test_cron_preview_validates_as_you_type(api):
    good = api.get(
        "/ui/fragments/cron-preview", params={"cron": "0 9 * * 1", "timezone": "Asia/Tokyo"}
    )
    assert good.text.count("<li>") == 5 and "JST" in good.text
    bad = api.get("/ui/fragments/cron-preview", params={"cron": "61 * * * *"})
    assert 'id="preview-error"' in bad.text


def test_backfill_over_the_api_creates_each_missing_time_once(api, repo):
    headers = {"Authorization": f"Bearer {api.token}"}
    schedule = api.post(
        "/v1/schedules", json={"script": "hello.sh", "cron": "*/10 * * * *"}, headers=headers
    ).json()
    now = datetime.now(UTC)
    window = {"from": (now - timedelta(hours=1)).isoformat(), "to": now.isoformat()}
    path = f"/v1/schedules/{schedule['schedule_id']}/backfill"
    first = api.post(path, json=window, headers=headers)
    assert first.status_code == 201 and len(first.json()["created"]) == 6
    again = api.post(path, json=window, headers=headers)
    assert again.status_code == 200 and again.json() == {
        **again.json(),
        "created": [],
        "existing": 6,
    }
    stored = rows_in(repo, "tasks")
    too_many = {"from": (now - timedelta(hours=5)).isoformat(), "to": now.isoformat()}
    future = {"from": now.isoformat(), "to": (now + timedelta(hours=1)).isoformat()}
    for body, field in [(too_many, "to"), (future, "to"), ({"from": "yesterday", "to": 1}, "from")]:
        refused = api.post(path, json=body, headers=headers)
        assert refused.status_code == 422 and refused.json()["field"] == field, refused.json()
    assert rows_in(repo, "tasks") == stored
    assert api.post("/v1/schedules/999/backfill", json=window, headers=headers).status_code == 404


def test_audit_over_the_api_reports_the_window(api):
    headers = {"Authorization": f"Bearer {api.token}"}
    schedule = api.post(
        "/v1/schedules", json={"script": "hello.sh", "cron": "* * * * *"}, headers=headers
    ).json()
    audit = api.get(f"/v1/schedules/{schedule['schedule_id']}/audit", headers=headers).json()
    assert audit["expected"] == 0 and audit["findings"] == []  # it did not exist before
    bad = api.get(
        f"/v1/schedules/{schedule['schedule_id']}/audit",
        params={"from": "2026-12-03T10:00:00Z", "to": "2026-12-03T09:00:00Z"},
        headers=headers,
    )
    assert bad.status_code == 422
