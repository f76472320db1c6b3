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
tasks_app = typer.Typer(help="Inspect tasks.", no_args_is_help=True)
scripts_app = typer.Typer(help="Register scripts.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(scripts_app, name="scripts")
schedules_app = typer.Typer(help="CRON schedules.", no_args_is_help=True)
app.add_typer(schedules_app, name="schedules")
console = Console()
err = Console(stderr=True)

URL_OPTION = typer.Option(
    "http://127.0.0.1:8000", "--url", envvar="CHRONORAY_URL", help="API base URL"
)
RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")


@app.command()
def up(
    port: int = typer.Option(None, help="HTTP port (default 8000, or CHRONORAY_HTTP_PORT)"),
    address: str | None = typer.Option(None, help="join this Ray cluster instead of starting one"),
    data_dir: Path | None = typer.Option(None, help="where the embedded SQLite database lives"),
) -> None:
    """Start chronoray (and a local Ray unless --address is given); stays in
    the foreground, Ctrl-C stops it."""
    import ray

    from chronoray.deploy import deploy, local_token, start_local_ray, teardown
    from chronoray.settings import Settings, local_token_file

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
    try:
        with console.status("deploying shards, dispatcher, executors and HTTP …"):
            url = deploy(settings)
        token_file = (data_dir / "local-token") if data_dir else local_token_file()
        user_id, token = local_token(settings, token_file)
        console.print(f"local user {user_id}; its API token is kept in {token_file}")
        console.print(f"export CHRONORAY_TOKEN={token}", soft_wrap=True, highlight=False)
        console.print(f"chronoray is up at [bold]{url}[/bold]  (Ctrl-C stops it)")
        stop.wait()
    finally:
        err.print("stopping …")
        try:
            teardown(settings)
        finally:
            ray.shutdown()


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


def _call(method: str, url: str, *, admin: bool = False, **kwargs) -> dict:
    token = _token(admin)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, url, timeout=30, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        err.print(f"[red]cannot reach chronoray at {url}: {exc}[/red]")
        raise typer.Exit(2) from None
    body = response.json()
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
    """Register (or version) a script from a file."""
    body = _call(
        "POST",
        f"{url}/v1/scripts",
        json={"name": name, "interpreter": interpreter, "body": file.read_text()},
    )
    if as_json:
        console.print_json(json.dumps(body))
    else:
        console.print(f"script {body['name']} v{body['version']} ({body['sha256'][:12]})")


@app.command()
def submit(
    script: str,
    at: str = typer.Option(
        "+0s", "--at", help="ISO 8601 with offset, epoch seconds, or +5s/+2m/+1h"
    ),
    var: list[str] = typer.Option([], "--var", help="NAME=value, repeatable"),
    priority: int = typer.Option(0),
    max_attempts: int = typer.Option(3),
    timeout_s: float | None = typer.Option(None),
    idempotency_key: str | None = typer.Option(None),
    url: str = URL_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Schedule a registered script to run once."""
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
    if as_json:
        console.print_json(json.dumps(body))
    else:
        console.print(f"task {body['task_id']} {body['status']} at {body['execute_at']}")


@tasks_app.command("show")
def tasks_show(
    task_id: int, url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")
) -> None:
    """A task with its runs."""
    body = _call("GET", f"{url}/v1/tasks/{task_id}")
    if as_json:
        console.print_json(json.dumps(body))
        return
    console.print(
        f"task {body['task_id']}  [bold]{body['status']}[/bold]  script {body['script']}  "
        f"due {body['execute_at']}  priority {body['priority']}  attempt {body['attempt']}/{body['max_attempts']}"
    )
    table = Table("attempt", "status", "tier", "executor", "exit", "fire lag ms", "output")
    for run in body.get("runs", []):
        table.add_row(
            str(run["attempt"]),
            run["status"],
            run["tier"],
            run["executor_id"],
            str(run["exit_code"]),
            str(run["fire_lag_ms"]),
            (run["output"] or "").strip()[-60:],
        )
    console.print(table)


def _tasks_table(tasks: list[dict]) -> Table:
    table = Table("id", "script", "status", "due", "priority", "attempts", "updated")
    for task in tasks:
        table.add_row(
            str(task["task_id"]),
            task["script"],
            task["status"],
            task["execute_at"],
            str(task["priority"]),
            f"{task['attempt']}/{task['max_attempts']}",
            task["updated_at"],
        )
    return table


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
    if as_json:
        console.print_json(json.dumps(body))
        return
    console.print(_tasks_table(body["tasks"]))
    if body["next_cursor"]:
        console.print(f"more: --cursor {body['next_cursor']}")


@tasks_app.command("dead")
def tasks_dead(url: str = URL_OPTION, as_json: bool = typer.Option(False, "--json")) -> None:
    """Tasks that used up their attempts."""
    body = _call("GET", f"{url}/v1/dead")
    if as_json:
        console.print_json(json.dumps(body))
        return
    console.print(_tasks_table(body["tasks"]))


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


@app.command()
def executors(
    zookeeper: str = typer.Option(
        None, "--zookeeper", envvar="CHRONORAY_ZOOKEEPER_HOSTS", help="host:port[,host:port]"
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Live executors, as the ZooKeeper mirror shows them."""
    if not zookeeper:
        err.print("no ZooKeeper: set --zookeeper or CHRONORAY_ZOOKEEPER_HOSTS")
        raise typer.Exit(2)
    from actors.zk_mirror import read_tree

    try:
        tree = read_tree(zookeeper)
    except Exception as exc:
        err.print(f"ZooKeeper at {zookeeper} not reachable: {exc}")
        raise typer.Exit(1) from None
    if as_json:
        console.print_json(json.dumps(tree))
        return
    table = Table("executor", "tier", "node", "pid", "slots", "running", "heartbeat age s")
    now = time.time()
    for ex in tree["executors"]:
        table.add_row(
            ex["executor_id"],
            ex["tier"],
            ex["node"][:12],
            str(ex["pid"]),
            str(ex["slots"]),
            str(ex["running"]),
            f"{now - ex['last_heartbeat']:.1f}",
        )
    console.print(table)
    dispatcher = tree["dispatcher"]
    console.print(
        f"dispatcher: queued {dispatcher['queued']}, pid {dispatcher['pid']}"
        if dispatcher
        else "dispatcher: not published"
    )


def _print(body, as_json: bool, line: str) -> None:
    if as_json:
        console.print_json(json.dumps(body))
    else:
        console.print(line)


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
    if as_json:
        console.print_json(json.dumps(body))
        return
    table = Table("id", "script", "cron", "zone", "next fire", "paused", "missed", "skipped")
    for s in body["schedules"]:
        table.add_row(
            str(s["schedule_id"]),
            s["script"],
            s["cron"],
            s["timezone"],
            str(s["next_fire_local"]),
            str(s["paused"]),
            str(s["missed_fires"]),
            str(s["skipped_fires"]),
        )
    console.print(table)


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
    if as_json:
        console.print_json(json.dumps(body))
        return
    table = Table("nominal", "status", "attempt", "started", "lag ms")
    for occurrence in body["occurrences"]:
        last = occurrence["runs"][-1] if occurrence["runs"] else {}
        table.add_row(
            occurrence["nominal_at"],
            occurrence["status"],
            str(occurrence["attempt"]),
            str(last.get("started_at")),
            str(last.get("lag_ms")),
        )
    console.print(table)


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
