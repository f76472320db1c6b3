"""Names of the detached actors and how to reach them."""

from __future__ import annotations

import functools

import ray

DISPATCHER_NAME = "chronoray-dispatcher"
POOL_NAME = "chronoray-executor-pool"


def shard_name(index: int) -> str:
    return f"chronoray-shard-{index}"


@functools.lru_cache(maxsize=256)
def shard_handle(index: int, namespace: str):
    # Handles to detached, restartable actors stay valid across restarts.
    return ray.get_actor(shard_name(index), namespace=namespace)


def dispatcher_handle(namespace: str):
    return ray.get_actor(DISPATCHER_NAME, namespace=namespace)
