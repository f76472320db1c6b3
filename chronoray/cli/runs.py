"""`chronoray runs …`."""

from __future__ import annotations

import json

import typer

from chronoray.cli.base import (
    JSON_OPTION,
    RUN_COLUMNS,
    api,
    console,
    show,
    table,
)

runs_app = typer.Typer(help="A task's attempts and their output.", no_args_is_help=True)


@runs_app.command("list")
def runs_list(task_id: int, as_json: bool = JSON_OPTION) -> None:
    """Every attempt of a task: executor, tier, lag, exit code, failure."""
    body = api().call("GET", f"/v1/tasks/{task_id}/runs")
    columns = {**RUN_COLUMNS, "started": "started_at", "failure": "failure"}
    show(body, as_json, table(body["runs"], columns))


@runs_app.command("output")
def runs_output(
    task_id: int,
    attempt: int = typer.Argument(1),
    as_json: bool = JSON_OPTION,
) -> None:
    """The tail of one attempt's output."""
    content = api().call("GET", f"/v1/tasks/{task_id}/runs/{attempt}/output", raw=True)
    text = content.decode(errors="replace")
    if as_json:
        console.print_json(json.dumps({"task_id": task_id, "attempt": attempt, "output": text}))
    else:
        typer.echo(text, nl=False)
