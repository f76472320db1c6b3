"""Prometheus metrics. Each actor process keeps its own registry; the API's
``GET /metrics`` gathers them over Ray calls and serves one exposition, each
series labelled with the ``source`` it came from (shard-0, dispatcher, api …).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from scheduling.models import Outcome, RunResult, TaskStatus

# fire lag = executor start − due time; a good run is single-digit milliseconds
FIRE_LAG_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip


def _lag_s(result: RunResult) -> float | None:
    if result.started_at is None:
        return None
    return max(0.0, (result.started_at - result.due_at).total_seconds())


class OutcomeMetrics:
    """Each attempt's outcome: fire lag by tier and schedule, retries and
    dead tasks by failure class. Counted where what a commit decided is
    first known: the dispatcher for the results executors committed, a
    shard for those it committed itself (attempts lost with their
    executors), so a plain success costs no call to its shard."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.fire_lag = Histogram(
            "chronoray_fire_lag_seconds",
            "Executor start minus due time, per tier; schedule is the schedule id ('' for one-shot)",
            ["tier", "schedule"],
            buckets=FIRE_LAG_BUCKETS_S,
            registry=self.registry,
        )
        self.retries = Counter(
            "chronoray_retries", "Failed attempts put back for a retry", ["failure"],
            registry=self.registry,
        )  # fmt: skip
        self.dead = Counter(
            "chronoray_dead_tasks", "Tasks that used up their attempts", ["failure"],
            registry=self.registry,
        )  # fmt: skip

    def count(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.outcome(outcome.result, outcome.status, outcome.schedule_id)

    def outcome(self, result: RunResult, status: TaskStatus, schedule_id: int | None) -> None:
        lag = _lag_s(result)
        if lag is not None:
            schedule = "" if schedule_id is None else str(schedule_id)
            self.fire_lag.labels(tier=result.tier or "none", schedule=schedule).observe(lag)
        if result.failure is None:
            return
        if status is TaskStatus.SCHEDULED:
            self.retries.labels(failure=result.failure.value).inc()
        elif status is TaskStatus.DEAD:
            self.dead.labels(failure=result.failure.value).inc()

    def families(self) -> list[Metric]:
        return list(self.registry.collect())


class ShardMetrics(OutcomeMetrics):
    """What a shard sees: submissions it stored, fires, and the outcomes of
    the results it committed itself."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted = Counter(
            "chronoray_tasks_submitted",
            "Tasks stored by a submission (POST /v1/tasks, /sendTask, Client.submit)",
            registry=self.registry,
        )
        self.fired = Counter(
            "chronoray_fires", "Attempts a shard handed to the dispatcher", registry=self.registry
        )


class ApiMetrics:
    """What only the API sees: tasks and schedules created per request kind."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.submissions = Counter(
            "chronoray_submissions",
            "Accepted submission requests by kind (task, batch, schedule)",
            ["kind"],
            registry=self.registry,
        )
        self.batch_tasks = Counter(
            "chronoray_batch_tasks_submitted",
            "Tasks stored by POST /v1/tasks:batch",
            registry=self.registry,
        )

    def families(self) -> list[Metric]:
        return list(self.registry.collect())


def dispatcher_families(
    depth_by_priority: Mapping[int, int], running_by_tier: Mapping[str, int]
) -> list[Metric]:
    depth = GaugeMetricFamily(
        "chronoray_queue_depth",
        "Tasks waiting in the dispatcher, per priority",
        labels=["priority"],
    )
    for priority, count in sorted(depth_by_priority.items()):
        depth.add_metric([str(priority)], count)
    running = GaugeMetricFamily(
        "chronoray_running", "Attempts running on executors, per tier", labels=["tier"]
    )
    for tier, count in sorted(running_by_tier.items()):
        running.add_metric([tier], count)
    return [depth, running]


def pool_families(status: Mapping) -> list[Metric]:
    alive = GaugeMetricFamily(
        "chronoray_executors_alive", "Executors heartbeating, per tier", labels=["tier"]
    )
    for tier, seen in sorted(status.get("tiers", {}).items()):
        alive.add_metric([tier], seen["live"])
    return [alive]


class _Gathered:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def exposition(by_source: Mapping[str, Iterable[Metric]]) -> bytes:
    """One Prometheus text exposition of every source's families: families
    of one name merged, each sample labelled with its source."""
    merged: dict[str, Metric] = {}
    for source, families in by_source.items():
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            target.samples.extend(
                sample._replace(labels={**sample.labels, "source": source})
                for sample in family.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Gathered(list(merged.values())))
    return generate_latest(registry)
