"""Names of the detached actors and every way to reach them: ShardRouter
for callers outside the actors (the API, chronoray.Client), and the bounded
calls the actors make to each other (DispatcherCalls, ShardHints,
ExecutorCalls, ShardResults, DispatcherResults)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import ray
from ray.exceptions import RayActorError

from actors.batching import GroupCommitter
from scheduling.errors import ChronorayError, Unavailable
from scheduling.models import CommittedResults, NewTask, RunResult, SubmitResult, TaskSpec
from scheduling.timeline import Wheel

DISPATCHER_NAME = "chronoray-dispatcher"
POOL_NAME = "chronoray-executor-pool"
log = logging.getLogger(__name__)


def shard_name(index: int) -> str:
    return f"chronoray-shard-{index}"


def shard_handle(index: int, namespace: str):
    """The shard's live handle, asked of the GCS each time: for tests and
    operators, off any actor's loop (actors and the API use call_shard,
    which keeps its handle until the shard is removed and deployed anew)."""
    return ray.get_actor(shard_name(index), namespace=namespace)


# No call between actors waits forever: a stopped or dead actor must not
# stall its callers' loops. Each caller has a fallback (a retry, or the sweep).
CALL_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 2.0  # readiness and metrics: an actor slower than this counts as down
POOL_TIMEOUT_S = 5.0


# A driver (chronoray.Client) waits longer than an actor: a restarting shard
# replays the call, and a driver has no loop of its own to keep turning.
DRIVER_CALL_TIMEOUT_S = 3 * CALL_TIMEOUT_S


class ActorLookup:
    """A named actor's handle for code on an event loop: looked up in a
    thread, each wait bounded by ``timeout_s``, one lookup in flight however
    many wait. ``ray.get_actor`` asks the GCS, and while the GCS is down it
    blocks until the GCS is back: on an actor's loop that would hold every
    release, heartbeat and placement behind it, and a new thread per wait
    would fill the loop's thread pool, which its database writes use. A
    handle to a detached, restartable actor outlives its restarts, so it is
    kept until ``forget`` (the actor was removed and deployed anew)."""

    def __init__(
        self, lookup: Callable[[], Any], *, what: str, timeout_s: float = PROBE_TIMEOUT_S
    ) -> None:
        self._lookup = lookup
        self.what = what
        self._timeout_s = timeout_s
        self._handle: Any = None
        self._pending: asyncio.Future[Any] | None = None

    async def get(self) -> Any:
        """The handle; raises what the lookup raised (ValueError: no such
        actor), or Unavailable after ``timeout_s`` (the lookup goes on)."""
        if self._handle is not None:
            return self._handle
        loop = asyncio.get_running_loop()
        if self._pending is None or self._pending.get_loop() is not loop:
            self._pending = loop.run_in_executor(None, self._lookup)
            self._pending.add_done_callback(self._landed)
        try:
            return await asyncio.wait_for(asyncio.shield(self._pending), timeout=self._timeout_s)
        except asyncio.TimeoutError:
            raise Unavailable(f"{self.what} not found within {self._timeout_s} s") from None

    def _landed(self, lookup: asyncio.Future[Any]) -> None:
        if lookup is not self._pending:
            return
        self._pending = None
        if not lookup.cancelled() and lookup.exception() is None:
            self._handle = lookup.result()

    def forget(self) -> None:
        """Look it up again next time."""
        self._handle = None


_shard_lookups: dict[tuple[int, str], ActorLookup] = {}


def _shard_lookup(index: int, namespace: str) -> ActorLookup:
    found = _shard_lookups.get((index, namespace))
    if found is None:
        found = _shard_lookups[(index, namespace)] = ActorLookup(
            functools.partial(ray.get_actor, shard_name(index), namespace=namespace),
            what=f"shard {index}",
        )
    return found


def forget_shard_handles() -> None:
    """Drop the shard handles call_shard keeps: a driver connected to a new
    cluster (its old one killed) must not call the old cluster's actors."""
    _shard_lookups.clear()


