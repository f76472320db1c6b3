"""The pool creates executors per tier with the Ray resources their tier
names, so Ray places each only where it fits; it watches their heartbeats,
probes the silent ones and declares dead those that do not answer, and
sizes each tier (scheduling.tiers.plan_size)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import ray

from actors.executor import EXECUTOR_PREFIX, ExecutorActor, Heartbeat
from actors.handles import named_actor
from actors.heap import settle_after_start
from scheduling.tiers import MemberView, PoolTiming, Tier, TierTable, plan_size

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ExecutorInfo:
    executor_id: str
    tier: str
    tier_rank: int  # position in the tier table: a task may use ranks >= its own
    slots: int
    handle: Any
    accepting: bool = True  # False while draining: finish what runs, take nothing new
    node: str = ""  # the Ray node it heartbeats from


class ExecutorFactory(Protocol):
    def create(self, tier: Tier, executor_id: str) -> Any: ...
    def destroy(self, handle: Any) -> None: ...


@dataclass(kw_only=True)
class Member:
    info: ExecutorInfo
    tier: Tier
    created_at: float
    last_heartbeat: float | None = None
    running: int = 0
    idle_since: float = 0.0
    draining: bool = False
    # Draining, and its last heartbeat said it holds nothing and takes
    # nothing new: only then is it removed (removing it on the pool's own
    # view lost attempts the dispatcher had just placed on it).
    drained: bool = False
    node: str = ""  # the Ray node id its heartbeats come from
    # Silent past the threshold and asked directly whether it is alive: a
    # heartbeat late behind a loaded box (a burst's executor, a pool that
    # stalled) declared live executors dead, and their attempts were lost.
    suspected_at: float | None = None

    @property
    def placed(self) -> bool:
        return self.last_heartbeat is not None


class ExecutorPool:
    """Which executors exist and which are alive. Executors heartbeat here;
    one that misses ``misses`` heartbeats is suspected and probed (the
    shell pings it); unless it answers, or heartbeats, within the probe's
    time it is declared dead and dropped from the membership the
    dispatcher follows (which retries its attempts), and a replacement is
    started. Each tier grows with demand and shrinks when idle, between its
    ``executors`` and ``most_executors``."""

    def __init__(
        self,
        *,
        tiers: TierTable,
        factory: ExecutorFactory,
        timing: PoolTiming = PoolTiming(),
        clock=time.monotonic,
        adopted: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._tiers = tiers
        self._factory = factory
        self._timing = timing
        self._clock = clock
        self._members: dict[str, Member] = {}
        self._dead: dict[str, tuple[float, Any]] = {}  # id -> (declared at, handle)
        self._unplaceable: dict[str, str] = {}  # tier -> why
        now = clock()
        for executor_id, handle in adopted:  # a restarted pool finds its executors again
            tier_name = executor_id.rsplit("-", 1)[0]
            try:
                tier = tiers.by_name(tier_name)
            except KeyError:
                factory.destroy(handle)  # a tier the table no longer has
                continue
            member = self._member(tier, executor_id, handle, now)
            member.last_heartbeat = now
        for tier in tiers:
            while len(self._of(tier)) < tier.executors:
                self._start(tier, now)

    # -- membership --------------------------------------------------------
    def heartbeat(
        self, executor_id: str, running: int, node: str = "", drained: bool = False
    ) -> Heartbeat:
        """DEAD tells the executor it was declared dead (it must fence);
        DRAIN that it is being retired (it takes nothing new, and says
        ``drained`` once it holds nothing). ``node``: the Ray node it runs
        on, for operators."""
        member = self._members.get(executor_id)
        if member is None:
            return Heartbeat.DEAD
        now = self._clock()
        member.drained = member.draining and drained
        member.last_heartbeat = now
        member.suspected_at = None
        member.node = node or member.node
        if running or member.running:
            member.idle_since = now
        member.running = running
        self._unplaceable.pop(member.tier.name, None)
        return Heartbeat.DRAIN if member.draining else Heartbeat.LIVE

    def executors(self) -> list[ExecutorInfo]:
        """Placed executors: what the dispatcher may use (draining and
        suspected ones only to finish their work)."""
        return [
            replace(m.info, accepting=not m.draining and m.suspected_at is None, node=m.node)
            for m in self._members.values()
            if m.placed
        ]

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "tiers": {
                tier.name: {
                    "live": sum(m.placed for m in self._of(tier)),
                    "starting": sum(not m.placed for m in self._of(tier)),
                    "min": tier.executors,
                    "max": tier.most_executors,
                    "resources": tier.actor_options(),
                    "unplaceable": self._unplaceable.get(tier.name),
                }
                for tier in self._tiers
            },
            "executors": [
                {
                    "executor_id": m.info.executor_id,
                    "tier": m.tier.name,
                    "slots": m.info.slots,
                    "running": m.running,
                    "state": "draining" if m.draining else "live" if m.placed else "starting",
                    "node": m.node or None,
                    "heartbeat_age_s": None
                    if m.last_heartbeat is None
                    else round(now - m.last_heartbeat, 3),
                    "suspected": m.suspected_at is not None,
                }
                for m in self._members.values()
            ],
        }

    # -- the periodic check -------------------------------------------------
    def tick(self, demand: Mapping[str, int]) -> list[ExecutorInfo]:
        """Suspect silent executors, declare dead the suspects whose probe
        never came back, report unplaceable tiers, and size each tier for
        ``demand`` (tasks wanting that tier: queued plus running). Returns
        the newly suspected executors (ExecutorInfo): the caller probes
        each and tells ``probed`` what it found."""
        now = self._clock()
        suspects = []
        silence = self._timing.heartbeat_s * self._timing.misses
        for member in list(self._members.values()):
            if member.placed:
                silent = now - member.last_heartbeat
                if member.suspected_at is not None:
                    if now - member.suspected_at > silence + self._timing.heartbeat_s:
                        why = f"no heartbeat for {silent:.1f} s and no answer to its probe"
                        self._declare_dead(member, now, why)
                elif silent > silence:
                    member.suspected_at = now
                    suspects.append(member.info)
            elif now - member.created_at > self._timing.placement_timeout_s:
                why = (
                    f"no node offers {member.tier.actor_options()} "
                    f"({now - member.created_at:.0f} s pending)"
                )
                if self._unplaceable.get(member.tier.name) != why:
                    log.warning("tier %s cannot be placed: %s", member.tier.name, why)
                self._unplaceable[member.tier.name] = why
        for tier in self._tiers:
            self._size(tier, demand.get(tier.name, 0), now)
        self._reap(now)
        return suspects

    def probed(self, executor_id: str, answered: bool, why: str = "") -> bool:
        """What the probe of a suspect found. One that answered is live (as
        if it had heartbeated); one that did not, and sent no heartbeat
        meanwhile, is declared dead. Returns whether it was declared dead."""
        member = self._members.get(executor_id)
        if member is None or member.suspected_at is None:
            return False  # gone already, or it heartbeated since
        now = self._clock()
        if answered:
            member.last_heartbeat, member.suspected_at = now, None
            return False
        silent = now - member.last_heartbeat
        self._declare_dead(member, now, f"no heartbeat for {silent:.1f} s and {why}")
        return True

    def _size(self, tier: Tier, demand: int, now: float) -> None:
        views = [
            MemberView(
                executor_id=m.info.executor_id,
                placed=m.placed,
                running=m.running,
                idle_for_s=now - m.idle_since,
                draining=m.draining,
                drained=m.drained,
            )
            for m in self._of(tier)
        ]
        unplaceable = tier.name in self._unplaceable
        plan = plan_size(tier, demand, views, unplaceable=unplaceable, timing=self._timing)
        for _ in range(plan.start):
            self._start(tier, now)
        for executor_id in plan.drain:
            self._members[executor_id].draining = True
            log.info("executor %s idle: draining", executor_id)
        for executor_id in plan.remove:
            self._factory.destroy(self._members.pop(executor_id).info.handle)

    def _declare_dead(self, member: Member, now: float, why: str) -> None:
        log.warning("executor %s declared dead: %s", member.info.executor_id, why)
        del self._members[member.info.executor_id]
        self._dead[member.info.executor_id] = (now, member.info.handle)

    def _reap(self, now: float) -> None:
        for executor_id, (declared, handle) in list(self._dead.items()):
            if now - declared >= self._timing.reap_after_s:
                del self._dead[executor_id]
                self._factory.destroy(handle)

    def _of(self, tier: Tier) -> list[Member]:
        return [m for m in self._members.values() if m.tier.name == tier.name]

    def _start(self, tier: Tier, now: float) -> Member:
        executor_id = f"{tier.name}-{uuid.uuid4().hex[:8]}"
        return self._member(tier, executor_id, self._factory.create(tier, executor_id), now)

    def _member(self, tier: Tier, executor_id: str, handle: Any, now: float) -> Member:
        info = ExecutorInfo(
            executor_id=executor_id,
            tier=tier.name,
            tier_rank=self._tiers.tiers.index(tier),
            slots=tier.slots,
            handle=handle,
        )
        member = Member(info=info, tier=tier, created_at=now, idle_since=now)
        self._members[executor_id] = member
        return member


# -- Ray shells ------------------------------------------------------------


class _RayExecutors:
    def __init__(self, settings) -> None:
        self._settings = settings

    def create(self, tier: Tier, executor_id: str):
        return ExecutorActor.options(
            name=EXECUTOR_PREFIX + executor_id,
            namespace=self._settings.namespace,
            lifetime="detached",
            max_concurrency=max(100, tier.slots * 4),
            **tier.actor_options(),
        ).remote(executor_id=executor_id, tier=tier, settings=self._settings)

    def destroy(self, handle) -> None:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            log.debug("executor already gone", exc_info=True)


class ExecutorPoolShell:
    def __init__(self, settings) -> None:
        self._settings = settings
        factory = _RayExecutors(settings)
        adopted = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] == settings.namespace and entry["name"].startswith(
                EXECUTOR_PREFIX
            ):
                handle = named_actor(entry["name"], settings.namespace)
                if handle is not None:  # it may have exited since it was listed
                    adopted.append((entry["name"][len(EXECUTOR_PREFIX) :], handle))
        self._pool = ExecutorPool(
            tiers=settings.tiers, factory=factory, timing=settings.pool_timing, adopted=adopted
        )
        self._probes: set[asyncio.Future] = set()
        self._ticking = asyncio.ensure_future(self._tick_forever())
        settle_after_start()

    async def _tick_forever(self) -> None:
        from actors.handles import dispatcher_lookup

        # looked up off this loop, which answers the heartbeats (ActorLookup)
        dispatcher = dispatcher_lookup(self._settings.namespace)
        while True:
            await asyncio.sleep(self._settings.pool_timing.heartbeat_s)
            demand: dict[str, int] = {}
            try:
                demand = await asyncio.wait_for((await dispatcher.get()).demand.remote(), timeout=2)
            except Exception:
                dispatcher.forget()  # not deployed yet, or restarting: size for the minimum
            try:
                for suspect in self._pool.tick(demand):
                    probe = asyncio.ensure_future(self._probe(suspect))
                    self._probes.add(probe)  # held: the loop keeps only weak references
                    probe.add_done_callback(self._probes.discard)
            except Exception:
                log.exception("pool tick failed")

    async def _probe(self, suspect: ExecutorInfo) -> None:
        """Ask a silent executor directly: a killed one fails at once (Ray
        knows its process is gone); a live one behind on its heartbeats
        answers; a hung or unreachable one gets as long again as the
        silence that made it a suspect."""
        timing = self._settings.pool_timing
        try:
            await asyncio.wait_for(
                suspect.handle.ping.remote(), timeout=timing.heartbeat_s * timing.misses
            )
        except Exception as exc:
            why = "no answer to a ping" if isinstance(exc, TimeoutError) else f"ping: {exc!r}"
            self._pool.probed(suspect.executor_id, answered=False, why=why[:200])
        else:
            self._pool.probed(suspect.executor_id, answered=True)

    async def heartbeat(
        self, executor_id: str, running: int, node: str = "", drained: bool = False
    ) -> Heartbeat:
        return self._pool.heartbeat(executor_id, running, node, drained)

    async def executors(self) -> list[ExecutorInfo]:
        return self._pool.executors()

    async def status(self) -> dict:
        return self._pool.status()

    async def pid(self) -> int:
        """For operators and fault tests."""
        return os.getpid()


ExecutorPoolActor = ray.remote(max_restarts=-1, max_task_retries=-1)(ExecutorPoolShell)
