"""`chronoray executors`."""

from __future__ import annotations

import time

import typer

from chronoray.cli.base import (
    JSON_OPTION,
    api,
    err,
    show,
    table,
)


def executors(
    zookeeper: str = typer.Option(
        None,
        "--zookeeper",
        help="read the ZooKeeper mirror at host:port[,host:port] instead of the API",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Executors as the pool sees them (GET /v1/executors), or as the
    ZooKeeper mirror shows them (--zookeeper)."""
    if not zookeeper:
        _pool_executors(as_json)
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
    show(tree, as_json, table(tree["executors"], columns), line)


def _pool_executors(as_json: bool) -> None:
    body = api().call("GET", "/v1/executors")
    tiers = [{"tier": name, **tier} for name, tier in body["tiers"].items()]
    columns = {
        "tier": "tier",
        "live": "live",
        "starting": "starting",
        "min": "min",
        "max": "max",
        "unplaceable": lambda t: t.get("unplaceable") or "",
    }
    tier_table = table(tiers, columns)
    columns = {
        "executor": "executor_id",
        "tier": "tier",
        "state": "state",
        "node": lambda ex: (ex.get("node") or "")[:12],
        "running": "running",
        "heartbeat age s": "heartbeat_age_s",
    }
    show(body, as_json, tier_table, table(body["executors"], columns))
