"""The API session every command talks through: one keep-alive HTTP
connection to the base URL given once (``chronoray --url …`` or
CHRONORAY_URL), the user's token or the admin's, and one way of reporting
an error answer."""

from __future__ import annotations

import os
from typing import Any

import httpx
import typer
from rich.console import Console

err = Console(stderr=True)
DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 120


def token_for(admin: bool = False) -> str | None:
    """A user's token: CHRONORAY_TOKEN, else the one ``chronoray up`` keeps
    for the local user. The admin token: CHRONORAY_ADMIN_TOKEN."""
    from chronoray.settings import local_token_file

    if admin:
        return os.environ.get("CHRONORAY_ADMIN_TOKEN")
    if os.environ.get("CHRONORAY_TOKEN"):
        return os.environ["CHRONORAY_TOKEN"]
    kept = local_token_file()
    return kept.read_text().strip() if kept.exists() else None


def error_body(response: httpx.Response) -> dict[str, Any]:
    """The API's error answer ({error, field, detail}), or one made of the
    text when a proxy answered with something else."""
    try:
        body = response.json()
    except ValueError:
        return {"error": "not_json", "detail": response.text[:200]}
    return body if isinstance(body, dict) else {"error": "unexpected", "detail": str(body)[:200]}


class ApiSession:
    """Opened by the root command, closed when the command ends."""

    def __init__(self, base_url: str = DEFAULT_URL) -> None:
        self.base_url = base_url.rstrip("/")
        self._http: httpx.Client | None = None

    def send(self, method: str, path: str, *, admin: bool = False, **kwargs: Any) -> httpx.Response:
        """The answer as it came, error answers too; a server that cannot be
        reached ends the command with exit code 2."""
        if self._http is None:
            self._http = httpx.Client(base_url=self.base_url, timeout=TIMEOUT_S)
        token = token_for(admin)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kwargs.pop("headers", {}))
        try:
            return self._http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            err.print(f"[red]cannot reach chronoray at {self.base_url}: {exc}[/red]")
            raise typer.Exit(2) from None

    def call(
        self, method: str, path: str, *, admin: bool = False, raw: bool = False, **kwargs: Any
    ) -> Any:
        """The answer's JSON (``raw``: its bytes); an error answer is
        printed (status, code, field, detail) and ends the command with exit
        code 1."""
        response = self.send(method, path, admin=admin, **kwargs)
        if response.is_error:
            body = error_body(response)
            field = f" ({body.get('field')})" if body.get("field") else ""
            err.print(
                f"[red]{response.status_code} {body.get('error')}{field}: {body.get('detail')}[/red]"
            )
            raise typer.Exit(1)
        return response.content if raw else response.json()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
