"""The dispatcher: one heap of ready tasks, placed on executors of the right
tier as slots free up; results go back to the shard that owns each task."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import ray

from actors.batching import GroupCommitter
from actors.executor import ExecutorDraining
from actors.handles import ExecutorCalls, ShardResults
from actors.heap import settle_after_start
from chronoray.metrics import OutcomeMetrics
from scheduling.clock import Clock, SystemClock
from scheduling.lifecycle import lost_result
from scheduling.models import CommittedResults, RunResult, TaskSpec
from scheduling.placement import FreeSlots
from scheduling.ready_queue import ReadyQueue
from scheduling.tiers import TierTable

log = logging.getLogger(__name__)

FINISHED_MEMORY = 200_000
# A queued attempt leased this long ago that no one holds was dropped on its
# way (see ``_recover_dropped``): placed again rather than left to its lease.
DROPPED_AFTER_S = 30.0
# How long a loss is reported again while its shard does not answer (a
# shard a redeploy removed never will); after that the net above has it.
LOSS_REPORTED_FOR_S = 60.0


class ExecutorClient(Protocol):
    async def run_batch(self, specs: list[TaskSpec]) -> int: ...
    async def running(self) -> list[TaskSpec]: ...
    async def holding(self) -> list[tuple[int, int]]: ...
    async def cancel(self, keys: list[tuple[int, int]]) -> int: ...


class ShardLink(Protocol):
    """How the dispatcher talks back to shards."""

    async def record_results(self, shard: int, results: list[RunResult]) -> None:
        """Returns once the shard has committed them."""

    async def results_committed(self, shard: int, committed: CommittedResults) -> None:
        """Returns once the shard took in what a commit elsewhere decided."""


@dataclass(kw_only=True)
class ExecutorSlots:
    executor_id: str
    tier: str
    tier_rank: int
    slots: int
    client: ExecutorClient
    in_flight: dict[tuple[int, int], TaskSpec] = field(default_factory=dict)
    # Placed, and the call that hands them over not yet answered: the
    # executor may take them after it has answered anything else.
    sending: set[tuple[int, int]] = field(default_factory=set)
    accepting: bool = True
    node: str = ""  # the Ray node it runs on, recorded with the attempts it loses
    # The credit window: attempts it may hold per slot. Beyond its slots they
    # wait at the executor, which starts the next one itself when a slot
    # frees, without a round trip through the dispatcher.
    credits: int = 1

    @property
    def free(self) -> int:
        return self.slots * self.credits - len(self.in_flight) if self.accepting else 0


class Dispatcher:
    def __init__(
        self,
        *,
        tiers: TierTable,
        executors: Sequence[ExecutorSlots],
        shards: ShardLink,
        max_queued: int,
        aging_s: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        self.incarnation = uuid.uuid4().hex
        self._tiers = tiers
        self._executors = list(executors)
        self._shards = shards
        self._max_queued = max_queued
        self._clock = clock or SystemClock()
        self._queue = ReadyQueue(aging_s=aging_s, rank_of=tiers.index_for)
        self.late_results = 0  # results of attempts already given up on (shards ignore them)
        # Attempts lost with an executor declared dead, until their shards
        # have committed the loss: dropped, such an attempt would wait as
        # queued in the database until its lease ran out.
        self._losses: dict[tuple[int, int], RunResult] = {}
        # Attempts that finished recently: a shard that restarts hands over
        # every task still ``queued`` in the database, including ones whose
        # result is on its way back; these must not run again.
        self._finished: dict[tuple[int, int], None] = {}
        # Results from every executor, one commit per shard at a time; each
        # executor hears back only after its results are committed.
        self._results: dict[int, GroupCommitter[RunResult, None]] = {}
        # What executors' own commits put back on a timer, one call per shard
        # at a time (any shard routes an entry to its owner).
        self._announced: dict[int, GroupCommitter[CommittedResults, None]] = {}
        self.orphans_recovered = 0  # running in the database, held by no executor
        self.dropped_recovered = 0  # queued long in the database, held by no one
        self.metrics = OutcomeMetrics()  # of the results executors committed
        self.draining = False  # `chronoray down`: nothing more is placed

    async def hello(self) -> str:
        """Shards compare this across calls: a new value means the heap was
        lost with a restart and their queued tasks must be handed over again."""
        return self.incarnation

    async def room(self) -> int:
        return max(0, self._max_queued - len(self._queue))

    def _placed(self) -> set[tuple[int, int]]:
        """Keys of the attempts placed on an executor and not yet reported."""
        return {key for ex in self._executors for key in ex.in_flight}

    async def submit(self, specs: Sequence[TaskSpec]) -> int:
        placed = self._placed()
        self._queue.push_many(
            s for s in specs if s.key not in placed and s.key not in self._finished
        )
        await self._place()
        return await self.room()

    async def report_results(
        self, results: Sequence[RunResult], committed: CommittedResults | None = None
    ) -> None:
        """Free the attempts' slots at once; return when their shards have
        committed them, or, where the executor committed them (``committed``
        says what that decided), counted their outcomes here and, where the
        commit put tasks back on a timer, told a shard. Until then the
        executor keeps them and sends them again."""
        self._finish(results)
        await self._place()
        if committed is not None:
            if committed.watch:  # retries to time, occurrences that waited for this run
                first = min((o.result.shard for o in committed.outcomes), default=0)
                await self._announcer(first).submit([CommittedResults(watch=committed.watch)])
            # Counted once the shards have what they need: a report sent
            # again after a failed announcement is not counted twice.
            self.metrics.count(committed.outcomes)
            return
        await self._record(results)

    def _finish(self, results: Sequence[RunResult]) -> None:
        """Free these attempts' slots; remember them as finished."""
        for result in results:
            key = (result.task_id, result.attempt)
            held = [ex for ex in self._executors if ex.in_flight.pop(key, None) is not None]
            if not held and key in self._finished:
                self.late_results += 1
            self._finished[key] = None
        while len(self._finished) > FINISHED_MEMORY:
            del self._finished[next(iter(self._finished))]

    async def _record(self, results: Sequence[RunResult]) -> None:
        """Returns once each result's shard has committed it."""
        by_shard: dict[int, list[RunResult]] = {}
        for result in results:
            by_shard.setdefault(result.shard, []).append(result)
        await asyncio.gather(
            *(self._committer(shard).submit(batch) for shard, batch in by_shard.items())
        )

    def _announcer(self, shard: int) -> GroupCommitter[CommittedResults, None]:
        if shard not in self._announced:

            async def announce(parts: list[CommittedResults], shard: int = shard) -> list[None]:
                await self._shards.results_committed(shard, sum(parts, CommittedResults()))
                return [None] * len(parts)

            self._announced[shard] = GroupCommitter(announce, isolate=False)
        return self._announced[shard]

    def _committer(self, shard: int) -> GroupCommitter[RunResult, None]:
        if shard not in self._results:

            async def record(batch: list[RunResult], shard: int = shard) -> list[None]:
                await self._shards.record_results(shard, batch)
                return [None] * len(batch)

            self._results[shard] = GroupCommitter(record, isolate=False)
        return self._results[shard]

    async def recover(
        self, running: Sequence[TaskSpec], queued: Sequence[TaskSpec]
    ) -> tuple[list[RunResult], list[TaskSpec]]:
        """The net under lost and dropped attempts, on one answer from every
        executor (``_held``): ``running`` and ``queued`` are what the
        database said, read before this call. Returns the orphans reported
        lost and the dropped attempts placed again. Any executor that does
        not answer makes this a no-op: it may hold any of them."""
        if not running and not queued:
            return [], []
        held = await self._held()
        if held is None:
            return [], []
        return await self._recover_orphans(running, held), await self._recover_dropped(queued, held)

    async def _recover_orphans(
        self, running: Sequence[TaskSpec], held: set[tuple[int, int]]
    ) -> list[RunResult]:
        """Running attempts that no executor holds (their executor died with
        a dispatcher or a whole cluster) are lost: reported at once as
        ``executor_lost``. A result committed in between makes the report a
        no-op, since records are conditional on the attempt."""
        now = self._clock.now()
        lost = [
            lost_result(spec, now=now, reason="running, but no live executor holds it")
            for spec in running
            if spec.key not in held
        ]
        if lost:
            log.warning("%d running attempts held by no executor: retried", len(lost))
            self.orphans_recovered += len(lost)
            await self.report_results(lost)
        return lost

    async def _recover_dropped(
        self, queued: Sequence[TaskSpec], held: set[tuple[int, int]]
    ) -> list[TaskSpec]:
        """Attempts queued in the database since long ago that this
        dispatcher neither waits on, placed, finished nor lost, and that no
        executor holds, were dropped on their way (a hand-over or a loss
        report that never arrived): placed again now, not when their
        10-minute lease ends. Should a copy still be on its way after all,
        the start gate lets one start."""
        if not queued or self.draining:
            return []
        placed = self._placed()
        dropped = [
            spec
            for spec in queued
            if spec.key not in held
            and spec.key not in placed
            and spec.key not in self._queue
            and spec.key not in self._finished
            and spec.key not in self._losses
        ]
        if dropped:
            log.warning("%d queued attempts held by no one: placed again", len(dropped))
            self.dropped_recovered += len(dropped)
            self._queue.push_many(dropped)
            await self._place()
        return dropped

    async def drain(self) -> int | None:
        """Place nothing more (queued attempts stay queued in the database
        for the next start) and say how many attempts executors still run or
        hold unacknowledged results of; None if an executor did not answer."""
        self.draining = True
        held = await self._held()
        return None if held is None else len(held)

    async def _held(self) -> set[tuple[int, int]] | None:
        """Every attempt the executors hold (running, or a result not yet
        acknowledged); None if any executor did not answer."""
        members = list(self._executors)  # sync_members may replace the list meanwhile
        answers = await asyncio.gather(
            *(ex.client.holding() for ex in members), return_exceptions=True
        )
        held: set[tuple[int, int]] = set()
        for ex, answer in zip(members, answers, strict=True):
            if isinstance(answer, BaseException):
                log.info("executor %s did not say what it holds", ex.executor_id)
                return None
            held.update(tuple(key) for key in answer)
        return held

    async def cancel(self, keys: Sequence[tuple[int, int]]) -> None:
        """Stop these attempts: drop them from the heap, kill them where they
        run (their rows are already final, so late results change nothing)."""
        wanted = {tuple(k) for k in keys}
        waiting = self._queue.remove(wanted)
        placed = self._placed()
        # Neither waiting nor placed here: running where this dispatcher does
        # not know (it restarted, or a reconcile is catching up), or done.
        # Every executor is asked; one that does not hold it ignores it.
        unknown = wanted - waiting - placed
        for ex in self._executors:
            mine = [k for k in wanted if k in ex.in_flight] + sorted(unknown)
            if mine:
                try:
                    await ex.client.cancel(mine)
                except Exception:
                    log.warning("executor %s did not take a cancel", ex.executor_id, exc_info=True)
                for key in mine:
                    ex.in_flight.pop(key, None)
        self._finished.update(dict.fromkeys(wanted))
        await self._place()

    def stats(self) -> dict[str, Any]:
        return {
            "incarnation": self.incarnation,
            "queued": len(self._queue),
            "queued_by_priority": self._queue.depth_by_priority(),
            "late_results": self.late_results,
            "orphans_recovered": self.orphans_recovered,
            "dropped_recovered": self.dropped_recovered,
            "executors": {
                ex.executor_id: {
                    "tier": ex.tier,
                    "slots": ex.slots,
                    "credits": ex.credits,
                    "running": len(ex.in_flight),  # assigned: running, or waiting there for a slot
                    "accepting": ex.accepting,
                }
                for ex in self._executors
            },
        }

    def depth_by_priority(self) -> dict[int, int]:
        return self._queue.depth_by_priority()

    def running_by_tier(self) -> dict[str, int]:
        running = {tier.name: 0 for tier in self._tiers}
        for ex in self._executors:
            running[ex.tier] = running.get(ex.tier, 0) + len(ex.in_flight)
        return running

    def demand(self) -> dict[str, int]:
        """Per tier: tasks that want it (queued at its priorities, plus
        running on it). The pool sizes each tier for this."""
        wanted = self.running_by_tier()
        for priority, count in self._queue.depth_by_priority().items():
            wanted[self._tiers.tier_for(priority).name] += count
        return wanted

    async def sync_members(self, members: Sequence[ExecutorSlots]) -> list[RunResult]:
        """Follow the pool's membership: add new executors, mark draining
        ones, and drop the ones declared dead. Their attempts are reported
        to their shards as ``executor_lost`` at once (retried without
        waiting for the lease), and again on every call until a report
        gets through; returns the attempts lost since the last call."""
        known = {ex.executor_id: ex for ex in self._executors}
        current = {m.executor_id for m in members}
        now = self._clock.now()
        lost: list[RunResult] = []
        for ex in self._executors:
            if ex.executor_id not in current:
                log.warning("executor %s gone with %d attempts", ex.executor_id, len(ex.in_flight))
                lost += [
                    lost_result(
                        spec,
                        now=now,
                        executor_id=ex.executor_id,
                        tier=ex.tier,
                        node_id=ex.node,
                        reason=f"executor {ex.executor_id} declared dead",
                    )
                    for spec in ex.in_flight.values()
                ]
        executors = []
        for member in members:
            ex = known.get(member.executor_id)
            if ex is None:
                ex = member
            ex.accepting = member.accepting
            executors.append(ex)
        self._executors = executors
        self._finish(lost)
        self._losses.update((r.key, r) for r in lost)
        await self._place()
        await self._report_losses()
        return lost

    async def _report_losses(self) -> None:
        losses = list(self._losses.values())
        if not losses:
            return
        try:
            await self._record(losses)
        except Exception:
            log.warning("%d lost attempts not yet reported; again soon", len(losses), exc_info=True)
            now = self._clock.now()
            for loss in losses:
                if (now - loss.finished_at).total_seconds() > LOSS_REPORTED_FOR_S:
                    # Given up: its row is still queued, and the net (or its
                    # lease) offers it again, which must not be ignored here.
                    del self._losses[loss.key]
                    self._finished.pop(loss.key, None)
            return
        for loss in losses:
            self._losses.pop(loss.key, None)

    async def reconcile(self) -> None:
        """Align slot counts with what executors really run: a restarted
        dispatcher learns what is still running; an attempt an executor no
        longer has (it was fenced) is left to its lease."""
        for ex in self._executors:
            before = dict(ex.in_flight)
            on_the_way = set(ex.sending)
            try:
                actual = await ex.client.running()
            except Exception:
                log.warning("executor %s did not answer", ex.executor_id)
                continue
            # What changed while the executor answered stays changed: an
            # attempt placed meanwhile is kept, one finished meanwhile is not
            # brought back. One on its way is kept too: Ray may run the
            # executor's answer before the call that hands it over.
            unsettled = {
                k: s for k, s in ex.in_flight.items() if k not in before or k in on_the_way
            }
            ex.in_flight = {
                spec.key: spec
                for spec in actual
                if spec.key in ex.in_flight or spec.key not in before
            } | unsettled
        await self._place()

    async def _place(self) -> None:
        """One pass: the queue's order, each task on the weakest eligible tier
        with room, then its least busy executor (``FreeSlots``); the pass
        ends as soon as no queued task has a free slot it may use."""
        if self.draining:
            return
        by_id = {ex.executor_id: ex for ex in self._executors}
        free = FreeSlots((ex.tier_rank, ex.executor_id, ex.free) for ex in self._executors)
        placed = self._queue.take(free)
        if not placed:
            return
        per_executor: dict[str, tuple[ExecutorSlots, list[TaskSpec]]] = {}
        for spec, executor_id in placed:
            ex = by_id[executor_id]
            ex.in_flight[spec.key] = spec  # reserved until the executor reports it
            ex.sending.add(spec.key)
            per_executor.setdefault(executor_id, (ex, []))[1].append(spec)
        await asyncio.gather(*(self._send(ex, specs) for ex, specs in per_executor.values()))

    async def _send(self, ex: ExecutorSlots, specs: list[TaskSpec]) -> None:
        try:
            await ex.client.run_batch(specs)
            return
        except ExecutorDraining:  # the pool retires it; the membership says so soon
            ex.accepting = False
            log.info("executor %s is draining: %d tasks placed again", ex.executor_id, len(specs))
        except Exception:
            log.warning(
                "executor %s refused %d tasks; requeued", ex.executor_id, len(specs), exc_info=True
            )
        finally:
            ex.sending.difference_update(spec.key for spec in specs)
        for spec in specs:
            ex.in_flight.pop(spec.key, None)
        # Not one reported lost meanwhile (its executor was declared dead):
        # that attempt is over, and its retry is a new one.
        self._queue.push_many(spec for spec in specs if spec.key not in self._finished)


