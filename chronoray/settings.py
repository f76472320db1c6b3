"""Settings: one frozen object built at the edge (CLI, tests) and passed in.
Nothing reads the environment at import time."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from actors.sandbox import SandboxLimits
from scheduling.lifecycle import RetryPolicy
from scheduling.schedules import MisfireRules
from scheduling.tiers import NetworkPolicy, PoolTiming, TierTable, local_tiers
from scheduling.timeline import Wheel

ENV_PREFIX = "CHRONORAY_"


def default_data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("chronoray"))


def data_dir_from(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(f"{ENV_PREFIX}DATA_DIR") or default_data_dir())


def local_token_file(env: Mapping[str, str] | None = None) -> Path:
    """Where ``chronoray up`` keeps the local user's token."""
    return data_dir_from(env) / "local-token"


def up_state_file(data_dir: Path | None = None) -> Path:
    """Where a running ``chronoray up`` records its pid, for ``chronoray down``."""
    return (data_dir or data_dir_from()) / "up.json"


SERVE_INGRESSES = ("haproxy", "proxy")


@dataclass(frozen=True, kw_only=True)
class Settings:
    database_url: str
    namespace: str = "chronoray"
    # time-range sharding
    num_shards: int = 2
    range_s: int = 60
    # shards a range's tasks are spread over, by task id (1: a range is one
    # shard's; 0: every shard's, so a burst at one instant is fired by all)
    range_slices: int = 1
    lookahead_s: float = 60.0
    sweep_interval_s: float = 5.0
    prefire_ms: float = 250.0  # hand tasks to executors this early; they start on the instant
    # executors build a run's sandbox when it is handed over and hold it
    # (bash: started, before the script's first line) until the instant
    prespawn: bool = True
    queue_lease_s: float = 600.0  # how long a handed-over task may wait for a slot
    lease_grace_s: float = 30.0  # beyond a running task's timeout
    claim_batch: int = 2000
    # dispatching
    dispatcher_max_queued: int = 20000
    # attempts an executor may hold per slot; the extra ones start there as
    # slots free (1: the dispatcher keeps every waiting attempt; see README)
    executor_credits: int = 1
    tiers: TierTable = field(default_factory=local_tiers)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    aging_s: float = 30.0  # a queued task gains one priority level per this many seconds waiting
    # executors
    pool_timing: PoolTiming = field(default_factory=PoolTiming)
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    zookeeper_hosts: str | None = None  # the liveness mirror; off when unset
    zookeeper_session_timeout_s: float = 6.0
    control_plane_resources: Mapping[str, float] = field(default_factory=dict)
    # schedules
    misfire: MisfireRules = field(default_factory=MisfireRules)
    min_schedule_interval_s: float = 1.0
    # history: finished tasks and their runs older than this are removed (0: kept)
    retention_days: float = 30.0
    retention_interval_s: float = 300.0  # how often shard 0 looks
    retention_batch: int = 500  # tasks per transaction: short locks
    # API
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    dashboard_port: int = 8265  # `chronoray up`'s own Ray: the Jobs API on 127.0.0.1; 0: none
    max_script_bytes: int = 5 * 1024 * 1024
    max_request_bytes: int = 6 * 1024 * 1024
    default_timeout_s: float = 300.0
    max_timeout_s: float = 24 * 3600.0
    max_attempts_limit: int = 20
    max_batch_tasks: int = 1000  # POST /v1/tasks:batch, in one transaction
    max_priority: int = 9
    serve_replicas: int = 1
    # what takes HTTP on http_port: "haproxy" (Serve's HAProxy in front of
    # replicas that serve HTTP themselves) or "proxy" (Serve's Python proxy);
    # read when Ray starts (chronoray up), see chronoray.deploy.ingress_environment
    serve_ingress: str = "haproxy"
    # users, tokens and abuse limits
    admin_token: str | None = field(default=None, repr=False)  # POST /v1/users etc.; off when unset
    token_cache_s: float = 2.0  # how long a checked token is trusted before asking the database
    rate_limit_per_s: float = 200.0  # requests per user per API replica, sustained
    rate_limit_burst: int = 400
    max_active_tasks: int = 100_000  # per user: scheduled, queued or running
    max_schedules: int = 1_000  # per user, not deleted
    max_backfill_fires: int = 1_000  # occurrences one backfill may create (422 beyond)
    max_audit_fires: int = 10_080  # expected times one audit compares (a week of minutes)
    console_session_s: float = 12 * 3600.0  # a console sign-in lasts this long
    # read replicas: get/list queries go there; writes always to database_url
    database_replica_urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.serve_ingress not in SERVE_INGRESSES:
            raise ValueError(f"serve_ingress must be one of {SERVE_INGRESSES}")
        if self.executor_credits < 1:
            raise ValueError("executor_credits must be at least 1")
        if self.retention_days and self.retention_days * 86400 < self.misfire.catch_up_window_s:
            # fire_all would plan occurrences again whose tasks were removed
            raise ValueError(
                "retention_days must be 0 (keep everything) or cover the misfire catch-up window"
            )

    @property
    def wheel(self) -> Wheel:
        return Wheel(
            num_shards=self.num_shards,
            range_s=self.range_s,
            slices=self.range_slices or self.num_shards,
        )

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        data_dir: Path | None = None,
        config: Path | None = None,
    ) -> "Settings":
        """Defaults, then the config file (``config`` or ``CHRONORAY_CONFIG``),
        then ``CHRONORAY_*`` variables; the database defaults to SQLite in
        the user's data directory (the embedded default). chronoray.config
        also says where each value came from."""
        from chronoray.config import load

        return load(env, data_dir=data_dir, config=config).settings


def with_networks(tiers: TierTable, spec: str) -> TierTable:
    """``CHRONORAY_SCRIPT_NETWORK``: one policy for every tier (``egress``),
    or per tier (``small=none,large=host``; unnamed tiers keep theirs)."""
    policies = [p.value for p in NetworkPolicy]

    def policy(text: str) -> NetworkPolicy:
        if text not in policies:
            raise ValueError(f"{ENV_PREFIX}SCRIPT_NETWORK: {text!r} is not one of {policies}")
        return NetworkPolicy(text)

    spec = spec.strip()
    if "=" not in spec:
        every = policy(spec)
        return TierTable([replace(t, network=every) for t in tiers])
    wanted: dict[str, NetworkPolicy] = {}
    for item in spec.split(","):
        name, _, text = item.strip().partition("=")
        if name.strip() not in {t.name for t in tiers}:
            raise ValueError(f"{ENV_PREFIX}SCRIPT_NETWORK: no tier named {name.strip()!r}")
        wanted[name.strip()] = policy(text.strip())
    return TierTable([replace(t, network=wanted.get(t.name, t.network)) for t in tiers])
