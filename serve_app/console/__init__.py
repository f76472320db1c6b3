"""The web console at /ui: server-rendered pages over the same Service the
API calls, so a page shows only what the API would show its viewer.

Sign-in exchanges an API token for an HttpOnly, SameSite=Strict session
cookie; every form carries the session's CSRF token; the Content-Security-
Policy allows scripts and styles from /ui/static only. Every asset ships in
this package: nothing is fetched from elsewhere at run time."""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from starlette.datastructures import FormData

from scheduling.cron import zone_of
from scheduling.errors import (
    ChronorayError,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthorized,
)
from scheduling.models import Interpreter, TaskStatus
from scheduling.schedules import MisfirePolicy, OverlapPolicy
from serve_app.console.charts import Line, line_chart
from serve_app.errors import status_for
from serve_app.limits import WriteTracker
from service.auth import Viewer
from service.core import DEFAULT_LATE_S, Service
from service.requests import BackfillIn, ScheduleIn, SchedulePatch, TaskIn, TokenIn, UserIn

PREFIX = "/ui"
HERE = Path(__file__).parent
SESSION_COOKIE = "cr_session"
LOGIN_COOKIE = "cr_login"  # the sign-in form's CSRF token (double submit)
FRAGMENT_HEADER = "x-console-fragment"  # set by console.js: answer 401, not a redirect
PAGE_SIZE = 50
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
FLASH = {  # ?done=<key> after a form: fixed texts, no user text in URLs
    "cancelled": "Task cancelled.",
    "retried": "Dead task sent again.",
    "paused": "Schedule paused.",
    "resumed": "Schedule resumed.",
    "triggered": "Occurrence triggered.",
    "changed": "Schedule changed.",
    "uploaded": "Script stored.",
    "created": "Created.",
}

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True
)


class TimedRoute(APIRoute):
    """Answers carry ``Server-Timing: page;dur=<ms>``: the server's own time
    for the page, which bench/console.py reads."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def timed(request: Request) -> Response:
            started = time.perf_counter()
            response = await handler(request)
            took_ms = (time.perf_counter() - started) * 1000
            response.headers["Server-Timing"] = f"page;dur={took_ms:.1f}"
            return response

        return timed


router = APIRouter(prefix=PREFIX, include_in_schema=False, route_class=TimedRoute)


# -- helpers the templates use --------------------------------------------------
def when(value: datetime | None, zone: str = "UTC") -> str:
    if value is None:
        return "—"
    return value.astimezone(zone_of(zone)).strftime("%Y-%m-%d %H:%M:%S %Z")


def ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "—"
    seconds = (now - value).total_seconds()
    later = seconds < 0
    seconds = abs(seconds)
    text = (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )
    return f"in {text}" if later else f"{text} ago"


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f} ms"


templates.filters.update(when=when, ms=ms)
templates.globals.update(timedelta_hour=timedelta(hours=1))


def render(
    request: Request, name: str, status: int = 200, viewer: Viewer | None = None, **context: Any
) -> HTMLResponse:
    now = datetime.now(timezone.utc)
    body = templates.get_template(name).render(
        request=request,
        viewer=viewer,
        csrf=viewer.csrf_token if viewer else "",
        now=now,
        ago=lambda v: ago(v, now),
        flash=FLASH.get(request.query_params.get("done", "")),
        statuses=[s.value for s in TaskStatus],
        **context,
    )
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


def go(path: str, **query: Any) -> RedirectResponse:
    """After a form: see the result with GET (303), never resubmit."""
    suffix = f"?{urlencode(query)}" if query else ""
    return RedirectResponse(PREFIX + path + suffix, status_code=303, headers=SECURITY_HEADERS)


def service_of(request: Request) -> Service:
    return request.app.state.service


async def viewer_of(request: Request) -> Viewer:
    """Who the session speaks for, under the API's own per-user rate limit
    and read-your-writes tracking (a form's redirect reads what it wrote)."""
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        raise Unauthorized("sign in", "session")
    viewer = await service_of(request).viewer(session_id)
    if viewer.caller.user_id is not None:
        request.app.state.limiter.take(viewer.caller.user_id)
        request.scope[WriteTracker.OWNER_KEY] = viewer.caller.user_id
    return viewer


async def checked_form(request: Request, viewer: Viewer) -> FormData:
    """The posted form (text fields and files), after the CSRF check."""
    form = await request.form()
    sent = form.get("csrf")
    if not isinstance(sent, str) or not hmac.compare_digest(sent, viewer.csrf_token):
        raise Forbidden("the form's CSRF token does not match this session; reload the page")
    return form


async def form_of(request: Request, viewer: Viewer) -> dict[str, str]:
    """The posted text fields, after the CSRF check."""
    form = await checked_form(request, viewer)
    return {k: v for k, v in form.items() if isinstance(v, str)}


def number(fields: dict[str, str], name: str, kind: type, default: Any = None) -> Any:
    text = fields.get(name, "").strip()
    if not text:
        return default
    try:
        return kind(text)
    except ValueError:
        raise InvalidInput(f"{name} must be a number", name) from None


def variables_of(text: str) -> dict[str, str]:
    """NAME=value, one a line."""
    found = {}
    for line in text.splitlines():
        if line.strip():
            name, sep, value = line.partition("=")
            if not sep:
                raise InvalidInput(f"write each variable as NAME=value: {line[:40]!r}", "variables")
            found[name.strip()] = value
    return found


# -- errors -----------------------------------------------------------------
def error_page(request: Request, error: Exception) -> Response:
    """A console request's error: sign-in for 401, the not-found page for
    another user's object, else the message."""
    if isinstance(error, RequestValidationError):
        error = InvalidInput("a value in the address is not valid", "path")
    assert isinstance(error, ChronorayError)
    if isinstance(error, Unauthorized):
        if request.headers.get(FRAGMENT_HEADER):
            return Response(status_code=401, headers=SECURITY_HEADERS)
        response = go("/login")
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response
    if isinstance(error, NotFound):
        return render(request, "not_found.html", 404)
    return render(request, "error.html", status_for(error), error=error)


def install(api: FastAPI) -> None:
    api.state.console_errors = error_page
    api.include_router(router)
    api.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="console-static")


