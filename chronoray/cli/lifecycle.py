"""`chronoray up` and `chronoray down`."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import typer

from chronoray.cli.base import (
    console,
    err,
)
from chronoray.cli.configuration import CONFIG_OPTION, check_tiers_placeable, load_or_exit


def up(
    port: int = typer.Option(None, help="HTTP port (default 8000, or CHRONORAY_HTTP_PORT)"),
    address: str | None = typer.Option(None, help="join this Ray cluster instead of starting one"),
    data_dir: Path | None = typer.Option(None, help="where the embedded SQLite database lives"),
    grace_s: float = typer.Option(
        60.0, "--grace", help="on Ctrl-C or `chronoray down`: how long running scripts may finish"
    ),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Start chronoray (and a local Ray unless --address is given); stays in
    the foreground. Ctrl-C (or `chronoray down`) drains it and stops."""
    import os

    import ray

    from chronoray.deploy import deploy, forget_current_cluster, local_token, start_local_ray
    from chronoray.settings import local_token_file, up_state_file

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    loaded = load_or_exit(config, data_dir)
    settings = loaded.settings
    if port:
        settings = settings.with_(http_port=port)
    err.print(f"database: {settings.database_url}")
    dashboard = None
    if address:
        ray.init(address=address, namespace=settings.namespace, log_to_driver=False)
    else:
        err.print("starting a local Ray …")
        dashboard = start_local_ray(settings)
    try:
        check_tiers_placeable(loaded)
    except typer.Exit:
        ray.shutdown()
        raise
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
        if dashboard:
            if not dashboard.endswith(f":{settings.dashboard_port}"):
                err.print(
                    f"[yellow]port {settings.dashboard_port} was taken: Ray's Jobs API "
                    f"is at {dashboard}[/yellow]"
                )
            console.print(
                f"Ray jobs: RAY_AUTH_MODE=token ray job submit "
                f"--address http://{dashboard} -- python …",
                soft_wrap=True,
                highlight=False,
            )
        console.print(f"chronoray is up at [bold]{url}[/bold]  (Ctrl-C stops it)")
        stop.wait()
    finally:
        try:
            _drain(settings, grace_s)
        finally:
            state_file.unlink(missing_ok=True)
            if not address:
                forget_current_cluster()
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


def down(
    address: str | None = typer.Option(
        None, help="drain the chronoray on this Ray cluster directly (when no `up` runs)"
    ),
    data_dir: Path | None = typer.Option(None, help="the data dir `chronoray up` was given"),
    grace_s: float = typer.Option(60.0, "--grace", help="how long running scripts may finish"),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Stop chronoray gracefully: take no more work, let running scripts
    finish and their results be stored, then stop. Queued and future tasks
    stay in the database for the next `chronoray up`."""
    import os

    from chronoray.settings import up_state_file

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

    settings = load_or_exit(config, data_dir).settings
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
