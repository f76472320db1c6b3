"""What every command shares: the root app (``--url`` once, for every
command), the API session it opens, the consoles, and rendering as tables
or JSON."""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone

import typer
from rich.console import Console
from rich.table import Table

from chronoray.cli.session import DEFAULT_URL, ApiSession, err

app = typer.Typer(help="chronoray: a distributed task scheduler on Ray.", no_args_is_help=True)
console = Console()
JSON_OPTION = typer.Option(False, "--json", help="print the API's answer as JSON")
_SESSION: ContextVar[ApiSession] = ContextVar("api_session")  # one command per process
RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
RUN_COLUMNS = {
    "attempt": "attempt",
    "status": "status",
    "tier": "tier",
    "executor": "executor_id",
    "exit": "exit_code",
    "lag ms": "fire_lag_ms",
}


@app.callback()
def root(
    ctx: typer.Context,
    url: str = typer.Option(DEFAULT_URL, "--url", envvar="CHRONORAY_URL", help="API base URL"),
) -> None:
    """chronoray: a distributed task scheduler on Ray."""
    session = ApiSession(url)
    _SESSION.set(session)
    ctx.call_on_close(session.close)


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


def api() -> ApiSession:
    """The session the root command opened for this command."""
    return _SESSION.get()


def table(rows: list[dict], columns: dict) -> Table:
    """A rich table: header → a row's key, or a function of the row."""
    table = Table(*columns)
    for row in rows:
        table.add_row(
            *(str(pick(row) if callable(pick) else row.get(pick)) for pick in columns.values())
        )
    return table


def show(body, as_json: bool, *shown) -> None:
    """The answer as JSON with --json; else what is shown of it (lines, tables)."""
    if as_json:
        console.print_json(json.dumps(body))
        return
    for part in shown:
        console.print(part)


def variables_of(items: list[str]) -> dict[str, str]:
    variables = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            err.print(f"[red]--var {item!r}: expected NAME=value[/red]")
            raise typer.Exit(2)
        variables[name] = value
    return variables