# -- sign-in ------------------------------------------------------------------
def login_form(request: Request, status: int = 200, error: str | None = None) -> Response:
    """The sign-in page with a fresh form token (double-submitted: cookie and field)."""
    check = secrets.token_urlsafe(24)
    response = render(request, "login.html", status, error=error, login_check=check)
    response.set_cookie(
        LOGIN_COOKIE, check, httponly=True, samesite="strict", path=PREFIX, max_age=3600
    )
    return response


@router.get("/login")
async def login_page(request: Request) -> Response:
    return login_form(request)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    token, check = form.get("token"), form.get("login_check")
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not (isinstance(check, str) and cookie and hmac.compare_digest(check, cookie)):
        return login_form(request, 403, "The form expired; try again.")
    if not isinstance(token, str) or not token.strip():
        return login_form(request, 422, "Paste your API token.")
    try:
        session_id, viewer = await service_of(request).sign_in(token.strip())
    except Unauthorized:
        return login_form(request, 401, "Unknown or revoked token.")
    response = go("/users" if viewer.caller.admin else "/")
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=PREFIX,
        max_age=int(service_of(request).settings.console_session_s),
    )
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    viewer = await viewer_of(request)
    await form_of(request, viewer)
    await service_of(request).sign_out(viewer)
    response = go("/login")
    response.delete_cookie(SESSION_COOKIE, path=PREFIX)
    return response


# -- overview -------------------------------------------------------------------
def overview_context(overview: Any, pool: dict[str, Any] | None) -> dict[str, Any]:
    labels = [b.start.strftime("%H:%M") for b in overview.series]
    chart = line_chart(
        "fire lag over the last hour",
        labels,
        [
            Line("p50", "#2563eb", [b.p50_ms for b in overview.series]),
            Line("p99", "#dc2626", [b.p99_ms for b in overview.series]),
        ],
        " ms",
    )
    running: dict[str, int] = {}
    for executor in (pool or {}).get("executors", []):
        tier = executor.get("tier", "")
        running[tier] = running.get(tier, 0) + (executor.get("running") or 0)
    return {"overview": overview, "chart": chart, "running_by_tier": running, "pool": pool}


async def _pool_or_none(service: Service) -> dict[str, Any] | None:
    try:
        return await service.list_executors()
    except ChronorayError:
        return None  # shown as unavailable; the rest of the page still answers


async def _overview(request: Request, viewer: Viewer, template: str) -> Response:
    service = service_of(request)
    owner = viewer.caller.require_user()
    context = overview_context(await service.overview(owner), await _pool_or_none(service))
    return render(request, template, viewer=viewer, **context)


