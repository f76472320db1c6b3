"""A shard owns the tasks of its time ranges: it stores submissions (group
commit), fires each due task on a precise timer, and records outcomes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

import ray

from actors.batching import GroupCommitter
from actors.handles import DispatcherCalls, ShardHints
from actors.heap import settle_after_start
from actors.results import ResultRecorder
from chronoray.metrics import ShardMetrics
from chronoray.settings import Settings
from scheduling.clock import Clock, SystemClock
from scheduling.errors import ChronorayError, Unavailable
from scheduling.fire_timer import FireTimer
from scheduling.models import CommittedResults, NewTask, RunResult, SubmitResult, TaskSpec
from scheduling.timeline import within_lookahead
from storage.repository import ShardStore

log = logging.getLogger(__name__)


class DispatcherLink(Protocol):
    async def hello(self) -> str: ...
    async def room(self) -> int: ...
    async def submit(self, specs: list[TaskSpec]) -> int: ...
    async def cancel(self, keys: list[tuple[int, int]]) -> None: ...


class ShardPeers(Protocol):
    async def track(self, shard: int, entries: list[tuple[int, datetime]]) -> None: ...


class Superseded(Exception):
    """A newer incarnation of this shard started (a second owner on the same
    database): this one's claims are fenced off until it starts again."""