async def call_shard(
    index: int, namespace: str, method: str, *args, timeout_s: float = CALL_TIMEOUT_S
):
    """Call a shard, each try within ``timeout_s``. A shard that does not
    answer, is dead or restarting, or is not registered (yet) raises
    ``Unavailable``: the API answers 503, never 500, and a caller in an actor
    keeps its fallback. What the shard itself raised is raised as it is."""
    try:
        return await _ask(_shard_lookup(index, namespace), method, *args, timeout_s=timeout_s)
    except asyncio.TimeoutError:
        raise Unavailable(f"shard {index} did not answer {method} within {timeout_s} s") from None
    except RayActorError as exc:
        raise Unavailable(f"shard {index} is down ({type(exc).__name__}): {method}") from None
    except ActorNotRegistered:
        raise Unavailable(f"shard {index} is not registered: {method}") from None


async def _ask(actor: ActorLookup, method: str, *args, timeout_s: float | None = None) -> Any:
    """Call ``method`` of a looked-up actor, each try within ``timeout_s``;
    if its handle is dead (the actor was removed and deployed anew), look it
    up again and try once more: the first call after a redeploy reaches the
    new actor instead of failing."""

    async def once() -> Any:
        try:
            handle = await actor.get()
        except ValueError:  # ray.get_actor: no live actor of that name
            raise ActorNotRegistered(actor.what) from None
        return await asyncio.wait_for(getattr(handle, method).remote(*args), timeout=timeout_s)

    try:
        return await once()
    except RayActorError:
        actor.forget()
    try:
        return await once()
    except RayActorError:
        actor.forget()
        raise


class ActorNotRegistered(Exception):
    """No live actor of that name: being deployed anew, or removed. Told
    apart from a ValueError that the actor's own method raised."""


def named_actor(name: str, namespace: str):
    """The live actor registered under ``name``, or None (never was, or gone)."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def dispatcher_handle(namespace: str):
    return ray.get_actor(DISPATCHER_NAME, namespace=namespace)


def dispatcher_lookup(namespace: str) -> ActorLookup:
    """The dispatcher's handle for code on an event loop (ActorLookup)."""
    return ActorLookup(functools.partial(dispatcher_handle, namespace), what="the dispatcher")


def pool_handle(namespace: str):
    return ray.get_actor(POOL_NAME, namespace=namespace)