@router.get("/")
async def overview_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    if viewer.caller.admin:
        return go("/users")
    return await _overview(request, viewer, "overview.html")


@router.get("/fragments/overview")
async def overview_fragment(request: Request) -> Response:
    """What the overview polls: the page without its frame."""
    return await _overview(request, await viewer_of(request), "_overview.html")


# -- tasks ----------------------------------------------------------------------
@router.get("/tasks")
async def tasks_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    owner = viewer.caller.require_user()
    q = request.query_params
    status = [s for s in q.getlist("status") if s]
    schedule = q.get("schedule_id") or None
    filters = {
        "status": status,
        "script": q.get("script") or None,
        "schedule_id": int(schedule) if schedule and schedule.isdigit() else None,
    }
    page, next_cursor = await service_of(request).list_tasks(
        owner, **filters, limit=PAGE_SIZE, cursor=q.get("cursor") or None
    )
    next_query = None
    if next_cursor:
        kept = [("status", s) for s in status] + [
            (k, q[k]) for k in ("script", "schedule_id") if q.get(k)
        ]
        next_query = urlencode([*kept, ("cursor", next_cursor)])
    return render(
        request,
        "tasks.html",
        viewer=viewer,
        tasks=page,
        filters=filters,
        next_query=next_query,
        scripts=await service_of(request).list_scripts(owner),
    )


@router.post("/tasks")
async def submit_task(request: Request) -> Response:
    viewer = await viewer_of(request)
    owner = viewer.caller.require_user()
    fields = await form_of(request, viewer)
    at = fields.get("execute_at", "").strip() or datetime.now(timezone.utc).isoformat()
    body = TaskIn.parse(
        {
            "script": fields.get("script", ""),
            "execute_at": at,
            "variables": variables_of(fields.get("variables", "")),
            "priority": number(fields, "priority", int, 0),
            "max_attempts": number(fields, "max_attempts", int, 3),
            "timeout_s": number(fields, "timeout_s", float),
        }
    )
    result = await service_of(request).submit_task(owner, body)
    return go(f"/tasks/{result.task.task_id}", done="created")


async def _task(request: Request, task_id: int, template: str) -> Response:
    viewer = await viewer_of(request)
    view = await service_of(request).get_task(viewer.caller.require_user(), task_id)
    return render(request, template, viewer=viewer, task=view.task, runs=view.runs)


@router.get("/tasks/{task_id}")
async def task_page(request: Request, task_id: int) -> Response:
    return await _task(request, task_id, "task.html")


@router.get("/fragments/tasks/{task_id}")
async def task_fragment(request: Request, task_id: int) -> Response:
    """What a task's page polls: its facts and runs."""
    return await _task(request, task_id, "_task.html")


@router.post("/tasks/{task_id}/cancel")
async def cancel_task(request: Request, task_id: int) -> Response:
    viewer = await viewer_of(request)
    await form_of(request, viewer)
    await service_of(request).cancel_task(viewer.caller.require_user(), task_id)
    return go(f"/tasks/{task_id}", done="cancelled")


@router.post("/tasks/{task_id}/retry")
async def retry_task(request: Request, task_id: int) -> Response:
    viewer = await viewer_of(request)
    fields = await form_of(request, viewer)
    attempts = number(fields, "attempts", int, 1)
    await service_of(request).retry_task(viewer.caller.require_user(), task_id, attempts)
    return go(f"/tasks/{task_id}", done="retried")


@router.get("/dead")
async def dead_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    dead = await service_of(request).list_dead(viewer.caller.require_user(), PAGE_SIZE * 2)
    return render(request, "dead.html", viewer=viewer, tasks=dead)


# -- schedules --------------------------------------------------------------------
@router.get("/schedules")
async def schedules_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    owner = viewer.caller.require_user()
    service = service_of(request)
    every = await service.list_schedules(owner)
    offset = max(0, number(dict(request.query_params), "offset", int, 0))
    shown = every[offset : offset + PAGE_SIZE]
    now = datetime.now(timezone.utc)
    audits = await service.audit_schedules(
        owner, shown, start=now - timedelta(hours=1), end=now, late_after_s=DEFAULT_LATE_S
    )
    return render(
        request,
        "schedules.html",
        viewer=viewer,
        schedules=shown,
        audits=audits,
        total=len(every),
        offset=offset,
        page_size=PAGE_SIZE,
    )


@router.get("/schedules/new")
async def new_schedule_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    scripts = await service_of(request).list_scripts(viewer.caller.require_user())
    return render(
        request, "schedule_new.html", viewer=viewer, scripts=scripts, **_policies(), form={}
    )


