"""The ``chronoray`` command. ``up`` and ``down`` run and stop the
scheduler; the other commands talk to its HTTP API. One module per
command group; chronoray.cli.base holds what they share."""

from __future__ import annotations

from chronoray.cli import (
    configuration,
    executors,
    lifecycle,
    runs,
    schedules,
    scripts,
    tasks,
    users,
)
from chronoray.cli.base import app

app.add_typer(tasks.tasks_app, name="tasks")
app.add_typer(scripts.scripts_app, name="scripts")
app.add_typer(schedules.schedules_app, name="schedules")
app.add_typer(runs.runs_app, name="runs")
app.add_typer(users.users_app, name="users")
app.add_typer(configuration.config_app, name="config")
for command in (lifecycle.up, lifecycle.down, tasks.submit, executors.executors):
    app.command()(command)


def main() -> None:
    app()
