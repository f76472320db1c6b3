"""Where settings come from: defaults, a YAML config file (``--config`` or
``CHRONORAY_CONFIG``), then ``CHRONORAY_*`` variables, each overriding the
one before. Every value remembers its source, for ``chronoray config show``
and for errors that name the file's line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from actors.sandbox import SandboxLimits
from chronoray.settings import ENV_PREFIX, Settings, data_dir_from, with_networks
from scheduling.lifecycle import RetryPolicy
from scheduling.tiers import NetworkPolicy, PoolTiming, Tier, TierTable, local_tiers

CONFIG_VARIABLE = f"{ENV_PREFIX}CONFIG"

# Each setting a top-level key of the file and a CHRONORAY_<KEY> variable set,
# with the type a variable's text is read as. Most are Settings fields of the
# same name; the last group is turned into other fields by ``_settings_values``.
SCALARS: dict[str, type] = {
    "database_url": str,
    "namespace": str,
    "num_shards": int,
    "range_s": int,
    "range_slices": int,
    "lookahead_s": float,
    "sweep_interval_s": float,
    "prefire_ms": float,
    "prespawn": bool,
    "queue_lease_s": float,
    "lease_grace_s": float,
    "dispatcher_max_queued": int,
    "executor_credits": int,
    "aging_s": float,
    "zookeeper_hosts": str,
    "zookeeper_session_timeout_s": float,
    "min_schedule_interval_s": float,
    "retention_days": float,
    "retention_interval_s": float,
    "http_host": str,
    "http_port": int,
    "dashboard_port": int,
    "max_script_bytes": int,
    "max_batch_tasks": int,
    "serve_replicas": int,
    "serve_ingress": str,
    "admin_token": str,
    "token_cache_s": float,
    "rate_limit_per_s": float,
    "rate_limit_burst": int,
    "max_active_tasks": int,
    "max_schedules": int,
    # not fields of their own name
    "database_replica_urls": list,  # a list in the file, comma-separated in a variable
    "control_plane_resource": str,
    "sandbox_user": str,
    "retry_backoff_s": float,
    "script_network": str,
}
SECRET = {"admin_token"}


class ConfigError(ValueError):
    """A config file (or variable) that cannot be used, with where."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


