"""`chronoray scripts …`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from chronoray.cli.base import (
    JSON_OPTION,
    api,
    console,
    show,
    table,
)

scripts_app = typer.Typer(help="Upload, list, show and delete scripts.", no_args_is_help=True)


@scripts_app.command("add")
def scripts_add(
    name: str,
    file: Path = typer.Argument(..., exists=True, dir_okay=False),
    interpreter: str = typer.Option("bash", help="python, bash or sh"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Upload (or version) a script from a file; the same content again is
    the same version."""
    body = api().call(
        "PUT",
        f"/v1/scripts/{name}",
        params={"interpreter": interpreter},
        content=file.read_bytes(),
        headers={"content-type": "application/octet-stream"},
    )
    show(body, as_json, f"script {body['name']} v{body['version']} ({body['sha256'][:12]})")


def _scripts_table(found: list[dict]) -> Table:
    return table(
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
def scripts_list(as_json: bool = JSON_OPTION) -> None:
    """Your scripts, the newest version of each."""
    body = api().call("GET", "/v1/scripts")
    show(body, as_json, _scripts_table(body["scripts"]))


@scripts_app.command("versions")
def scripts_versions(name: str, as_json: bool = JSON_OPTION) -> None:
    """Every version of a script, newest first, with its content hash."""
    body = api().call("GET", f"/v1/scripts/{name}/versions")
    show(body, as_json, _scripts_table(body["versions"]))


@scripts_app.command("show")
def scripts_show(
    name: str,
    version: int | None = typer.Option(None, help="an older version"),
    body_only: bool = typer.Option(False, "--body", help="print the script itself"),
    as_json: bool = JSON_OPTION,
) -> None:
    """A script's newest (or given) version; --body prints its content."""
    params = {"version": version} if version else {}
    if body_only:
        content = api().call("GET", f"/v1/scripts/{name}/body", params=params, raw=True)
        if as_json:
            console.print_json(json.dumps({"name": name, "body": content.decode(errors="replace")}))
        else:
            typer.echo(content.decode(errors="replace"), nl=False)
        return
    body = api().call("GET", f"/v1/scripts/{name}", params=params)
    show(body, as_json, _scripts_table([body]))


@scripts_app.command("delete")
def scripts_delete(name: str, as_json: bool = JSON_OPTION) -> None:
    """Delete every version of a script no pending task or schedule uses."""
    body = api().call("DELETE", f"/v1/scripts/{name}")
    show(body, as_json, f"script {name}: {body['deleted_versions']} versions deleted")