class Shard:
    """Plain class: the actor below wraps it. Every public method is safe to
    call twice (Ray replays calls to a restarted actor)."""

    MAX_TIMER_WAIT_S = 1.0  # cap sleeps: long epoll waits wake late

    def __init__(
        self,
        *,
        index: int,
        repo: ShardStore,
        dispatcher: DispatcherLink,
        peers: ShardPeers,
        settings: Settings,
        clock: Clock | None = None,
    ) -> None:
        self.index = index
        self.epoch = 0
        self._repo = repo
        self._dispatcher = dispatcher
        self._peers = peers
        self._settings = settings
        self._wheel = settings.wheel
        self._clock = clock or SystemClock()
        self._timer = FireTimer()
        self._room = settings.dispatcher_max_queued
        self._dispatcher_seen: str | None = None
        self._committer: GroupCommitter[NewTask, SubmitResult | ChronorayError] = GroupCommitter(
            self._store
        )
        self._unsent: list[TaskSpec] = []  # claimed, not yet taken by the dispatcher
        self._claims_in_doubt = False  # a claim failed: it may have committed
        self.wake = asyncio.Event()
        self.metrics = ShardMetrics()
        self._results = ResultRecorder(repo, settings, name=f"shard {index}", clock=self._clock)
        self.accepting = True  # False once `chronoray down` began

    async def _io(self, fn, *args, **kwargs):
        """Blocking database calls leave the event loop free for timers."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def start(self) -> int:
        self.epoch = await self._io(self._repo.start_shard, self.index, now=self._clock.now())
        log.info("shard %d started at epoch %d", self.index, self.epoch)
        await self.sweep()
        return self.epoch

    async def _check_epoch(self) -> None:
        current = await self._io(self._repo.shard_epoch, self.index)
        if current != self.epoch:
            raise Superseded(f"shard {self.index}: epoch {self.epoch} superseded by {current}")

    # -- submissions -----------------------------------------------------
    async def submit(self, new_tasks: Sequence[NewTask]) -> list[SubmitResult | ChronorayError]:
        if not self.accepting:
            raise Unavailable(f"shard {self.index} is shutting down")
        return await self._committer.submit(list(new_tasks))

    async def _store(self, batch: list[NewTask]) -> list[SubmitResult | ChronorayError]:
        results = await self._io(self._repo.add_tasks, batch, now=self._clock.now())
        self.metrics.submitted.inc(sum(1 for r in results if getattr(r, "created", False)))
        await self._route(
            [(r.task.task_id, r.task.execute_at) for r in results if isinstance(r, SubmitResult)]
        )
        return results

    async def track(self, entries: Sequence[tuple[int, datetime]]) -> None:
        """Watch these tasks if they fall inside the look-ahead window."""
        self._watch(self._soon(entries))

    def _watch(self, soon: Sequence[tuple[int, datetime]]) -> None:
        for task_id, due_at in soon:
            self._timer.add(task_id, due_at)
        self.wake.set()

    def _soon(self, entries: Sequence[tuple[int, datetime]]) -> list[tuple[int, datetime]]:
        return within_lookahead(
            entries, now=self._clock.now(), lookahead_s=self._settings.lookahead_s
        )

    async def _route(self, entries: Sequence[tuple[int, datetime]]) -> None:
        """Track our own tasks; tell the owner shard about the others (only
        those inside the look-ahead: the owner would drop the rest, which
        its sweep finds in time)."""
        by_shard: dict[int, list[tuple[int, datetime]]] = {}
        for task_id, due_at in self._soon(entries):
            by_shard.setdefault(self._wheel.owner_of(task_id, due_at), []).append((task_id, due_at))
        for shard, owned in by_shard.items():
            if shard == self.index:
                self._watch(owned)  # already inside the look-ahead
            else:
                await self._peers.track(shard, owned)

    # -- firing ------------------------------------------------------------
    def next_wake_s(self) -> float:
        return self._timer.seconds_until_next(
            now=self._clock.now(),
            lead_s=self._settings.prefire_ms / 1000.0,
            cap_s=self.MAX_TIMER_WAIT_S,
        )

    async def fire_due(self) -> int:
        """Claim what is due (or within the prefire lead) and hand it over,
        no more than the dispatcher has room for."""
        await self._hand_over()
        if self._room <= 0:
            self._room = await self._dispatcher.room()
            if self._room <= 0:
                return 0
        now = self._clock.now()
        limit = min(self._room, self._settings.claim_batch)
        due = self._timer.pop_due(now=now, lead_s=self._settings.prefire_ms / 1000.0, limit=limit)
        if not due:
            return 0
        lease_until = now + timedelta(seconds=self._settings.queue_lease_s)
        try:
            claimed = await self._io(
                self._repo.claim,
                due,
                shard=self.index,
                epoch=self.epoch,
                lease_until=lease_until,
                now=now,
            )
        except Exception:
            # Committed, with the answer lost (a database restart)? Then these
            # are queued with no one to hand them over: the next sweep does.
            self._claims_in_doubt = True
            raise
        if not (claimed.specs or claimed.follow_ups or claimed.cancelled):
            await self._check_epoch()  # nothing claimed: taken by someone else, or fenced off?
        self._unsent.extend(claimed.specs)
        self.metrics.fired.inc(len(claimed.specs))
        await self._route(claimed.follow_ups)
        if claimed.cancelled:  # a cancel_previous schedule stopped these attempts
            await self._dispatcher.cancel(claimed.cancelled)
        await self._hand_over()
        return len(claimed.specs)

    async def _hand_over(self) -> None:
        """Claimed attempts go to the dispatcher; a failed hand-over is kept
        and tried again on the next turn of the loop (and, should this shard
        die, the next incarnation hands over everything still queued)."""
        batch, self._unsent = self._unsent, []
        if batch:
            try:
                self._room = await self._dispatcher.submit(batch)
            except BaseException:
                self._unsent = batch + self._unsent
                raise

    # -- outcomes ------------------------------------------------------------
    async def record_results(self, results: Sequence[RunResult]) -> int:
        """Commit these outcomes (results no executor committed: attempts
        lost with their executors); returns how many tasks were put back to
        be run again (retries)."""
        committed = await self._results.record(results)
        await self.results_committed(committed)
        return len(committed.watch)

    async def results_committed(self, committed: CommittedResults) -> None:
        """Count what a commit decided (the outcomes of this shard's own
        commits; the dispatcher counts executors'), and put the tasks it
        sent back (or that waited for a run to end) on their owners' timers."""
        self.metrics.count(committed.outcomes)
        await self._route(committed.watch)

    # -- the safety net --------------------------------------------------------
    async def sweep(self) -> None:
        """Pick up what a fast path missed: due tasks not yet on the timer,
        expired leases, and queued tasks a restarted dispatcher forgot."""
        await self._check_epoch()
        now = self._clock.now()
        due = await self._io(
            self._repo.due_tasks,
            wheel=self._wheel,
            shard=self.index,
            before=now + timedelta(seconds=self._settings.lookahead_s),
            limit=50_000,
        )
        await self.track(due)
        stale = await self._io(
            self._repo.stale_queued,
            wheel=self._wheel,
            shard=self.index,
            now=now,
            lease_until=now + timedelta(seconds=self._settings.queue_lease_s),
            limit=10_000,
        )
        if stale:
            # A hand-over that never arrived, or a task still waiting for a
            # slot: offer it again (the dispatcher ignores what it holds).
            log.warning("shard %d: %d queued tasks handed over again", self.index, len(stale))
            self._room = await self._dispatcher.submit(stale)
        self._room = await self._dispatcher.room()
        incarnation = await self._dispatcher.hello()
        new_dispatcher = incarnation != self._dispatcher_seen and (
            self._dispatcher_seen is not None or self.epoch > 1
        )
        if new_dispatcher or self._claims_in_doubt:
            # A new dispatcher lost its heap; a restarted shard may have died
            # between a claim and its hand-over; a claim may have committed
            # with its answer lost. Either way the dispatcher ignores
            # attempts it already holds or has finished.
            queued = await self._io(
                self._repo.queued_specs, wheel=self._wheel, shard=self.index, limit=50_000
            )
            if queued:
                log.info("shard %d: handing %d queued tasks over again", self.index, len(queued))
                self._room = await self._dispatcher.submit(queued)
            self._claims_in_doubt = False
        self._dispatcher_seen = incarnation

    # -- history retention ----------------------------------------------------
    async def purge_history(self, *, max_batches: int = 1000) -> int:
        """Remove finished tasks (and their runs) older than the retention,
        a batch per transaction, so no lock is held long; between batches
        the loop fires on time (each batch runs off the event loop)."""
        days = self._settings.retention_days
        if not days:
            return 0
        before = self._clock.now() - timedelta(days=days)
        removed = 0
        for _ in range(max_batches):
            batch = await self._io(
                self._repo.purge_finished, before=before, limit=self._settings.retention_batch
            )
            removed += batch
            if batch < self._settings.retention_batch:
                break
        if removed:
            log.info(
                "shard %d: %d finished tasks older than %g days removed", self.index, removed, days
            )
        return removed

    async def run(self, stop: asyncio.Event) -> None:
        """The timer loop and the periodic sweep, until ``stop`` is set."""
        last_sweep = self._clock.now()
        while not stop.is_set():
            try:
                while await self.fire_due():
                    pass
                if (
                    self._clock.now() - last_sweep
                ).total_seconds() >= self._settings.sweep_interval_s:
                    last_sweep = self._clock.now()
                    await self.sweep()
            except Superseded:
                raise
            except Exception:
                log.exception("shard %d: loop iteration failed", self.index)
                await asyncio.sleep(0.5)
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=self.next_wake_s())
            except asyncio.TimeoutError:
                pass


