"""Priority → executor tier. A task runs on its tier or a stronger one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class Tier:
    name: str
    min_priority: int
    num_cpus: float
    memory_mb: int
    resources: Mapping[str, float] = field(default_factory=dict)
    executors: int = 1
    slots: int = 4  # scripts one executor runs at once

    def actor_options(self) -> dict:
        """Ray actor options that place an executor of this tier."""
        options: dict = {"num_cpus": self.num_cpus, "resources": dict(self.resources)}
        if self.memory_mb:
            options["memory"] = self.memory_mb * 1024 * 1024
        return options


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

    def by_name(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)

    def __iter__(self):
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
            ),
            Tier(
                name="medium",
                min_priority=3,
                num_cpus=1,
                memory_mb=1024,
                resources={"chronoray_medium": 1},
                executors=1,
            ),
            Tier(
                name="large",
                min_priority=6,
                num_cpus=2,
                memory_mb=4096,
                resources={"chronoray_large": 1},
                executors=1,
            ),
        ]
    )


def local_tiers(*, executors: int = 2, slots: int = 4) -> TierTable:
    """The embedded default on one small machine: the same tiers, but each
    executor needs only a custom slot resource the local node provides
    (see ``local_node_resources``), never a CPU — on 2 cores CPU-sized
    executors would starve the control plane."""
    return TierTable(
        [
            Tier(
                name=name,
                min_priority=low,
                num_cpus=0,
                memory_mb=0,
                resources={f"chronoray_{name}": 1},
                executors=executors,
                slots=slots,
            )
            for name, low in (("small", 0), ("medium", 3), ("large", 6))
        ]
    )


def local_node_resources(table: TierTable) -> dict[str, float]:
    """Custom resources a single local node must offer to host every tier."""
    totals: dict[str, float] = {}
    for tier in table:
        for name, amount in tier.resources.items():
            totals[name] = totals.get(name, 0) + amount * tier.executors
    return totals
