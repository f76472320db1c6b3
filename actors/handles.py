"""Names of the detached actors and how to reach them."""

from __future__ import annotations

import asyncio
import functools

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from scheduling.errors import Unavailable

DISPATCHER_NAME = "chronoray-dispatcher"
POOL_NAME = "chronoray-executor-pool"


def shard_name(index: int) -> str:
    return f"chronoray-shard-{index}"


@functools.lru_cache(maxsize=256)
def shard_handle(index: int, namespace: str):
    # Handles to detached, restartable actors stay valid across restarts; a
    # shard removed and deployed again needs a new one (see call_shard).
    return ray.get_actor(shard_name(index), namespace=namespace)


# No call between actors waits forever: a stopped or dead actor must not
# stall its callers' loops. Each caller has a fallback (a retry, or the sweep).
CALL_TIMEOUT_S = 10.0


async def call_shard(
    index: int, namespace: str, method: str, *args, timeout_s: float = CALL_TIMEOUT_S
):
    """Call a shard, within ``timeout_s``; if its handle is dead (the actor
    was removed and deployed anew), look it up again once."""
    try:
        try:
            return await asyncio.wait_for(
                getattr(shard_handle(index, namespace), method).remote(*args), timeout=timeout_s
            )
        except RayActorError:
            shard_handle.cache_clear()
            return await asyncio.wait_for(
                getattr(shard_handle(index, namespace), method).remote(*args), timeout=timeout_s
            )
    except asyncio.TimeoutError:
        raise Unavailable(f"shard {index} did not answer {method} within {timeout_s} s") from None


def call_shards_blocking(
    calls: list[tuple[int, str, str, tuple]], *, timeout_s: float = 3 * CALL_TIMEOUT_S
) -> list:
    """The same for drivers outside an event loop: [(index, namespace, method,
    args)]. A driver waits longer than an actor (a restarting shard replays
    the call), but not forever: past ``timeout_s`` it gets ``Unavailable``."""

    def send():
        return [getattr(shard_handle(i, ns), m).remote(*a) for i, ns, m, a in calls]

    try:
        try:
            return ray.get(send(), timeout=timeout_s)
        except RayActorError:
            shard_handle.cache_clear()
            return ray.get(send(), timeout=timeout_s)
    except GetTimeoutError:
        raise Unavailable(f"the shards did not answer within {timeout_s} s") from None


def dispatcher_handle(namespace: str):
    return ray.get_actor(DISPATCHER_NAME, namespace=namespace)


def pool_handle(namespace: str):
    return ray.get_actor(POOL_NAME, namespace=namespace)