class ShardRouter:
    """Sends work to the shard that owns its time range, all shards at once
    (each group-commits what it receives), and asks the dispatcher and the
    pool what they know. Every call is bounded by ``timeout_s``."""

    def __init__(
        self,
        *,
        wheel: Wheel,
        namespace: str,
        timeout_s: float = CALL_TIMEOUT_S,
        zookeeper_hosts: str | None = None,
    ):
        self._wheel = wheel
        self._namespace = namespace
        self._timeout_s = timeout_s
        self._zookeeper_hosts = zookeeper_hosts
        # Concurrent submissions to one shard share its next call: a request
        # arriving while one is in flight rides with the others in the next
        # (one actor call per request was an eighth of a replica's CPU).
        # A failed call fails each of its requests, as their own calls would.
        self._submitters: dict[int, GroupCommitter[NewTask, SubmitResult | ChronorayError]] = {}
        self._dispatcher = dispatcher_lookup(namespace)
        self._pool = ActorLookup(
            functools.partial(pool_handle, namespace), what="the executor pool"
        )

    async def _call(self, shard: int, method: str, *args):
        return await call_shard(shard, self._namespace, method, *args, timeout_s=self._timeout_s)

    def _submitter(self, shard: int) -> GroupCommitter[NewTask, SubmitResult | ChronorayError]:
        found = self._submitters.get(shard)
        if found is None:

            async def send(batch: list[NewTask]) -> list[SubmitResult | ChronorayError]:
                return await self._call(shard, "submit", batch)

            found = self._submitters[shard] = GroupCommitter(send, isolate=False)
        return found

    async def submit(self, new_tasks: Sequence[NewTask]) -> list[SubmitResult | ChronorayError]:
        groups: dict[int, list[int]] = {}
        for position, new in enumerate(new_tasks):
            groups.setdefault(self._wheel.shard_of(new.execute_at), []).append(position)
        answers = await asyncio.gather(
            *(
                self._submitter(shard).submit([new_tasks[i] for i in positions])
                for shard, positions in groups.items()
            )
        )
        results: list = [None] * len(new_tasks)
        for positions, answer in zip(groups.values(), answers, strict=True):
            for position, result in zip(positions, answer, strict=True):
                results[position] = result
        return results

    async def track(self, entries: Sequence[tuple[int, datetime]]) -> None:
        """Tell the owner shards about tasks stored outside them."""
        by_shard: dict[int, list] = {}
        for task_id, at in entries:
            by_shard.setdefault(self._wheel.owner_of(task_id, at), []).append((task_id, at))
        await asyncio.gather(*(self._call(s, "track", owned) for s, owned in by_shard.items()))

    async def probe(self) -> dict[str, str]:
        """Which actors answer: {"dispatcher": "ok", "shard-0": "ok", …}."""
        calls = {"dispatcher": _ask(self._dispatcher, "hello")}
        for i in range(self._wheel.num_shards):
            calls[f"shard-{i}"] = call_shard(i, self._namespace, "ready")
        answers = await _each_within(calls, PROBE_TIMEOUT_S)
        return {  # not ready: say which and why
            name: f"unavailable: {type(a).__name__}" if isinstance(a, Exception) else "ok"
            for name, a in answers.items()
        }

    async def executors(self) -> dict:
        """The executor pool's status: per tier and per executor."""
        try:
            return await asyncio.wait_for(_ask(self._pool, "status"), timeout=POOL_TIMEOUT_S)
        except Exception as exc:
            raise Unavailable(f"executor pool not reachable: {type(exc).__name__}") from None

    async def mirror(self) -> dict | None:
        """The ZooKeeper mirror's tree (None: no mirror configured)."""
        if not self._zookeeper_hosts:
            return None
        from actors.zk_mirror import read_tree

        try:
            return await asyncio.to_thread(read_tree, self._zookeeper_hosts, timeout_s=2.0)
        except Exception as exc:
            raise Unavailable(f"ZooKeeper mirror not reachable: {type(exc).__name__}") from None

    async def metrics(self) -> dict[str, list | None]:
        """Every actor's Prometheus metric families, by source; a source that
        does not answer within 2 s is None (shown as down)."""
        from chronoray.metrics import pool_families

        namespace = self._namespace

        async def pool():
            return pool_families(await _ask(self._pool, "status"))

        calls = {"dispatcher": _ask(self._dispatcher, "metrics"), "pool": pool()}
        for i in range(self._wheel.num_shards):
            calls[f"shard-{i}"] = call_shard(i, namespace, "metrics")
        answers = await _each_within(calls, PROBE_TIMEOUT_S)
        for source, answer in answers.items():
            if isinstance(answer, Exception):  # a source down is shown as down, not as an error
                log.warning("metrics of %s unavailable: %r", source, answer)
        return {s: None if isinstance(a, Exception) else a for s, a in answers.items()}


