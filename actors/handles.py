"""Names of the detached actors and how to reach them."""

from __future__ import annotations

import functools

import ray
from ray.exceptions import RayActorError

DISPATCHER_NAME = "chronoray-dispatcher"
POOL_NAME = "chronoray-executor-pool"


def shard_name(index: int) -> str:
    return f"chronoray-shard-{index}"


@functools.lru_cache(maxsize=256)
def shard_handle(index: int, namespace: str):
    # Handles to detached, restartable actors stay valid across restarts; a
    # shard removed and deployed again needs a new one (see call_shard).
    return ray.get_actor(shard_name(index), namespace=namespace)


async def call_shard(index: int, namespace: str, method: str, *args):
    """Call a shard; if its handle is dead (the actor was removed and
    deployed anew), look it up again once."""
    try:
        return await getattr(shard_handle(index, namespace), method).remote(*args)
    except RayActorError:
        shard_handle.cache_clear()
        return await getattr(shard_handle(index, namespace), method).remote(*args)


def call_shards_blocking(calls: list[tuple[int, str, str, tuple]]) -> list:
    """The same for drivers outside an event loop: [(index, namespace, method, args)]."""

    def send():
        return [getattr(shard_handle(i, ns), m).remote(*a) for i, ns, m, a in calls]

    try:
        return ray.get(send())
    except RayActorError:
        shard_handle.cache_clear()
        return ray.get(send())


def dispatcher_handle(namespace: str):
    return ray.get_actor(DISPATCHER_NAME, namespace=namespace)


def pool_handle(namespace: str):
    return ray.get_actor(POOL_NAME, namespace=namespace)
