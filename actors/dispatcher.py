"""The dispatcher: one heap of ready tasks, placed on executors of the right
tier as slots free up; results go back to the shard that owns each task."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray

from actors.batching import Outbox
from scheduling.models import RunResult, TaskSpec
from scheduling.ready_queue import ReadyQueue
from scheduling.tiers import TierTable

log = logging.getLogger(__name__)

FINISHED_MEMORY = 200_000


class ExecutorClient(Protocol):
    async def run_batch(self, specs: list[TaskSpec]) -> int: ...
    async def running_keys(self) -> list[tuple[int, int]]: ...
    async def cancel(self, keys: list[tuple[int, int]]) -> int: ...


class ShardLink(Protocol):
    """How the dispatcher talks back to shards."""

    async def record_results(self, shard: int, results: list[RunResult]) -> None: ...
    async def mark_running(self, shard: int, specs: list[TaskSpec]) -> None: ...


@dataclass(kw_only=True)
class ExecutorSlots:
    executor_id: str
    tier: str
    tier_rank: int
    slots: int
    client: ExecutorClient
    in_flight: set[tuple[int, int]] = field(default_factory=set)

    @property
    def free(self) -> int:
        return self.slots - len(self.in_flight)


class Dispatcher:
    def __init__(
        self,
        *,
        tiers: TierTable,
        executors: Sequence[ExecutorSlots],
        shards: ShardLink,
        max_queued: int,
    ) -> None:
        self.incarnation = uuid.uuid4().hex
        self._tiers = tiers
        self._executors = list(executors)
        self._shards = shards
        self._max_queued = max_queued
        self._queue = ReadyQueue()
        # Attempts that finished recently: a shard that restarts hands over
        # every task still ``queued`` in the database, including ones whose
        # result is on its way back; these must not run again.
        self._finished: dict[tuple[int, int], None] = {}
        self._results: dict[int, Outbox[RunResult]] = {}
        self._running: dict[int, Outbox[TaskSpec]] = {}

    async def hello(self) -> str:
        """Shards compare this across calls: a new value means the heap was
        lost with a restart and their queued tasks must be handed over again."""
        return self.incarnation

    async def room(self) -> int:
        return max(0, self._max_queued - len(self._queue))

    async def submit(self, specs: Sequence[TaskSpec]) -> int:
        in_flight = {key for ex in self._executors for key in ex.in_flight}
        self._queue.push_many(
            s for s in specs if s.key not in in_flight and s.key not in self._finished
        )
        await self._place()
        return await self.room()

    async def report_results(self, results: Sequence[RunResult]) -> None:
        by_shard: dict[int, list[RunResult]] = {}
        for result in results:
            key = (result.task_id, result.attempt)
            for ex in self._executors:
                ex.in_flight.discard(key)
            self._finished[key] = None
            by_shard.setdefault(result.shard, []).append(result)
        while len(self._finished) > FINISHED_MEMORY:
            del self._finished[next(iter(self._finished))]
        for shard, batch in by_shard.items():
            self._outbox(self._results, shard, self._shards.record_results).put(batch)
        await self._place()

    async def cancel(self, keys: Sequence[tuple[int, int]]) -> None:
        """Stop these attempts: drop them from the heap, kill them where they
        run (their rows are already final, so late results change nothing)."""
        wanted = {tuple(k) for k in keys}
        self._queue.remove(wanted)
        for ex in self._executors:
            mine = [k for k in wanted if k in ex.in_flight]
            if mine:
                try:
                    await ex.client.cancel(mine)
                except Exception:
                    log.warning("executor %s did not take a cancel", ex.executor_id, exc_info=True)
                ex.in_flight.difference_update(mine)
        self._finished.update(dict.fromkeys(wanted))
        await self._place()

    def stats(self) -> dict[str, Any]:
        return {
            "incarnation": self.incarnation,
            "queued": len(self._queue),
            "executors": {
                ex.executor_id: {"tier": ex.tier, "slots": ex.slots, "running": len(ex.in_flight)}
                for ex in self._executors
            },
        }

    async def reconcile(self) -> None:
        """Align slot counts with what executors really run: a restarted
        executor forgot its attempts (their leases will retry them); a
        restarted dispatcher learns what is still running."""
        for ex in self._executors:
            try:
                actual = set(map(tuple, await ex.client.running_keys()))
            except Exception:
                log.warning("executor %s did not answer", ex.executor_id)
                continue
            ex.in_flight = actual
        await self._place()

    def _outbox(self, boxes: dict, shard: int, send) -> Outbox:
        if shard not in boxes:
            boxes[shard] = Outbox(lambda batch, s=shard: send(s, batch), name=f"to shard {shard}")
        return boxes[shard]

    def _choose(self, spec: TaskSpec) -> ExecutorSlots | None:
        """The weakest eligible tier with room, then the least busy executor."""
        rank = self._tiers.index_for(spec.priority)
        candidates = [ex for ex in self._executors if ex.tier_rank >= rank and ex.free > 0]
        if not candidates:
            return None
        chosen = min(candidates, key=lambda ex: (ex.tier_rank, -ex.free))
        chosen.in_flight.add(spec.key)  # reserve now, so the scan sees it taken
        return chosen

    async def _place(self) -> None:
        placed = self._queue.take(self._choose)
        if not placed:
            return
        per_executor: dict[str, tuple[ExecutorSlots, list[TaskSpec]]] = {}
        for spec, ex in placed:
            per_executor.setdefault(ex.executor_id, (ex, []))[1].append(spec)
        by_shard: dict[int, list[TaskSpec]] = {}
        for spec, _ in placed:
            by_shard.setdefault(spec.shard, []).append(spec)
        for shard, specs in by_shard.items():
            self._outbox(self._running, shard, self._shards.mark_running).put(specs)
        await asyncio.gather(*(self._send(ex, specs) for ex, specs in per_executor.values()))

    async def _send(self, ex: ExecutorSlots, specs: list[TaskSpec]) -> None:
        try:
            await ex.client.run_batch(specs)
        except Exception:
            log.warning(
                "executor %s refused %d tasks; requeued", ex.executor_id, len(specs), exc_info=True
            )
            for spec in specs:
                ex.in_flight.discard(spec.key)
            self._queue.push_many(specs)


# -- Ray shell ---------------------------------------------------------------


class _RayExecutor:
    def __init__(self, handle) -> None:
        self._handle = handle

    async def run_batch(self, specs: list[TaskSpec]) -> int:
        return await self._handle.run_batch.remote(specs)

    async def running_keys(self) -> list[tuple[int, int]]:
        return await asyncio.wait_for(self._handle.running_keys.remote(), timeout=5)

    async def cancel(self, keys: list[tuple[int, int]]) -> int:
        return await self._handle.cancel.remote(keys)


class _RayShards:
    def __init__(self, namespace: str) -> None:
        self._namespace = namespace

    async def record_results(self, shard: int, results: list[RunResult]) -> None:
        from actors.handles import call_shard

        await call_shard(shard, self._namespace, "record_results", results)

    async def mark_running(self, shard: int, specs: list[TaskSpec]) -> None:
        from actors.handles import call_shard

        await call_shard(shard, self._namespace, "mark_running", specs)


class DispatcherShell:
    """Builds the Dispatcher once the executor pool answers; reconciles
    with executors every ``reconcile_s``."""

    def __init__(self, settings, reconcile_s: float = 2.0) -> None:
        from actors.handles import POOL_NAME

        self._settings = settings
        self._pool = ray.get_actor(POOL_NAME, namespace=settings.namespace)
        self._reconcile_s = reconcile_s
        self._dispatcher: Dispatcher | None = None
        # __init__ runs inside the actor's event loop (Ray async actors).
        self._starting = asyncio.ensure_future(self._start())

    async def _ready(self) -> Dispatcher:
        if self._dispatcher is None:
            await asyncio.shield(self._starting)
        assert self._dispatcher is not None
        return self._dispatcher

    async def _start(self) -> None:
        infos = await self._pool.executors.remote()
        self._dispatcher = Dispatcher(
            tiers=self._settings.tiers,
            executors=[
                ExecutorSlots(
                    executor_id=i.executor_id,
                    tier=i.tier,
                    tier_rank=i.tier_rank,
                    slots=i.slots,
                    client=_RayExecutor(i.handle),
                )
                for i in infos
            ],
            shards=_RayShards(self._settings.namespace),
            max_queued=self._settings.dispatcher_max_queued,
        )
        await self._dispatcher.reconcile()
        asyncio.ensure_future(self._reconcile_forever())

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self._reconcile_s)
            try:
                await self._dispatcher.reconcile()
            except Exception:
                log.exception("reconcile failed")

    async def hello(self) -> str:
        return await (await self._ready()).hello()

    async def room(self) -> int:
        return await (await self._ready()).room()

    async def submit(self, specs: list[TaskSpec]) -> int:
        return await (await self._ready()).submit(specs)

    async def report_results(self, results: list[RunResult]) -> None:
        await (await self._ready()).report_results(results)

    async def cancel(self, keys: list[tuple[int, int]]) -> None:
        await (await self._ready()).cancel(keys)

    async def stats(self) -> dict:
        return (await self._ready()).stats()

    async def settings(self):
        """How drivers (chronoray.Client) learn the deployment's settings."""
        return self._settings


DispatcherActor = ray.remote(max_restarts=-1, max_task_retries=-1)(DispatcherShell)