def _policies() -> dict[str, Any]:
    return {
        "misfire_policies": [p.value for p in MisfirePolicy],
        "overlap_policies": [p.value for p in OverlapPolicy],
    }


@router.get("/fragments/cron-preview")
async def cron_preview(request: Request) -> Response:
    viewer = await viewer_of(request)
    q = request.query_params
    cron, zone = q.get("cron", ""), q.get("timezone", "") or "UTC"
    try:
        fires = await service_of(request).preview_expression(cron, zone, 5)
        error = None
    except InvalidInput as exc:
        fires, error = [], exc
    return render(
        request, "_preview.html", viewer=viewer, fires=fires, zone=zone, error=error, cron=cron
    )


@router.post("/schedules")
async def create_schedule(request: Request) -> Response:
    viewer = await viewer_of(request)
    owner = viewer.caller.require_user()
    fields = await form_of(request, viewer)
    try:
        body = ScheduleIn.parse(
            {
                "script": fields.get("script", ""),
                "cron": fields.get("cron", ""),
                "timezone": fields.get("timezone", "").strip() or "UTC",
                "variables": variables_of(fields.get("variables", "")),
                "misfire_policy": fields.get("misfire_policy") or "fire_once",
                "overlap_policy": fields.get("overlap_policy") or "skip",
                "priority": number(fields, "priority", int, 0),
            }
        )
        schedule = await service_of(request).create_schedule(owner, body)
    except InvalidInput as exc:
        scripts = await service_of(request).list_scripts(owner)
        return render(
            request,
            "schedule_new.html",
            422,
            viewer=viewer,
            scripts=scripts,
            error=exc,
            form=fields,
            **_policies(),
        )
    return go(f"/schedules/{schedule.schedule_id}", done="created")


@router.get("/schedules/{schedule_id}")
async def schedule_page(request: Request, schedule_id: int) -> Response:
    viewer = await viewer_of(request)
    owner = viewer.caller.require_user()
    service = service_of(request)
    schedule, fires = await service.preview_schedule(owner, schedule_id, 10)
    history = await service.schedule_history(owner, schedule_id, 60)
    _, audit, since, until = await service.audit_schedule(owner, schedule_id)
    occurrences = []  # newest first: (entry, its first start, that start's lag in ms)
    for entry in history:
        starts = [r.started_at for r in entry["runs"] if r.started_at is not None]
        first = min(starts, default=None)
        lag_ms = None if first is None else (first - entry["nominal_at"]).total_seconds() * 1000
        occurrences.append((entry, first, lag_ms))
    timeline = list(reversed(occurrences))
    chart = line_chart(
        "lag of each occurrence: its first start after its nominal time",
        [entry["nominal_at"].strftime("%H:%M") for entry, _, _ in timeline],
        [Line("lag", "#2563eb", [lag_ms for _, _, lag_ms in timeline])],
        " ms",
    )
    return render(
        request,
        "schedule.html",
        viewer=viewer,
        schedule=schedule,
        fires=fires,
        occurrences=occurrences,
        chart=chart,
        audit=audit,
        audit_from=since,
        audit_to=until,
        backfill=request.query_params.get("backfilled"),
        backfill_existing=request.query_params.get("existing"),
        **_policies(),
    )


@router.post("/schedules/{schedule_id}/{action}")
async def schedule_action(request: Request, schedule_id: int, action: str) -> Response:
    viewer = await viewer_of(request)
    owner = viewer.caller.require_user()
    fields = await form_of(request, viewer)
    service = service_of(request)
    if action in ("pause", "resume"):
        patch = SchedulePatch.parse({"paused": action == "pause"})
        await service.change_schedule(owner, schedule_id, patch)
        return go(f"/schedules/{schedule_id}", done=f"{action}d")
    if action == "trigger":
        task_id, _ = await service.trigger_schedule(owner, schedule_id)
        return go(f"/tasks/{task_id}", done="triggered")
    if action == "delete":
        await service.delete_schedule(owner, schedule_id)
        return go("/schedules")
    if action == "edit":
        changes: dict[str, Any] = {
            k: fields[k].strip()
            for k in ("cron", "timezone", "misfire_policy", "overlap_policy")
            if fields.get(k, "").strip()
        }
        if fields.get("priority", "").strip():
            changes["priority"] = number(fields, "priority", int)
        await service.change_schedule(owner, schedule_id, SchedulePatch.parse(changes))
        return go(f"/schedules/{schedule_id}", done="changed")
    if action == "backfill":
        body = BackfillIn.parse(
            {
                "from": fields.get("from", "").strip(),
                "to": fields.get("to", "").strip(),
                "overlap_policy": fields.get("overlap_policy") or "allow",
            }
        )
        result = await service.backfill_schedule(owner, schedule_id, body)
        return go(
            f"/schedules/{schedule_id}",
            backfilled=len(result.created),
            existing=len(result.fires) - len(result.created),
        )
    raise NotFound(f"no action {action!r}")


