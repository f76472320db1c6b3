"""The ``chronoray`` command. ``up`` runs the scheduler; the other commands
talk to its HTTP API."""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="chronoray: a distributed task scheduler on Ray.", no_args_is_help=True)
tasks_app = typer.Typer(help="List, show, cancel and retry tasks.", no_args_is_help=True)
scripts_app = typer.Typer(help="Upload, list, show and delete scripts.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(scripts_app, name="scripts")
schedules_app = typer.Typer(help="CRON schedules.", no_args_is_help=True)
app.add_typer(schedules_app, name="schedules")
runs_app = typer.Typer(help="A task's attempts and their output.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
users_app = typer.Typer(
    help="Users and API tokens (CHRONORAY_ADMIN_TOKEN; `me` takes a user's token).",
    no_args_is_help=True,
)
app.add_typer(users_app, name="users")
console = Console()
err = Console(stderr=True)

URL_OPTION = typer.Option(
    "http://127.0.0.1:8000", "--url", envvar="CHRONORAY_URL", help="API base URL"
)
RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
RUN_COLUMNS = {
    "attempt": "attempt",
    "status": "status",
    "tier": "tier",
    "executor": "executor_id",
    "exit": "exit_code",
    "lag ms": "fire_lag_ms",
}


@app.command()
def up(
    port: int = typer.Option(None, help="HTTP port (default 8000, or CHRONORAY_HTTP_PORT)"),
    address: str | None = typer.Option(None, help="join this Ray cluster instead of starting one"),
    data_dir: Path | None = typer.Option(None, help="where the embedded SQLite database lives"),
    grace_s: float = typer.Option(
        60.0, "--grace", help="on Ctrl-C or `chronoray down`: how long running scripts may finish"
    ),
) -> None:
    """Start chronoray (and a local Ray unless --address is given); stays in
    the foreground. Ctrl-C (or `chronoray down`) drains it and stops."""
    import os

    import ray

    from chronoray.deploy import deploy, local_token, start_local_ray
    from chronoray.settings import Settings, local_token_file, up_state_file

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings.from_env(data_dir=data_dir)
    if port:
        settings = settings.with_(http_port=port)
    err.print(f"database: {settings.database_url}")
    if address:
        ray.init(address=address, namespace=settings.namespace, log_to_driver=False)
    else:
        err.print("starting a local Ray …")
        start_local_ray(settings)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    state_file = up_state_file(data_dir)
    try:
        with console.status("deploying shards, dispatcher, executors and HTTP …"):
            url = deploy(settings)
        token_file = (data_dir / "local-token") if data_dir else local_token_file()
        user_id, token = local_token(settings, token_file)
        state_file.write_text(json.dumps({"pid": os.getpid()}))
        console.print(f"local user {user_id}; its API token is kept in {token_file}")
        console.print(f"export CHRONORAY_TOKEN={token}", soft_wrap=True, highlight=False)
        console.print(f"chronoray is up at [bold]{url}[/bold]  (Ctrl-C stops it)")
        stop.wait()
    finally:
        try:
            _drain(settings, grace_s)
        finally:
            state_file.unlink(missing_ok=True)
            ray.shutdown()


def _drain(settings, grace_s: float) -> None:
    """Drain and stop, showing how many attempts are still running."""
    from chronoray.deploy import drain_and_stop

    with console.status("draining: no new work; waiting for running scripts …") as shown:
        held = drain_and_stop(
            settings,
            grace_s=grace_s,
            progress=lambda n: shown.update(f"draining: {n} attempts still running …"),
        )
    if held == 0:
        err.print("stopped: every running script finished and its result is stored")
    elif held > 0:
        err.print(
            f"[yellow]stopped after {grace_s:.0f} s with {held} attempts still running: "
            "the next `chronoray up` retries them (executor_lost)[/yellow]"
        )
    else:
        err.print("[yellow]stopped; the dispatcher did not answer the last drain[/yellow]")


@app.command()
def down(
    address: str | None = typer.Option(
        None, help="drain the chronoray on this Ray cluster directly (when no `up` runs)"
    ),
    data_dir: Path | None = typer.Option(None, help="the data dir `chronoray up` was given"),
    grace_s: float = typer.Option(60.0, "--grace", help="how long running scripts may finish"),
) -> None:
    """Stop chronoray gracefully: take no more work, let running scripts
    finish and their results be stored, then stop. Queued and future tasks
    stay in the database for the next `chronoray up`."""
    import os

    from chronoray.settings import Settings, up_state_file

    state_file = up_state_file(data_dir)
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    if address is None:
        if state is None or not _alive(state["pid"]):
            err.print(
                f"[red]no running `chronoray up` recorded in {state_file}; pass --address[/red]"
            )
            raise typer.Exit(1)
        # `up` owns the cluster it started: it drains and stops on SIGTERM.
        os.kill(state["pid"], signal.SIGTERM)
        started = time.monotonic()
        with console.status("") as shown:
            while _alive(state["pid"]):
                shown.update(
                    f"chronoray up (pid {state['pid']}) is draining … "
                    f"{time.monotonic() - started:.0f} s"
                )
                time.sleep(0.5)
        err.print(f"stopped in {time.monotonic() - started:.1f} s")
        return
    import ray

    settings = Settings.from_env(data_dir=data_dir)
    ray.init(address=address, namespace=settings.namespace, log_to_driver=False)
    try:
        _drain(settings, grace_s)
    finally:
        ray.shutdown()


def _alive(pid: int) -> bool:
    """Running, and not a zombie its parent has yet to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parse_when(value: str) -> str | float:
    """``+5s`` / ``+2m`` relative to now, epoch seconds, or ISO 8601."""
    match = RELATIVE.match(value)
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        seconds = amount * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
        return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()
    try:
        return float(value)
    except ValueError:
        return value


def _token(admin: bool = False) -> str | None:
    """A user's token: CHRONORAY_TOKEN, else the one ``chronoray up`` keeps
    for the local user. The admin token: CHRONORAY_ADMIN_TOKEN."""
    import os

    from chronoray.settings import local_token_file

    if admin:
        return os.environ.get("CHRONORAY_ADMIN_TOKEN")
    if os.environ.get("CHRONORAY_TOKEN"):
        return os.environ["CHRONORAY_TOKEN"]
    kept = local_token_file()
    return kept.read_text().strip() if kept.exists() else None


def _call(method: str, url: str, *, admin: bool = False, raw: bool = False, **kwargs):
    """One API call; an error answer is printed (status, code, field,
    detail) and ends the command with exit code 1. ``raw``: the body as
    bytes instead of JSON."""
    token = _token(admin)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kwargs.pop("headers", {}))
    try:
        response = httpx.request(method, url, timeout=60, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        err.print(f"[red]cannot reach chronoray at {url}: {exc}[/red]")
        raise typer.Exit(2) from None
    if raw and not response.is_error:
        return response.content
    try:
        body = response.json()
    except ValueError:
        body = {"error": "not_json", "detail": response.text[:200]}
    if response.is_error:
        field = f" ({body.get('field')})" if body.get("field") else ""
        err.print(
            f"[red]{response.status_code} {body.get('error')}{field}: {body.get('detail')}[/red]"
        )
        raise typer.Exit(1)
    return body


@scripts_app.command("add")
def scripts_add(
    name: str,
    file: Path = typer.Argument(..., exists=True, dir_okay=False),
    interpreter: str = typer.Option("bash", help="python, bash or sh"),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Upload (or version) a script from a file; the same content again is
    the same version."""
    body = _call(
        "PUT",
        f"{url}/v1/scripts/{name}",
        params={"interpreter": interpreter},
        content=file.read_bytes(),
        headers={"content-type": "application/octet-stream"},
    )
    _print(body, as_json, f"script {body['name']} v{body['version']} ({body['sha256'][:12]})")


def _scripts_table(found: list[dict]) -> Table:
    return _table(
        found,
        {
            "name": "name",
            "version": "version",
            "interpreter": "interpreter",
            "bytes": "size_bytes",
            "sha256": lambda s: s["sha256"][:12],
            "created": "created_at",
        },
    )


@scripts_app.command("list")
def scripts_list(url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")) -> None:
    """Your scripts, the newest version of each."""
    body = _call("GET", f"{url}/v1/scripts")
    _print(body, as_json, _scripts_table(body["scripts"]))


@scripts_app.command("versions")
def scripts_versions(
    name: str, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    """Every version of a script, newest first, with its content hash."""
    body = _call("GET", f"{url}/v1/scripts/{name}/versions")
    _print(body, as_json, _scripts_table(body["versions"]))


@scripts_app.command("show")
def scripts_show(
    name: str,
    version: int | None = typer.Option(None, help="an older version"),
    body_only: bool = typer.Option(False, "--body", help="print the script itself"),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A script's newest (or given) version; --body prints its content."""
    params = {"version": version} if version else {}
    if body_only:
        content = _call("GET", f"{url}/v1/scripts/{name}/body", params=params, raw=True)
        if as_json:
            console.print_json(json.dumps({"name": name, "body": content.decode(errors="replace")}))
        else:
            typer.echo(content.decode(errors="replace"), nl=False)
        return
    body = _call("GET", f"{url}/v1/scripts/{name}", params=params)
    _print(body, as_json, _scripts_table([body]))


@scripts_app.command("delete")
def scripts_delete(
    name: str, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    """Delete every version of a script no pending task or schedule uses."""
    body = _call("DELETE", f"{url}/v1/scripts/{name}")
    _print(body, as_json, f"script {name}: {body['deleted_versions']} versions deleted")


@app.command()
def submit(
    script: str = typer.Argument(None, help="a registered script (or use --file)"),
    at: str = typer.Option(
        "+0s", "--at", help="ISO 8601 with offset, epoch seconds, or +5s/+2m/+1h"
    ),
    var: list[str] = typer.Option([], "--var", help="NAME=value, repeatable"),
    priority: int = typer.Option(0),
    max_attempts: int = typer.Option(3),
    timeout_s: float | None = typer.Option(None),
    idempotency_key: str | None = typer.Option(None),
    file: Path | None = typer.Option(
        None,
        "--file",
        exists=True,
        dir_okay=False,
        help="JSON Lines: one task per line, each with the fields of POST /v1/tasks",
    ),
    batch_size: int = typer.Option(500, help="tasks per POST /v1/tasks:batch with --file"),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Schedule a registered script to run once, or every task of a JSON
    Lines file (--file) in all-or-nothing batches, with a progress bar."""
    if file is not None:
        if script:
            err.print("[red]give a script or --file, not both[/red]")
            raise typer.Exit(2)
        _submit_file(file, batch_size=batch_size, url=url, as_json=as_json)
        return
    if not script:
        err.print("[red]give a script, or --file tasks.jsonl[/red]")
        raise typer.Exit(2)
    variables = _variables(var)
    request = {
        "script": script,
        "execute_at": parse_when(at),
        "variables": variables,
        "priority": priority,
        "max_attempts": max_attempts,
    }
    if timeout_s is not None:
        request["timeout_s"] = timeout_s
    if idempotency_key:
        request["idempotency_key"] = idempotency_key
    body = _call("POST", f"{url}/v1/tasks", json=request)
    _print(body, as_json, f"task {body['task_id']} {body['status']} at {body['execute_at']}")


def read_jsonl(file: Path) -> list[dict]:
    """Every task of the file, or exit naming the first bad line."""
    tasks = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except ValueError as exc:
            err.print(f"[red]{file}:{number}: not JSON: {exc}[/red]")
            raise typer.Exit(2) from None
        if not isinstance(task, dict):
            err.print(f"[red]{file}:{number}: expected an object with the task's fields[/red]")
            raise typer.Exit(2)
        if isinstance(task.get("execute_at"), str) and RELATIVE.match(task["execute_at"]):
            task["execute_at"] = parse_when(task["execute_at"])
        tasks.append({"line": number, "task": task})
    return tasks


def _submit_file(file: Path, *, batch_size: int, url: str, as_json: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    if not 1 <= batch_size <= 1000:
        err.print("[red]--batch-size must be between 1 and 1000[/red]")
        raise typer.Exit(2)
    entries = read_jsonl(file)
    token = _token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    submitted, created, task_ids = 0, 0, []
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with (
        httpx.Client(base_url=url, headers=headers, timeout=120) as session,
        Progress(*columns, console=err, disable=as_json) as progress,
    ):
        bar = progress.add_task(f"submitting {file.name}", total=len(entries))
        for start in range(0, len(entries), batch_size):
            chunk = entries[start : start + batch_size]
            try:
                response = session.post(
                    "/v1/tasks:batch", json={"tasks": [e["task"] for e in chunk]}
                )
            except httpx.HTTPError as exc:
                err.print(f"[red]cannot reach chronoray at {url}: {exc}[/red]")
                raise typer.Exit(2) from None
            if response.is_error:
                _report_batch_error(file, chunk, response, submitted)
                raise typer.Exit(1)
            body = response.json()
            submitted += len(chunk)
            created += body["created"]
            task_ids += [t["task_id"] for t in body["tasks"]]
            progress.advance(bar, len(chunk))
    summary = {"submitted": submitted, "created": created, "task_ids": task_ids}
    _print(summary, as_json, f"{submitted} tasks submitted ({created} new) from {file}")


def _report_batch_error(file: Path, chunk: list[dict], response, submitted: int) -> None:
    """Name the file's line: the batch's error field says tasks[i]."""
    try:
        body = response.json()
    except ValueError:
        body = {"error": "not_json", "detail": response.text[:200]}
    where = ""
    match = re.match(r"tasks\[(\d+)\]", body.get("field") or "")
    if match and int(match.group(1)) < len(chunk):
        where = f"{file}:{chunk[int(match.group(1))]['line']}: "
    err.print(
        f"[red]{where}{response.status_code} {body.get('error')} ({body.get('field')}): "
        f"{body.get('detail')}[/red]"
    )
    err.print(f"{submitted} tasks before this batch were submitted; this batch stored nothing")


@tasks_app.command("show")
def tasks_show(
    task_id: int, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    """A task with its runs."""
    body = _call("GET", f"{url}/v1/tasks/{task_id}")
    line = (
        f"task {body['task_id']}  [bold]{body['status']}[/bold]  script {body['script']}  "
        f"due {body['execute_at']}  priority {body['priority']}  attempt {body['attempt']}/{body['max_attempts']}"
    )
    columns = {**RUN_COLUMNS, "output": lambda r: (r["output"] or "").strip()[-60:]}
    _print(body, as_json, line, _table(body.get("runs", []), columns))


def _tasks_table(tasks: list[dict]) -> Table:
    return _table(
        tasks,
        {
            "id": "task_id",
            "script": "script",
            "status": "status",
            "due": "execute_at",
            "priority": "priority",
            "attempts": lambda t: f"{t['attempt']}/{t['max_attempts']}",
            "updated": "updated_at",
        },
    )


@tasks_app.command("list")
def tasks_list(
    status: list[str] = typer.Option([], "--status", help="repeatable: scheduled, dead, …"),
    script: str = typer.Option(None, "--script"),
    schedule_id: int = typer.Option(None, "--schedule"),
    due_from: str = typer.Option(None, "--from", help="ISO 8601 with offset, or epoch s"),
    due_before: str = typer.Option(None, "--before"),
    limit: int = typer.Option(100, "--limit"),
    cursor: str = typer.Option(None, "--cursor", help="next_cursor of the previous page"),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Your tasks, newest first, one page at a time."""
    params = {
        "status": status,
        "script": script,
        "schedule_id": schedule_id,
        "due_from": due_from,
        "due_before": due_before,
        "limit": limit,
        "cursor": cursor,
    }
    body = _call(
        "GET", f"{url}/v1/tasks", params={k: v for k, v in params.items() if v not in (None, [])}
    )
    more = [f"more: --cursor {body['next_cursor']}"] if body["next_cursor"] else []
    _print(body, as_json, _tasks_table(body["tasks"]), *more)


@tasks_app.command("dead")
def tasks_dead(url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")) -> None:
    """Tasks that used up their attempts."""
    body = _call("GET", f"{url}/v1/dead")
    _print(body, as_json, _tasks_table(body["tasks"]))


@tasks_app.command("retry")
def tasks_retry(
    task_id: int,
    attempts: int = typer.Option(1, help="how many more attempts it gets"),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run a dead task again."""
    body = _call("POST", f"{url}/v1/tasks/{task_id}/retry", json={"attempts": attempts})
    _print(body, as_json, f"task {body['task_id']} {body['status']}, attempt {body['attempt']}")


@tasks_app.command("cancel")
def tasks_cancel(
    task_id: int, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    """Cancel a task that has not started (409 once it has)."""
    body = _call("DELETE", f"{url}/v1/tasks/{task_id}")
    _print(body, as_json, f"task {body['task_id']} {body['status']}")


@runs_app.command("list")
def runs_list(
    task_id: int, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    """Every attempt of a task: executor, tier, lag, exit code, failure."""
    body = _call("GET", f"{url}/v1/tasks/{task_id}/runs")
    columns = {**RUN_COLUMNS, "started": "started_at", "failure": "failure"}
    _print(body, as_json, _table(body["runs"], columns))


@runs_app.command("output")
def runs_output(
    task_id: int,
    attempt: int = typer.Argument(1),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The tail of one attempt's output."""
    content = _call("GET", f"{url}/v1/tasks/{task_id}/runs/{attempt}/output", raw=True)
    text = content.decode(errors="replace")
    if as_json:
        console.print_json(json.dumps({"task_id": task_id, "attempt": attempt, "output": text}))
    else:
        typer.echo(text, nl=False)


@users_app.command("create")
def users_create(
    first_name: str,
    last_name: str,
    token: bool = typer.Option(True, help="also issue the user's first token"),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a user (admin), and by default a token for them."""
    user = _call(
        "POST",
        f"{url}/v1/users",
        admin=True,
        json={"first_name": first_name, "last_name": last_name},
    )
    if token:
        user["token"] = _call(
            "POST", f"{url}/v1/users/{user['user_id']}/tokens", admin=True, json={}
        )
    line = f"user {user['user_id']} {first_name} {last_name}"
    if token:
        line += f"\ntoken {user['token']['token_id']}: {user['token']['token']}  (shown once)"
    _print(user, as_json, line)


@users_app.command("list")
def users_list(url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every user (admin)."""
    body = _call("GET", f"{url}/v1/users", admin=True)
    columns = {
        "id": "user_id",
        "first name": "first_name",
        "last name": "last_name",
        "created": "created_at",
    }
    _print(body, as_json, _table(body["users"], columns))


@users_app.command("token")
def users_token(
    user_id: int,
    label: str = typer.Option("", help="what the token is for"),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Issue a token for a user (admin); it is shown once."""
    body = _call("POST", f"{url}/v1/users/{user_id}/tokens", admin=True, json={"label": label})
    _print(body, as_json, f"token {body['token_id']}: {body['token']}  (shown once)")


@users_app.command("revoke")
def users_revoke(
    token_id: int, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    """Revoke a token (admin); it stops working at once."""
    body = _call("DELETE", f"{url}/v1/tokens/{token_id}", admin=True)
    _print(body, as_json, f"token {token_id} revoked at {body['revoked_at']}")


@users_app.command("me")
def users_me(url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")) -> None:
    """The user your token belongs to."""
    body = _call("GET", f"{url}/v1/me")
    _print(body, as_json, f"user {body['user_id']} {body['first_name']} {body['last_name']}")


@app.command()
def executors(
    zookeeper: str = typer.Option(
        None,
        "--zookeeper",
        help="read the ZooKeeper mirror at host:port[,host:port] instead of the API",
    ),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Executors as the pool sees them (GET /v1/executors), or as the
    ZooKeeper mirror shows them (--zookeeper)."""
    if not zookeeper:
        _pool_executors(url, as_json)
        return
    from actors.zk_mirror import read_tree

    try:
        tree = read_tree(zookeeper)
    except Exception as exc:
        err.print(f"ZooKeeper at {zookeeper} not reachable: {exc}")
        raise typer.Exit(1) from None
    now = time.time()
    columns = {
        "executor": "executor_id",
        "tier": "tier",
        "node": lambda ex: ex["node"][:12],
        "pid": "pid",
        "slots": "slots",
        "running": "running",
        "heartbeat age s": lambda ex: f"{now - ex['last_heartbeat']:.1f}",
    }
    dispatcher = tree["dispatcher"]
    line = (
        f"dispatcher: queued {dispatcher['queued']}, pid {dispatcher['pid']}"
        if dispatcher
        else "dispatcher: not published"
    )
    _print(tree, as_json, _table(tree["executors"], columns), line)


def _pool_executors(url: str, as_json: bool) -> None:
    body = _call("GET", f"{url}/v1/executors")
    tiers = [{"tier": name, **tier} for name, tier in body["tiers"].items()]
    columns = {
        "tier": "tier",
        "live": "live",
        "starting": "starting",
        "min": "min",
        "max": "max",
        "unplaceable": lambda t: t.get("unplaceable") or "",
    }
    tier_table = _table(tiers, columns)
    columns = {
        "executor": "executor_id",
        "tier": "tier",
        "state": "state",
        "running": "running",
        "heartbeat age s": "heartbeat_age_s",
    }
    _print(body, as_json, tier_table, _table(body["executors"], columns))


def _table(rows: list[dict], columns: dict) -> Table:
    """A rich table: header → a row's key, or a function of the row."""
    table = Table(*columns)
    for row in rows:
        table.add_row(
            *(str(pick(row) if callable(pick) else row.get(pick)) for pick in columns.values())
        )
    return table


def _print(body, as_json: bool, *shown) -> None:
    """The answer as JSON with --json; else what is shown of it (lines, tables)."""
    if as_json:
        console.print_json(json.dumps(body))
        return
    for part in shown:
        console.print(part)


@schedules_app.command("create")
def schedules_create(
    script: str,
    cron: str,
    timezone_name: str = typer.Option("UTC", "--timezone", help="IANA zone, e.g. Europe/Berlin"),
    var: list[str] = typer.Option([], "--var", help="NAME=value, repeatable"),
    misfire: str = typer.Option("fire_once", help="skip, fire_once or fire_all"),
    overlap: str = typer.Option("skip", help="allow, skip, buffer_one or cancel_previous"),
    priority: int = typer.Option(0),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run a script on a CRON expression in a time zone."""
    body = _call(
        "POST",
        f"{url}/v1/schedules",
        json={
            "script": script,
            "cron": cron,
            "timezone": timezone_name,
            "variables": _variables(var),
            "misfire_policy": misfire,
            "overlap_policy": overlap,
            "priority": priority,
        },
    )
    _print(body, as_json, f"schedule {body['schedule_id']}: next fire {body['next_fire_local']}")


@schedules_app.command("list")
def schedules_list(url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")) -> None:
    body = _call("GET", f"{url}/v1/schedules")
    columns = {
        "id": "schedule_id",
        "script": "script",
        "cron": "cron",
        "zone": "timezone",
        "next fire": "next_fire_local",
        "paused": "paused",
        "missed": "missed_fires",
        "skipped": "skipped_fires",
    }
    _print(body, as_json, _table(body["schedules"], columns))


@schedules_app.command("show")
def schedules_show(
    schedule_id: int, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    """One schedule: expression, zone, policies, next fire, counts."""
    body = _call("GET", f"{url}/v1/schedules/{schedule_id}")
    _print(
        body,
        as_json,
        f"schedule {body['schedule_id']}  {body['script']}  '{body['cron']}' {body['timezone']}  "
        f"misfire {body['misfire_policy']}  overlap {body['overlap_policy']}  paused {body['paused']}\n"
        f"next fire {body['next_fire_local']}  missed {body['missed_fires']}  skipped {body['skipped_fires']}",
    )


@schedules_app.command("update")
def schedules_update(
    schedule_id: int,
    cron: str | None = typer.Option(None, help="a new expression"),
    timezone_name: str | None = typer.Option(None, "--timezone"),
    misfire: str | None = typer.Option(None),
    overlap: str | None = typer.Option(None),
    priority: int | None = typer.Option(None),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Change a schedule; its pending occurrence follows the new definition."""
    changes = {
        "cron": cron,
        "timezone": timezone_name,
        "misfire_policy": misfire,
        "overlap_policy": overlap,
        "priority": priority,
    }
    body = _call(
        "PATCH",
        f"{url}/v1/schedules/{schedule_id}",
        json={k: v for k, v in changes.items() if v is not None},
    )
    _print(body, as_json, f"schedule {schedule_id}: next fire {body['next_fire_local']}")


@schedules_app.command("preview")
def schedules_preview(
    schedule_id: int,
    count: int = typer.Option(10),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The next fire times, in UTC and in the schedule's zone."""
    body = _call("GET", f"{url}/v1/schedules/{schedule_id}/preview", params={"count": count})
    _print(body, as_json, "\n".join(f"{f['utc']}  {f['local']}" for f in body["fires"]))


@schedules_app.command("pause")
def schedules_pause(
    schedule_id: int, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    body = _call("PATCH", f"{url}/v1/schedules/{schedule_id}", json={"paused": True})
    _print(body, as_json, f"schedule {schedule_id} paused")


@schedules_app.command("resume")
def schedules_resume(
    schedule_id: int, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    body = _call("PATCH", f"{url}/v1/schedules/{schedule_id}", json={"paused": False})
    _print(body, as_json, f"schedule {schedule_id} resumed: next fire {body['next_fire_local']}")


@schedules_app.command("trigger")
def schedules_trigger(
    schedule_id: int, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    body = _call("POST", f"{url}/v1/schedules/{schedule_id}/trigger")
    _print(body, as_json, f"schedule {schedule_id}: task {body['task_id']} runs now")


@schedules_app.command("delete")
def schedules_delete(
    schedule_id: int, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    body = _call("DELETE", f"{url}/v1/schedules/{schedule_id}")
    _print(body, as_json, f"schedule {schedule_id} deleted")


@schedules_app.command("runs")
def schedules_runs(
    schedule_id: int, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    """Occurrences with nominal time, start, lag and status."""
    body = _call("GET", f"{url}/v1/schedules/{schedule_id}/runs")
    columns = {
        "nominal": "nominal_at",
        "status": "status",
        "attempt": "attempt",
        "started": lambda o: (o["runs"][-1] if o["runs"] else {}).get("started_at"),
        "lag ms": lambda o: (o["runs"][-1] if o["runs"] else {}).get("lag_ms"),
    }
    _print(body, as_json, _table(body["occurrences"], columns))


def _variables(items: list[str]) -> dict[str, str]:
    variables = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            err.print(f"[red]--var {item!r}: expected NAME=value[/red]")
            raise typer.Exit(2)
        variables[name] = value
    return variables


def main() -> None:
    app()


if __name__ == "__main__":
    main()
