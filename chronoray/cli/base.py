"""What every command shares: the root app, the consoles, the API call
(errors printed, exit 1), and rendering as tables or JSON."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import httpx
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="chronoray: a distributed task scheduler on Ray.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)
URL_OPTION = typer.Option(
    "http://127.0.0.1:8000", "--url", envvar="CHRONORAY_URL", help="API base URL"
)
JSON_OPTION = typer.Option(False, "--json", help="print the API's answer as JSON")
RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
RUN_COLUMNS = {
    "attempt": "attempt",
    "status": "status",
    "tier": "tier",
    "executor": "executor_id",
    "exit": "exit_code",
    "lag ms": "fire_lag_ms",
}


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


def token_for(admin: bool = False) -> str | None:
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


def call(method: str, url: str, *, admin: bool = False, raw: bool = False, **kwargs):
    """One API call; an error answer is printed (status, code, field,
    detail) and ends the command with exit code 1. ``raw``: the body as
    bytes instead of JSON."""
    token = token_for(admin)
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
