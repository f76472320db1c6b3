"""`chronoray submit` and `chronoray tasks …`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.table import Table

from chronoray.cli.base import (
    JSON_OPTION,
    RELATIVE,
    RUN_COLUMNS,
    api,
    err,
    parse_when,
    show,
    table,
    variables_of,
)
from chronoray.cli.session import error_body

tasks_app = typer.Typer(help="List, show, cancel and retry tasks.", no_args_is_help=True)


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
    as_json: bool = JSON_OPTION,
) -> None:
    """Schedule a registered script to run once, or every task of a JSON
    Lines file (--file) in all-or-nothing batches, with a progress bar."""
    if file is not None:
        if script:
            err.print("[red]give a script or --file, not both[/red]")
            raise typer.Exit(2)
        _submit_file(file, batch_size=batch_size, as_json=as_json)
        return
    if not script:
        err.print("[red]give a script, or --file tasks.jsonl[/red]")
        raise typer.Exit(2)
    variables = variables_of(var)
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
    body = api().call("POST", "/v1/tasks", json=request)
    show(body, as_json, f"task {body['task_id']} {body['status']} at {body['execute_at']}")


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


def _submit_file(file: Path, *, batch_size: int, as_json: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    if not 1 <= batch_size <= 1000:
        err.print("[red]--batch-size must be between 1 and 1000[/red]")
        raise typer.Exit(2)
    entries = read_jsonl(file)
    submitted, created, task_ids = 0, 0, []
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=as_json) as progress:
        bar = progress.add_task(f"submitting {file.name}", total=len(entries))
        for start in range(0, len(entries), batch_size):
            chunk = entries[start : start + batch_size]
            response = api().send(
                "POST", "/v1/tasks:batch", json={"tasks": [e["task"] for e in chunk]}
            )
            if response.is_error:
                _report_batch_error(file, chunk, response, submitted)
                raise typer.Exit(1)
            body = response.json()
            submitted += len(chunk)
            created += body["created"]
            task_ids += [t["task_id"] for t in body["tasks"]]
            progress.advance(bar, len(chunk))
    summary = {"submitted": submitted, "created": created, "task_ids": task_ids}
    show(summary, as_json, f"{submitted} tasks submitted ({created} new) from {file}")


def _report_batch_error(file: Path, chunk: list[dict], response, submitted: int) -> None:
    """Name the file's line: the batch's error field says tasks[i]."""
    body = error_body(response)
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
def tasks_show(task_id: int, as_json: bool = JSON_OPTION) -> None:
    """A task with its runs."""
    body = api().call("GET", f"/v1/tasks/{task_id}")
    line = (
        f"task {body['task_id']}  [bold]{body['status']}[/bold]  script {body['script']}  "
        f"due {body['execute_at']}  priority {body['priority']}  attempt {body['attempt']}/{body['max_attempts']}"
    )
    columns = {**RUN_COLUMNS, "output": lambda r: (r["output"] or "").strip()[-60:]}
    show(body, as_json, line, table(body.get("runs", []), columns))


def _tasks_table(tasks: list[dict]) -> Table:
    return table(
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
    as_json: bool = JSON_OPTION,
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
    body = api().call(
        "GET", "/v1/tasks", params={k: v for k, v in params.items() if v not in (None, [])}
    )
    more = [f"more: --cursor {body['next_cursor']}"] if body["next_cursor"] else []
    show(body, as_json, _tasks_table(body["tasks"]), *more)


@tasks_app.command("dead")
def tasks_dead(as_json: bool = JSON_OPTION) -> None:
    """Tasks that used up their attempts."""
    body = api().call("GET", "/v1/dead")
    show(body, as_json, _tasks_table(body["tasks"]))


@tasks_app.command("retry")
def tasks_retry(
    task_id: int,
    attempts: int = typer.Option(1, help="how many more attempts it gets"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run a dead task again."""
    body = api().call("POST", f"/v1/tasks/{task_id}/retry", json={"attempts": attempts})
    show(body, as_json, f"task {body['task_id']} {body['status']}, attempt {body['attempt']}")


@tasks_app.command("cancel")
def tasks_cancel(task_id: int, as_json: bool = JSON_OPTION) -> None:
    """Cancel a task that has not started (409 once it has)."""
    body = api().call("DELETE", f"/v1/tasks/{task_id}")
    show(body, as_json, f"task {body['task_id']} {body['status']}")
