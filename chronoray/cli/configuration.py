"""`chronoray config show`: the effective settings and where each came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from chronoray.cli.base import console, err

WIDE = 160  # a file's path and a tier's resources fit when piped
config_app = typer.Typer(help="The effective configuration.", no_args_is_help=True)
CONFIG_OPTION = typer.Option(
    None, "--config", help="a chronoray YAML config file (else CHRONORAY_CONFIG)"
)


def load_or_exit(config: Path | None, data_dir: Path | None = None) -> Any:
    """chronoray.config.load, with an invalid file reported as FILE:LINE and
    the reason, and exit status 2."""
    from chronoray.config import ConfigError, load

    try:
        return load(data_dir=data_dir, config=config)
    except ConfigError as error:
        err.print(
            f"[red]invalid configuration: {error.where}: {error.reason}[/red]", soft_wrap=True
        )
        raise typer.Exit(2) from None


def effective_values(settings: Any) -> dict[str, Any]:
    """Each key of the file (and variable) with the value in effect."""
    from chronoray.config import SCALARS

    derived = {
        "database_replica_urls": list(settings.database_replica_urls),
        "control_plane_resource": ",".join(settings.control_plane_resources) or None,
        "sandbox_user": (
            settings.sandbox.run_as
            if settings.sandbox.uid_base is None
            else "(unset: a uid of its own per running script)"
        ),
        "retry_backoff_s": settings.retry.backoff_base_s,
        "script_network": ",".join(f"{t.name}={t.network.value}" for t in settings.tiers),
    }
    return {name: derived.get(name, getattr(settings, name, None)) for name in SCALARS}


@config_app.command("show")
def show(
    config: Path | None = CONFIG_OPTION,
    data_dir: Path | None = typer.Option(None, help="the data dir of the embedded SQLite"),
) -> None:
    """Print every setting in effect and where it came from: the default,
    the config file's line, or a CHRONORAY_* variable. An invalid file is
    refused with its line and the reason (exit status 2)."""
    from dataclasses import asdict

    from chronoray.config import SECRET

    loaded = load_or_exit(config, data_dir)
    settings, sources = loaded.settings, loaded.sources
    table = Table("setting", "value", "from", box=None)
    for name, value in effective_values(settings).items():
        shown = "(set, hidden)" if name in SECRET and value else value
        table.add_row(name, "" if shown is None else str(shown), sources.get(name, "default"))
    for name, value in asdict(settings.pool_timing).items():
        table.add_row(f"pool.{name}", str(value), sources.get(f"pool.{name}", "default"))
    out = console if console.is_terminal else Console(width=WIDE)
    out.print(table)

    tiers = Table(
        "tier",
        "priorities",
        "placed on",
        "slots",
        "script MiB",
        "executors",
        "network",
        "cpu weight",
        "from",
        title="executor tiers",
        box=None,
    )
    ordered = list(settings.tiers)
    for i, tier in enumerate(ordered):
        top = ordered[i + 1].min_priority - 1 if i + 1 < len(ordered) else None
        placed = ", ".join(f"{k}={v:g}" for k, v in tier.asks().items())
        if tier.labels:
            placed += " on " + ", ".join(f"{k}={v}" for k, v in tier.labels.items())
        tiers.add_row(
            tier.name,
            f"{tier.min_priority}-{top}" if top is not None else f"{tier.min_priority}+",
            placed,
            str(tier.slots),
            str(tier.script_memory),
            f"{tier.executors}-{tier.most_executors}",
            tier.network.value,
            str(tier.cpu_weight),
            loaded.tier_lines.get(tier.name, "default"),
        )
    out.print(tiers)
    if loaded.cluster_config:
        out.print(f"node types of {loaded.cluster_config} count as nodes")


def check_tiers_placeable(loaded: Any) -> None:
    """Refuse to start when a tier's executors could never be placed: no
    live node, nor a node type of ``ray_cluster_config``, offers what the
    tier asks for. Needs a connected Ray."""
    import ray
    import yaml

    from scheduling.tiers import NodeOffer, homeless_tiers

    nodes = [
        NodeOffer(
            name=f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})",
            resources=node.get("Resources", {}),
            labels=node.get("Labels") or {},
        )
        for node in ray.nodes()
        if node.get("Alive")
    ]
    if loaded.cluster_config:
        launcher = yaml.safe_load(loaded.cluster_config.read_text())
        nodes += [
            NodeOffer(
                name=f"{name} (node type)",
                resources=spec.get("resources", {}),
                labels=spec.get("labels", {}),
            )
            for name, spec in launcher.get("available_node_types", {}).items()
        ]
    problems = homeless_tiers(loaded.settings.tiers, nodes)
    for name, reason in problems.items():
        where = loaded.tier_lines.get(name, "the default tiers")
        err.print(f"[red]invalid configuration: {where}: {reason}[/red]", soft_wrap=True)
    if problems:
        raise typer.Exit(2)
