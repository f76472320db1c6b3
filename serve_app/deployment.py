"""Ray Serve deployment of the API: replicas at num_cpus=0 that call the
shard actors directly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime

from ray import serve

from chronoray.settings import Settings
from scheduling.errors import ChronorayError, Unavailable
from scheduling.models import NewTask, SubmitResult

LOCAL_USER = ("local", "user")
log = logging.getLogger(__name__)


class ShardSubmitter:
    """Sends each submission to the shard that owns its time range, all
    shards at once; each shard group-commits what it receives."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def _submit_calls(self, new_tasks: Sequence[NewTask]):
        groups: dict[int, list[int]] = {}
        for position, new in enumerate(new_tasks):
            groups.setdefault(self._settings.wheel.shard_of(new.execute_at), []).append(position)
        calls = [
            (shard, self._settings.namespace, "submit", ([new_tasks[i] for i in positions],))
            for shard, positions in groups.items()
        ]
        return list(groups.values()), calls

    def _track_calls(self, entries: Sequence[tuple[int, datetime]]):
        by_shard: dict[int, list] = {}
        for task_id, at in entries:
            by_shard.setdefault(self._settings.wheel.shard_of(at), []).append((task_id, at))
        return [
            (shard, self._settings.namespace, "track", (owned,))
            for shard, owned in by_shard.items()
        ]

    @staticmethod
    def _merge(size: int, groups: list[list[int]], answers: list) -> list:
        results: list = [None] * size
        for positions, answer in zip(groups, answers, strict=True):
            for position, result in zip(positions, answer, strict=True):
                results[position] = result
        return results

    async def submit(self, new_tasks: Sequence[NewTask]) -> list[SubmitResult | ChronorayError]:
        from actors.handles import call_shard

        groups, calls = self._submit_calls(new_tasks)
        answers = await asyncio.gather(*(call_shard(i, ns, m, *a) for i, ns, m, a in calls))
        return self._merge(len(new_tasks), groups, answers)

    def submit_blocking(self, new_tasks: Sequence[NewTask]) -> list[SubmitResult | ChronorayError]:
        """For drivers outside an event loop (chronoray.Client)."""
        from actors.handles import call_shards_blocking

        groups, calls = self._submit_calls(new_tasks)
        return self._merge(len(new_tasks), groups, call_shards_blocking(calls))

    async def track(self, entries: Sequence[tuple[int, datetime]]) -> None:
        from actors.handles import call_shard

        await asyncio.gather(
            *(call_shard(i, ns, m, *a) for i, ns, m, a in self._track_calls(entries))
        )

    async def probe(self) -> dict[str, str]:
        from actors.handles import call_shard, dispatcher_handle

        async def answer(name, call):
            try:
                await asyncio.wait_for(call, timeout=2.0)
                return name, "ok"
            except Exception as exc:  # not ready: say which and why
                return name, f"unavailable: {type(exc).__name__}"

        namespace = self._settings.namespace
        checks = [answer("dispatcher", dispatcher_handle(namespace).hello.remote())]
        checks += [
            answer(f"shard-{i}", call_shard(i, namespace, "ready"))
            for i in range(self._settings.num_shards)
        ]
        return dict(await asyncio.gather(*checks))

    async def executors(self) -> dict:
        from actors.handles import pool_handle

        try:
            pool = pool_handle(self._settings.namespace)
            return await asyncio.wait_for(pool.status.remote(), timeout=5.0)
        except Exception as exc:
            raise Unavailable(f"executor pool not reachable: {type(exc).__name__}") from None

    async def metrics(self) -> dict[str, list]:
        """Every actor's Prometheus metric families, by source; a source that
        does not answer within 2 s is left out (and marked down)."""
        from actors.handles import call_shard, dispatcher_handle, pool_handle
        from chronoray.metrics import pool_families

        namespace = self._settings.namespace

        async def pool():
            return pool_families(await pool_handle(namespace).status.remote())

        calls = {"dispatcher": dispatcher_handle(namespace).metrics.remote(), "pool": pool()}
        for i in range(self._settings.num_shards):
            calls[f"shard-{i}"] = call_shard(i, namespace, "metrics")

        async def gather(source, call):
            try:
                return source, await asyncio.wait_for(call, timeout=2.0)
            except Exception:  # a source down is shown as down, not as an error
                log.warning("metrics of %s unavailable", source, exc_info=True)
                return source, None

        return dict(await asyncio.gather(*(gather(s, c) for s, c in calls.items())))

    def track_blocking(self, entries: Sequence[tuple[int, datetime]]) -> None:
        from actors.handles import call_shards_blocking

        call_shards_blocking(self._track_calls(entries))


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    logging_config={"enable_access_log": False},
)
@serve.ingress()
class ChronorayIngress:
    def __init__(self, settings: Settings) -> None:
        from storage.engines import make_engine
        from storage.sql import SqlTaskRepository

        self._settings = settings
        self._repo = SqlTaskRepository(
            make_engine(settings.database_url),
            read_engines=[make_engine(url) for url in settings.database_replica_urls],
        )

    def __serve_build_asgi_app__(self):
        from serve_app.app import Backend, create_api

        return create_api(
            Backend(
                repo=self._repo,
                submitter=ShardSubmitter(self._settings),
                settings=self._settings,
            )
        )


def build_application(settings: Settings):
    return ChronorayIngress.options(num_replicas=settings.serve_replicas).bind(settings)