@router.get("/schedules/{schedule_id}/audit")
async def audit_page(request: Request, schedule_id: int) -> Response:
    viewer = await viewer_of(request)
    q = request.query_params
    late = number(dict(q), "late_after_s", float, DEFAULT_LATE_S)
    schedule, audit, since, until = await service_of(request).audit_schedule(
        viewer.caller.require_user(),
        schedule_id,
        start=q.get("from") or None,
        end=q.get("to") or None,
        late_after_s=late,
    )
    return render(
        request,
        "audit.html",
        viewer=viewer,
        schedule=schedule,
        audit=audit,
        since=since,
        until=until,
        late_after_s=late,
    )


# -- scripts ------------------------------------------------------------------------
@router.get("/scripts")
async def scripts_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    scripts = await service_of(request).list_scripts(viewer.caller.require_user())
    return render(
        request,
        "scripts.html",
        viewer=viewer,
        scripts=scripts,
        interpreters=[i.value for i in Interpreter],
    )


@router.post("/scripts")
async def upload_script(request: Request) -> Response:
    viewer = await viewer_of(request)
    owner = viewer.caller.require_user()
    form = await checked_form(request, viewer)
    name = str(form.get("name", "")).strip()
    upload = form.get("file")
    if upload is not None and not isinstance(upload, str) and upload.filename:
        body = await upload.read()
    else:
        body = str(form.get("body", "")).replace("\r\n", "\n").encode()
    interpreter = Interpreter(str(form.get("interpreter") or "bash"))
    script, _ = await service_of(request).upload_script(owner, name, body, interpreter)
    return go(f"/scripts/{script.name}", done="uploaded")


@router.get("/scripts/{name}")
async def script_page(request: Request, name: str) -> Response:
    viewer = await viewer_of(request)
    owner = viewer.caller.require_user()
    service = service_of(request)
    version = number(dict(request.query_params), "version", int)
    script = await service.get_script(owner, name, version)
    body = await service.script_body(owner, name, script.version)
    return render(
        request,
        "script.html",
        viewer=viewer,
        script=script,
        versions=await service.script_versions(owner, name),
        body=body.decode("utf-8", "replace"),
    )


# -- executors and users --------------------------------------------------------
@router.get("/executors")
async def executors_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    service = service_of(request)
    pool = await _pool_or_none(service)
    try:
        mirror, mirror_error = await service.mirror_view(), None
    except ChronorayError as exc:
        mirror, mirror_error = None, exc.detail
    now_s = datetime.now(timezone.utc).timestamp()
    return render(
        request,
        "executors.html",
        viewer=viewer,
        pool=pool,
        mirror=mirror,
        mirror_error=mirror_error,
        configured=bool(service.settings.zookeeper_hosts),
        now_s=now_s,
    )


@router.get("/users")
async def users_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    viewer.caller.require_admin()
    users = await service_of(request).list_users()
    return render(request, "users.html", viewer=viewer, users=users, issued=None)


@router.post("/users")
async def create_user(request: Request) -> Response:
    viewer = await viewer_of(request)
    viewer.caller.require_admin()
    fields = await form_of(request, viewer)
    body = UserIn.parse(
        {"first_name": fields.get("first_name", ""), "last_name": fields.get("last_name", "")}
    )
    await service_of(request).create_user(body)
    return go("/users", done="created")


@router.post("/users/{user_id}/tokens")
async def issue_token(request: Request, user_id: int) -> Response:
    """The token is shown once, in this answer (not a redirect: it must
    not land in a URL or the history)."""
    viewer = await viewer_of(request)
    viewer.caller.require_admin()
    fields = await form_of(request, viewer)
    service = service_of(request)
    record, token = await service.issue_token(
        user_id, TokenIn.parse({"label": fields.get("label", "")})
    )
    users = await service.list_users()
    return render(request, "users.html", viewer=viewer, users=users, issued=(record, token))
