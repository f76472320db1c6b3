"""Priority → executor tier. A task runs on its tier or a stronger one."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class NetworkPolicy(str, enum.Enum):
    """What a tier's scripts reach (enforced by actors/network.py)."""

    NONE = "none"  # a network namespace with only its own loopback
    EGRESS = "egress"  # the host's network, minus chronoray's control plane
    HOST = "host"  # the host's network as it is


@dataclass(frozen=True, kw_only=True)
class Tier:
    name: str
    min_priority: int
    num_cpus: float
    memory_mb: int
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)  # a node must carry these
    executors: int = 1  # executors at start and at least (the pool's minimum)
    max_executors: int = 0  # the pool grows with queue depth up to this (0: = executors)
    slots: int = 4  # scripts one executor runs at once
    # resident memory per script, its whole process tree (a cgroup; where
    # none can be made, its address space): 0 takes memory_mb, else 1024
    script_memory_mb: int = 0
    network: NetworkPolicy = NetworkPolicy.EGRESS
    cpu_weight: int = 100  # each run's CPU share against other runs (100: the default)
    scratch_mb: int = 256  # what a script may write in all (its tmpfs /tmp)

    @property
    def script_memory(self) -> int:
        return self.script_memory_mb or self.memory_mb or 1024

    @property
    def most_executors(self) -> int:
        return max(self.executors, self.max_executors)

    def asks(self) -> dict[str, float]:
        """The resources one executor takes of its node (CPU among them)."""
        return {**self.resources, **({"CPU": self.num_cpus} if self.num_cpus else {})}

    def actor_options(self) -> dict[str, Any]:
        """Ray actor options that place an executor of this tier."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "resources": dict(self.resources)}
        if self.memory_mb:
            options["memory"] = self.memory_mb * 1024 * 1024
        if self.labels:
            options["label_selector"] = dict(self.labels)
        return options


@dataclass(frozen=True, kw_only=True)
class PoolTiming:
    heartbeat_s: float = 1.0
    misses: int = 3  # heartbeats missed before an executor is declared dead
    placement_timeout_s: float = 30.0  # no first heartbeat by then: reported unplaceable
    idle_s: float = 60.0  # an executor idle this long may be removed (above the minimum)
    reap_after_s: float = 30.0  # a dead executor that did not exit by itself is killed
    # An executor fences itself (kills its scripts) when the pool says it was
    # declared dead, or after this long without an answer: far longer than a
    # pool restart, so a restarting pool never kills healthy work.
    fence_after_s: float = 60.0


@dataclass(frozen=True)
class MemberView:
    """What sizing needs to know of one executor of a tier."""

    executor_id: str
    placed: bool  # has heartbeated: Ray found it a node
    running: int
    idle_for_s: float
    draining: bool = False
    drained: bool = False  # draining, and it said it holds nothing and takes nothing new


@dataclass(frozen=True)
class SizePlan:
    start: int = 0  # new executors to create
    drain: tuple[str, ...] = ()  # take nothing new; removed once idle
    remove: tuple[str, ...] = ()  # drained and idle: destroy


def plan_size(
    tier: Tier,
    demand: int,
    members: Sequence[MemberView],
    *,
    unplaceable: bool,
    timing: PoolTiming,
) -> SizePlan:
    """Size one tier for ``demand`` (tasks wanting it: queued plus running):
    enough executors for the demand, between the tier's minimum and maximum.
    Nothing is started while one is pending on a tier no node can place;
    only executors idle for ``idle_s`` are drained, and a draining one is
    removed once it said it holds nothing and takes nothing new (the pool's
    own view of its work is a heartbeat old: the dispatcher may have placed
    attempts on it since)."""
    active = [m for m in members if not m.draining]
    wanted = min(max(tier.executors, math.ceil(demand / tier.slots)), tier.most_executors)
    pending = any(not m.placed for m in active)
    start, drain = 0, []
    if len(active) < wanted and not (pending and unplaceable):
        start = wanted - len(active)
    elif len(active) > wanted:
        idle = [m for m in active if m.placed and m.running == 0 and m.idle_for_s >= timing.idle_s]
        drain = [m.executor_id for m in idle[: len(active) - wanted]]
    remove = [m.executor_id for m in members if m.draining and m.drained]
    return SizePlan(start=start, drain=tuple(drain), remove=tuple(remove))


class TierTable:
    """Ordered tiers, weakest first; each covers priorities from its
    ``min_priority`` up to the next tier's."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        if not tiers:
            raise ValueError("at least one tier is needed")
        ordered = sorted(tiers, key=lambda t: t.min_priority)
        if ordered[0].min_priority != 0:
            raise ValueError("the weakest tier must start at priority 0")
        names = [t.name for t in ordered]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique: {names}")
        self.tiers: tuple[Tier, ...] = tuple(ordered)

    def index_for(self, priority: int) -> int:
        index = 0
        for i, tier in enumerate(self.tiers):
            if priority >= tier.min_priority:
                index = i
        return index

    def tier_for(self, priority: int) -> Tier:
        return self.tiers[self.index_for(priority)]

    def eligible(self, priority: int) -> tuple[Tier, ...]:
        """Tiers a task of this priority may run on, its own first."""
        return self.tiers[self.index_for(priority) :]

    def stronger_than(self, priority: int) -> Tier:
        """The next tier up (the strongest is its own next)."""
        return self.tiers[min(self.index_for(priority) + 1, len(self.tiers) - 1)]

    def more_memory_than(self, priority: int) -> Tier:
        """The weakest stronger tier whose scripts get more memory."""
        own = self.tier_for(priority)
        for tier in self.eligible(priority):
            if tier.script_memory > own.script_memory:
                return tier
        return self.tiers[-1]

    def by_name(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)

    def __iter__(self) -> Iterator[Tier]:
        return iter(self.tiers)


