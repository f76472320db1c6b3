"""Ray Serve deployment of the API: replicas at num_cpus=0 that call the
shard actors directly (through actors.handles.ShardRouter)."""

from __future__ import annotations

from ray import serve

from chronoray.settings import Settings


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    logging_config={"enable_access_log": False},
)
@serve.ingress()
class ChronorayIngress:
    def __init__(self, settings: Settings) -> None:
        from storage.sql import SqlTaskRepository

        self._settings = settings
        self._repo = SqlTaskRepository.connect(
            settings.database_url, settings.database_replica_urls
        )

    def __serve_build_asgi_app__(self):
        from actors.handles import ShardRouter
        from actors.heap import settle_after_start
        from serve_app.app import create_api
        from service.core import Service

        router = ShardRouter(
            wheel=self._settings.wheel,
            namespace=self._settings.namespace,
            zookeeper_hosts=self._settings.zookeeper_hosts,
        )
        app = create_api(Service(repo=self._repo, router=router, settings=self._settings))
        settle_after_start()
        return app


def build_application(settings: Settings):
    return ChronorayIngress.options(num_replicas=settings.serve_replicas).bind(settings)