class TierConfig(BaseModel):
    """One tier of the file's ``tiers`` list."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    min_priority: int = Field(ge=0)
    max_priority: int | None = Field(default=None, ge=0)  # else: up to the next tier's
    resources: dict[str, float] = Field(default_factory=dict)  # Ray resources per executor
    node_labels: dict[str, str] = Field(default_factory=dict)  # a node label selector
    num_cpus: float = Field(default=0, ge=0)
    memory_mb: int = Field(default=0, ge=0)  # Ray memory reserved per executor
    slots: int = Field(default=4, ge=1)
    script_memory_mb: int = Field(default=0, ge=0)
    min_executors: int = Field(default=1, ge=0)
    max_executors: int = Field(default=0, ge=0)
    network: NetworkPolicy = NetworkPolicy.EGRESS
    cpu_weight: int = Field(default=100, ge=1, le=10000)
    scratch_mb: int = Field(default=256, ge=1)

    def tier(self) -> Tier:
        return Tier(
            name=self.name,
            min_priority=self.min_priority,
            num_cpus=self.num_cpus,
            memory_mb=self.memory_mb,
            resources=dict(self.resources),
            labels=dict(self.node_labels),
            executors=self.min_executors,
            max_executors=self.max_executors,
            slots=self.slots,
            script_memory_mb=self.script_memory_mb,
            network=self.network,
            cpu_weight=self.cpu_weight,
            scratch_mb=self.scratch_mb,
        )


PoolConfig = create_model(  # type: ignore[call-overload]
    "PoolConfig",
    __config__=ConfigDict(extra="forbid"),
    **{name: (kind | None, None) for name, kind in get_type_hints(PoolTiming).items()},
)

FileConfig = create_model(  # type: ignore[call-overload]
    "FileConfig",
    __config__=ConfigDict(extra="forbid"),
    tiers=(list[TierConfig] | None, None),
    pool=(PoolConfig | None, None),
    # a Ray cluster launcher config (cluster.yaml): its node types count as
    # nodes that offer their resources, since the autoscaler can add them
    ray_cluster_config=(str | None, None),
    **{
        name: ((list[str] if kind is list else kind) | None, None)  # type: ignore[operator]
        for name, kind in SCALARS.items()
    },
)


@dataclass(frozen=True)
class Loaded:
    """The effective settings and where each came from."""

    settings: Settings
    sources: dict[str, str]  # setting → "default", "FILE:LINE" or "CHRONORAY_X"
    tier_lines: dict[str, str]  # tier name → "FILE:LINE" of its entry
    cluster_config: Path | None = None


def config_path(explicit: Path | None, env: Mapping[str, str]) -> Path | None:
    if explicit is not None:
        return explicit
    return Path(env[CONFIG_VARIABLE]) if env.get(CONFIG_VARIABLE) else None


def load(
    env: Mapping[str, str] | None = None,
    *,
    data_dir: Path | None = None,
    config: Path | None = None,
) -> Loaded:
    """Defaults, then the config file, then the environment."""
    env = os.environ if env is None else env
    path = config_path(config, env)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    tier_lines: dict[str, str] = {}
    parsed: Any = None
    lines = _Lines(path, None)
    if path is not None:
        parsed, lines = _read(path)
        for name in SCALARS:
            value = getattr(parsed, name)
            if value is not None:
                values[name], sources[name] = value, lines.where((name,))
    for name, kind in SCALARS.items():
        variable = f"{ENV_PREFIX}{name.upper()}"
        # SANDBOX_USER set but empty means "the executor's user"
        if env.get(variable) or (name == "sandbox_user" and variable in env):
            values[name], sources[name] = _from_text(variable, env[variable], kind), variable
    data_dir = data_dir or data_dir_from(env)
    if not values.get("database_url"):
        values["database_url"] = f"sqlite:///{data_dir / 'chronoray.db'}"
        sources["database_url"] = f"default (SQLite in {data_dir})"
    if values["database_url"].startswith("sqlite:///"):
        Path(values["database_url"][len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)

    tiers = local_tiers()
    if parsed is not None and parsed.tiers is not None:
        tiers = _tier_table(parsed.tiers, lines)
        sources["tiers"] = lines.where(("tiers",))
        tier_lines = {t.name: lines.where(("tiers", i)) for i, t in enumerate(parsed.tiers)}
    pool = PoolTiming()
    if parsed is not None and parsed.pool is not None:
        given = parsed.pool.model_dump(exclude_none=True)
        pool = replace(pool, **given)
        sources.update({f"pool.{k}": lines.where(("pool", k)) for k in given})
    cluster_config = None
    if parsed is not None and parsed.ray_cluster_config:
        cluster_config = (path.parent / parsed.ray_cluster_config).resolve()  # type: ignore[union-attr]
        if not cluster_config.exists():
            raise ConfigError(
                lines.where(("ray_cluster_config",)), f"no such file: {cluster_config}"
            )
        sources["ray_cluster_config"] = lines.where(("ray_cluster_config",))
    try:
        settings = Settings(**_settings_values(values, tiers, pool))
    except ValueError as error:
        raise ConfigError(_blame(str(error), sources, path), str(error)) from None
    return Loaded(settings, sources, tier_lines, cluster_config)


def _settings_values(values: dict[str, Any], tiers: TierTable, pool: PoolTiming) -> dict:
    out = {k: v for k, v in values.items() if k not in _DERIVED}
    out["tiers"], out["pool_timing"] = tiers, pool
    if values.get("database_replica_urls"):
        out["database_replica_urls"] = tuple(values["database_replica_urls"])
    if values.get("control_plane_resource"):
        out["control_plane_resources"] = {values["control_plane_resource"]: 0.01}
    if "sandbox_user" in values:
        # a name: every script as that one user; empty: as the executor's
        # user; unset: a uid of its own per running script
        out["sandbox"] = SandboxLimits(run_as=values["sandbox_user"] or None, uid_base=None)
    if values.get("retry_backoff_s"):
        out["retry"] = RetryPolicy(backoff_base_s=values["retry_backoff_s"])
    if values.get("script_network"):
        out["tiers"] = with_networks(tiers, values["script_network"])
    return out


_DERIVED = {
    "database_replica_urls",
    "control_plane_resource",
    "sandbox_user",
    "retry_backoff_s",
    "script_network",
}


def _from_text(variable: str, text: str, kind: type) -> Any:
    if kind is list:
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind is bool:
        word = text.strip().lower()
        if word in {"1", "true", "yes", "on"}:
            return True
        if word in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(variable, f"{text!r} is not true or false")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(variable, f"{text!r} is not a valid {kind.__name__}") from None


def _blame(message: str, sources: dict[str, str], path: Path | None) -> str:
    """The source of the setting an error message names, else the file."""
    for name, source in sources.items():
        if name in message:
            return source
    return str(path) if path else "settings"


def _tier_table(entries: list[TierConfig], lines: "_Lines") -> TierTable:
    """The file's tiers, refused when their priority ranges overlap or leave
    a gap, or when two share a name."""
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.name in seen:
            raise ConfigError(
                lines.where(("tiers", i, "name")),
                f"tier name {entry.name!r} is used twice (first at tiers[{seen[entry.name]}])",
            )
        seen[entry.name] = i
        if entry.max_priority is not None and entry.max_priority < entry.min_priority:
            raise ConfigError(
                lines.where(("tiers", i, "max_priority")),
                f"tier {entry.name!r}: max_priority is below min_priority",
            )
    order = sorted(range(len(entries)), key=lambda i: entries[i].min_priority)
    if entries[order[0]].min_priority != 0:
        raise ConfigError(
            lines.where(("tiers", order[0], "min_priority")),
            "the weakest tier must start at priority 0",
        )
    for lower, upper in pairwise(order):
        low, high = entries[lower], entries[upper]
        top = low.max_priority if low.max_priority is not None else high.min_priority - 1
        if high.min_priority <= top or high.min_priority == low.min_priority:
            raise ConfigError(
                lines.where(("tiers", upper, "min_priority")),
                f"tier {high.name!r} (from priority {high.min_priority}) overlaps tier "
                f"{low.name!r} (priorities {low.min_priority}-{top})",
            )
        if high.min_priority > top + 1:
            raise ConfigError(
                lines.where(("tiers", lower, "max_priority")),
                f"priorities {top + 1}-{high.min_priority - 1} have no tier "
                f"(between {low.name!r} and {high.name!r})",
            )
    return TierTable([entry.tier() for entry in entries])


class _Lines:
    """Line numbers of a YAML document's keys, by their path."""

    def __init__(self, path: Path | None, root: yaml.Node | None) -> None:
        self.path, self.root = path, root

    def where(self, loc: tuple) -> str:
        node, line = self.root, 1
        for step in loc:
            if isinstance(node, yaml.MappingNode):
                match = [(k, v) for k, v in node.value if k.value == step]
                if not match:
                    break
                line, node = match[0][0].start_mark.line + 1, match[0][1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
                if step >= len(node.value):
                    break
                node = node.value[step]
                line = node.start_mark.line + 1
            else:
                break
        return f"{self.path}:{line}"


def _read(path: Path) -> tuple[Any, _Lines]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(str(path), f"cannot read it: {error.strerror}") from None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{path}{line}", f"not valid YAML: {problem}") from None
    lines = _Lines(path, root)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1", "the file must be a mapping of settings")
    try:
        return FileConfig.model_validate(data), lines
    except ValidationError as error:
        first = error.errors()[0]
        loc = tuple(first["loc"])
        # pydantic names a union's branch (e.g. "list[str]") in the path
        loc = tuple(step for step in loc if not (isinstance(step, str) and "[" in step))
        reason = first["msg"]
        if first["type"] == "extra_forbidden":
            known = sorted(TierConfig.model_fields) if loc[:1] == ("tiers",) else None
            reason = f"unknown key {loc[-1]!r}" + (
                f" (a tier takes: {', '.join(known)})" if known else ""
            )
        elif first["type"] == "missing":
            reason = f"{loc[-1]!r} is required"
            loc = loc[:-1]
        where = ".".join(str(step) for step in loc)
        raise ConfigError(lines.where(loc), f"{where}: {reason}") from None