def production_tiers() -> TierTable:
    """The table of DESIGN.md, for real clusters. Each tier's custom resource
    is offered only by that tier's node type in cluster.yaml, so Ray places an
    executor on its own kind of machine."""
    return TierTable(
        [
            Tier(
                name="small",
                min_priority=0,
                num_cpus=0.25,
                memory_mb=256,
                resources={"chronoray_small": 1},
                executors=2,
                max_executors=16,
            ),
            Tier(
                name="medium",
                min_priority=3,
                num_cpus=1,
                memory_mb=1024,
                resources={"chronoray_medium": 1},
                executors=1,
                max_executors=8,
            ),
            Tier(
                name="large",
                min_priority=6,
                num_cpus=2,
                memory_mb=4096,
                resources={"chronoray_large": 1},
                executors=1,
                max_executors=4,
            ),
        ]
    )


def slot_tier(
    name: str,
    min_priority: int,
    *,
    executors: int = 1,
    max_executors: int = 0,
    slots: int = 4,
    script_memory_mb: int = 0,
    cpu_weight: int = 100,
    scratch_mb: int = 256,
    network: NetworkPolicy = NetworkPolicy.EGRESS,
) -> Tier:
    """A tier that needs no CPU, only one unit of the custom resource
    ``chronoray_<name>`` per executor: the node (or node type) offering that
    resource decides where and how many executors fit."""
    return Tier(
        name=name,
        min_priority=min_priority,
        num_cpus=0,
        memory_mb=0,
        resources={f"chronoray_{name}": 1},
        executors=executors,
        max_executors=max_executors,
        slots=slots,
        script_memory_mb=script_memory_mb,
        cpu_weight=cpu_weight,
        scratch_mb=scratch_mb,
        network=network,
    )


def local_tiers(
    *, executors: int = 1, slots: int = 4, max_executors: int | None = None
) -> TierTable:
    """The embedded default on one small machine: the same tiers, but each
    executor needs only a custom slot resource the local node provides
    (see ``local_node_resources``), never a CPU — on 2 cores CPU-sized
    executors would starve the control plane. One executor per tier while
    idle (each is a Ray worker of about 70 MB), grown on demand to
    ``max_executors`` (4, or twice ``executors`` if that is more)."""
    return TierTable(
        [
            slot_tier(
                name,
                low,
                executors=executors,
                max_executors=max_executors or max(4, executors * 2),
                slots=slots,
                script_memory_mb=memory,
                cpu_weight=weight,
            )
            for name, low, memory, weight in (
                ("small", 0, 512, 100),
                ("medium", 3, 1024, 200),
                ("large", 6, 4096, 400),
            )
        ]
    )


def local_node_resources(table: TierTable) -> dict[str, float]:
    """Custom resources a single local node must offer to host every tier."""
    totals: dict[str, float] = {}
    for tier in table:
        for name, amount in tier.resources.items():
            totals[name] = totals.get(name, 0) + amount * tier.most_executors
    return totals


@dataclass(frozen=True)
class NodeOffer:
    """What one node (or a node type the autoscaler can add) offers."""

    name: str
    resources: Mapping[str, float]
    labels: Mapping[str, str] = field(default_factory=dict)


def homeless_tiers(table: TierTable, nodes: Sequence[NodeOffer]) -> dict[str, str]:
    """Tiers no node can host one executor of, each with the reason: Ray
    would keep their executors pending forever."""
    problems: dict[str, str] = {}
    for tier in table:
        wanted = tier.asks()
        fits = [
            node
            for node in nodes
            if all(node.resources.get(name, 0) >= amount for name, amount in wanted.items())
            and all(node.labels.get(k) == v for k, v in tier.labels.items())
        ]
        if fits:
            continue
        asks = ", ".join(f"{k}={v:g}" for k, v in wanted.items()) or "nothing"
        labels = ", ".join(f"{k}={v}" for k, v in tier.labels.items())
        problems[tier.name] = (
            f"tier {tier.name!r} asks for {asks}"
            + (f" on a node labelled {labels}" if labels else "")
            + f"; no node offers it (nodes: {', '.join(n.name for n in nodes) or 'none'})"
        )
    return problems