# -- Ray shell ---------------------------------------------------------------


class DispatcherShell:
    """Builds the Dispatcher, then follows the pool's membership every
    ``membership_s`` and reconciles with executors every ``reconcile_s``;
    publishes itself in ZooKeeper when configured."""

    def __init__(
        self,
        settings,
        reconcile_s: float = 2.0,
        membership_s: float = 0.5,
        recover_s: float = 5.0,
    ) -> None:
        from actors.handles import pool_handle
        from storage.sql import SqlTaskRepository

        self._settings = settings
        self._pool = pool_handle(settings.namespace)
        self._repo = SqlTaskRepository.connect(settings.database_url, pool_size=2)
        self._reconcile_s = reconcile_s
        self._membership_s = membership_s
        self._recover_s = recover_s
        self._members_known = False  # the pool answered since this incarnation began
        self._dispatcher = Dispatcher(
            tiers=settings.tiers,
            executors=[],
            shards=ShardResults(settings.namespace),
            max_queued=settings.dispatcher_max_queued,
            aging_s=settings.aging_s,
        )
        self._mirror = None
        if settings.zookeeper_hosts:
            from actors.zk_mirror import DISPATCHER as DISPATCHER_ZNODE
            from actors.zk_mirror import ZnodeMirror

            self._mirror = ZnodeMirror(
                settings.zookeeper_hosts,
                DISPATCHER_ZNODE,
                session_timeout_s=settings.zookeeper_session_timeout_s,
            )
        # __init__ runs inside the actor's event loop (Ray async actors).
        self._starting = asyncio.ensure_future(self._start())
        settle_after_start()

    async def _ready(self) -> Dispatcher:
        if not self._starting.done():
            await asyncio.shield(self._starting)
        return self._dispatcher

    async def _start(self) -> None:
        try:
            await self._follow_pool()
            await self._dispatcher.reconcile()
            await self._recover()
        except Exception:
            log.warning("pool not reachable yet; following it from now on", exc_info=True)
        asyncio.ensure_future(self._every(self._membership_s, self._follow_pool))
        asyncio.ensure_future(self._every(self._reconcile_s, self._dispatcher.reconcile))
        asyncio.ensure_future(self._every(self._recover_s, self._recover))

    async def _recover(self) -> None:
        """Running attempts no executor holds (their executor died, perhaps
        with the whole cluster) are retried at once, and queued ones dropped
        on their way placed again, neither left to a lease."""
        if not self._members_known:
            return  # an empty membership would make every running attempt look orphaned
        running = await asyncio.to_thread(
            self._repo.running_specs, wheel=self._settings.wheel, limit=50_000
        )
        leased_by = datetime.now(UTC) - timedelta(seconds=DROPPED_AFTER_S)
        queued = await asyncio.to_thread(
            self._repo.long_queued,
            wheel=self._settings.wheel,
            lease_ends_before=leased_by + timedelta(seconds=self._settings.queue_lease_s),
            limit=1_000,
        )
        await self._dispatcher.recover(running, queued)

    async def _follow_pool(self) -> None:
        infos = await asyncio.wait_for(self._pool.executors.remote(), timeout=5)
        await self._dispatcher.sync_members(
            [
                ExecutorSlots(
                    executor_id=i.executor_id,
                    tier=i.tier,
                    tier_rank=i.tier_rank,
                    slots=i.slots,
                    client=ExecutorCalls(i.handle),
                    accepting=i.accepting,
                    credits=self._settings.executor_credits,
                    node=i.node,
                )
                for i in infos
            ]
        )
        self._members_known = True
        if self._mirror is not None:
            stats = self._dispatcher.stats()
            self._mirror.publish(
                {
                    "incarnation": stats["incarnation"],
                    "node": ray.get_runtime_context().get_node_id(),
                    "pid": os.getpid(),
                    "queued": stats["queued"],
                    "executors": len(stats["executors"]),
                    "updated_at": time.time(),
                }
            )

    @staticmethod
    async def _every(period_s: float, step) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await step()
            except Exception:
                log.warning("%s failed", getattr(step, "__name__", step), exc_info=True)

    async def demand(self) -> dict[str, int]:
        return (await self._ready()).demand()

    async def hello(self) -> str:
        return await (await self._ready()).hello()

    async def room(self) -> int:
        return await (await self._ready()).room()

    async def submit(self, specs: list[TaskSpec]) -> int:
        return await (await self._ready()).submit(specs)

    async def report_results(
        self, results: list[RunResult], committed: CommittedResults | None = None
    ) -> None:
        await (await self._ready()).report_results(results, committed)

    async def cancel(self, keys: list[tuple[int, int]]) -> None:
        await (await self._ready()).cancel(keys)

    async def stats(self) -> dict:
        return (await self._ready()).stats()

    async def drain(self) -> int | None:
        return await (await self._ready()).drain()

    async def metrics(self) -> list:
        """Queue depth per priority, running attempts per tier, and the
        outcomes of what executors committed (Prometheus)."""
        from chronoray.metrics import dispatcher_families

        dispatcher = await self._ready()
        return [
            *dispatcher_families(dispatcher.depth_by_priority(), dispatcher.running_by_tier()),
            *dispatcher.metrics.families(),
        ]

    async def settings(self):
        """How drivers (chronoray.Client) learn the deployment's settings."""
        return self._settings

    async def pid(self) -> int:
        """For operators and fault tests."""
        return os.getpid()


DispatcherActor = ray.remote(max_restarts=-1, max_task_retries=-1)(DispatcherShell)