async def _each_within(calls: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Every call's answer by name, each bounded by ``timeout_s``; a call
    that failed or took longer gives its exception instead."""

    async def one(name: str, call: Any) -> tuple[str, Any]:
        try:
            return name, await asyncio.wait_for(call, timeout=timeout_s)
        except Exception as exc:
            return name, exc

    return dict(await asyncio.gather(*(one(n, c) for n, c in calls.items())))


# -- calls between actors: each bounded, each with a fallback in its caller ----

SEND_TIMEOUT_S = 3.0  # a batch an executor took after all is deduplicated
REPORT_TIMEOUT_S = 30.0  # a dispatcher that takes longer is asked again (records are idempotent)


class DispatcherCalls:
    """Every call bounded: a dead or stopped dispatcher fails the loop
    iteration (retried), never stalls it. A claim whose hand-over failed is
    queued in the database and offered again when its queue lease ends."""

    def __init__(self, namespace: str) -> None:
        self._handle = dispatcher_handle(namespace)

    async def _call(self, method: str, *args):
        try:
            return await asyncio.wait_for(
                getattr(self._handle, method).remote(*args), timeout=CALL_TIMEOUT_S
            )
        except asyncio.TimeoutError:
            raise Unavailable(f"the dispatcher did not answer {method}") from None

    async def hello(self) -> str:
        return await self._call("hello")

    async def room(self) -> int:
        return await self._call("room")

    async def submit(self, specs: list[TaskSpec]) -> int:
        return await self._call("submit", specs)

    async def cancel(self, keys: list[tuple[int, int]]) -> None:
        await self._call("cancel", keys)


class ShardHints:
    """A shard telling the owner shard of tasks it stored for it."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace

    async def track(self, shard: int, entries: list[tuple[int, datetime]]) -> None:
        """A hint to the owner's timer; the owner's sweep finds the same
        tasks, so a shard that does not answer is passed over."""
        try:
            await call_shard(shard, self._namespace, "track", entries, timeout_s=2.0)
        except Exception as exc:
            log.warning("shard %d did not take %d tasks to watch: %s", shard, len(entries), exc)


class ExecutorCalls:
    """The dispatcher's calls to one executor."""

    def __init__(self, handle) -> None:
        self._handle = handle

    async def run_batch(self, specs: list[TaskSpec]) -> int:
        # Bounded: a stopped executor must not stall placement for everyone
        # (a batch it did take after all is deduplicated by attempt).
        return await asyncio.wait_for(self._handle.run_batch.remote(specs), timeout=SEND_TIMEOUT_S)

    async def running(self) -> list[TaskSpec]:
        return await asyncio.wait_for(self._handle.running.remote(), timeout=5)

    async def holding(self) -> list[tuple[int, int]]:
        return await asyncio.wait_for(self._handle.holding.remote(), timeout=5)

    async def cancel(self, keys: list[tuple[int, int]]) -> int:
        return await asyncio.wait_for(self._handle.cancel.remote(keys), timeout=5)


class ShardResults:
    """The dispatcher handing results to the shard that owns their task."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace

    async def record_results(self, shard: int, results: list[RunResult]) -> None:
        await call_shard(shard, self._namespace, "record_results", results)

    async def results_committed(self, shard: int, committed: CommittedResults) -> None:
        await call_shard(shard, self._namespace, "results_committed", committed)


class DispatcherResults:
    """Results go back to the dispatcher, looked up by name so a restarted
    dispatcher is found again. Its answer means the shards committed them
    (or took in what the executor's own commit decided)."""

    def __init__(self, namespace: str) -> None:
        # a restartable actor's handle outlives its restarts
        self._dispatcher = dispatcher_lookup(namespace)

    async def hello(self) -> None:
        """Reach the dispatcher once (Ray opens its connection on the first call)."""
        handle = await self._dispatcher.get()
        await asyncio.wait_for(handle.hello.remote(), timeout=PROBE_TIMEOUT_S)

    async def report_results(
        self, results: list[RunResult], committed: CommittedResults | None = None
    ) -> None:
        handle = await self._dispatcher.get()
        try:
            await asyncio.wait_for(
                handle.report_results.remote(results, committed), timeout=REPORT_TIMEOUT_S
            )
        except Exception:
            self._dispatcher.forget()  # removed and deployed anew: look it up again next time
            raise