# -- Ray shell ---------------------------------------------------------------


class ShardShell:
    """The actor: builds its Shard from settings, rebuilds state from the
    database on every (re)start, and runs the timer loop."""

    def __init__(self, index: int, settings: Settings) -> None:
        from storage.sql import SqlTaskRepository

        self._shard = Shard(
            index=index,
            repo=SqlTaskRepository.connect(settings.database_url, misfire_rules=settings.misfire),
            dispatcher=DispatcherCalls(settings.namespace),
            peers=ShardHints(settings.namespace),
            settings=settings,
        )
        self._namespace = settings.namespace
        self._settings = settings
        self._stop = asyncio.Event()
        # Ray runs __init__ inside the actor's event loop: start at once, so a
        # restarted shard fires its tasks without waiting to be called.
        self._started = asyncio.ensure_future(self._start())
        settle_after_start()

    async def _ready(self) -> Shard:
        await asyncio.shield(self._started)
        return self._shard

    async def _start(self) -> None:
        await self._new_epoch()
        asyncio.ensure_future(self._run())
        if self._shard.index == 0:  # one shard keeps the history short
            asyncio.ensure_future(self._retain_forever())

    async def _retain_forever(self) -> None:
        """Beside the timer loop, not in it: a long purge never delays a fire."""
        while not self._stop.is_set():
            try:
                await self._shard.purge_history()
            except Exception:
                log.exception("shard %d: history retention failed; next round", self._shard.index)
            try:
                await asyncio.wait_for(self._stop.wait(), self._settings.retention_interval_s)
            except asyncio.TimeoutError:
                pass

    async def _new_epoch(self) -> None:
        while True:
            try:
                await self._shard.start()
                return
            except Exception:
                log.exception("shard %d could not start; retrying", self._shard.index)
                await asyncio.sleep(1.0)

    async def _run(self) -> None:
        """The loop; when another incarnation fenced this one off, the actor
        registered under the shard's name takes the shard back and any other
        (a process Ray already replaced) leaves."""
        while True:
            try:
                return await self._shard.run(self._stop)
            except Superseded as exc:
                if not await asyncio.to_thread(self._holds_the_name):
                    log.error("%s; this process is no longer the shard's actor: exiting", exc)
                    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                    return
                log.warning("%s; taking the shard back", exc)
                await self._new_epoch()

    def _holds_the_name(self) -> bool:
        from actors.handles import named_actor, shard_name

        named = named_actor(shard_name(self._shard.index), self._namespace)
        return named is not None and named == ray.get_runtime_context().current_actor

    async def ready(self) -> int:
        return (await self._ready()).epoch

    async def submit(self, new_tasks: list[NewTask]):
        return await (await self._ready()).submit(new_tasks)

    async def track(self, entries: list[tuple[int, datetime]]) -> None:
        await (await self._ready()).track(entries)

    async def record_results(self, results: list[RunResult]) -> int:
        return await (await self._ready()).record_results(results)

    async def results_committed(self, committed: CommittedResults) -> None:
        await (await self._ready()).results_committed(committed)

    async def metrics(self) -> list:
        """This shard's Prometheus metric families (gathered by GET /metrics)."""
        return (await self._ready()).metrics.families()

    async def stop(self) -> None:
        """Take no more submissions and fire nothing more; results are still
        recorded (what runs now can finish)."""
        self._shard.accepting = False
        self._stop.set()

    async def pid(self) -> int:
        """For operators and fault tests."""
        import os

        return os.getpid()


ShardActor = ray.remote(max_restarts=-1, max_task_retries=-1)(ShardShell)
