"""Start chronoray's actors and HTTP API on a Ray cluster, and take them down."""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Collection
from datetime import datetime, timezone
from pathlib import Path

import ray

from chronoray.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "chronoray"


# glibc gives each thread that allocates an arena of its own, up to 8 per
# core, and Ray's processes run dozens of threads: two arenas per process
# took `make run`'s idle PSS from 1,505-1,506 MB to 1,483-1,485 MB (three
# readings each, 60 s after start, Dec 7; the actors shrank, Ray's own
# processes did not). The raylet inherits it from the process that starts
# Ray (``ray start`` on a cluster: cluster.yaml), and the workers it starts
# (every actor, Serve's too) from the raylet; Ray starts its agents without it.
MALLOC_ENVIRONMENT = {"MALLOC_ARENA_MAX": "2"}


def start_local_ray(
    settings: Settings, *, num_cpus: int | None = None, **init_kwargs
) -> str | None:
    """A new single-node Ray that offers every tier's slot resource, with
    the dashboard's Jobs API on 127.0.0.1 (``ray job submit``) unless
    ``dashboard_port`` is 0. Returns the dashboard's address: Ray moves it
    to another port when the one asked for is taken."""
    from scheduling.tiers import local_node_resources

    dashboard = init_kwargs.pop("include_dashboard", settings.dashboard_port > 0)
    if dashboard:
        # A job's `python` is this interpreter, which has chronoray installed
        # (`make run` starts `.venv/bin/chronoray` without the venv on PATH).
        bin_dir = str(Path(sys.executable).parent)
        if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
            os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
        init_kwargs.setdefault("dashboard_host", "127.0.0.1")
        init_kwargs.setdefault("dashboard_port", settings.dashboard_port)
    os.environ.update(ingress_environment(settings))
    os.environ.update(MALLOC_ENVIRONMENT)
    labels: dict[str, str] = {}
    for tier in settings.tiers:  # a tier whose labels conflict is refused by `up`'s check
        for key, value in tier.labels.items():
            labels.setdefault(key, value)
    context = ray.init(
        address="local",
        labels=labels or None,
        num_cpus=num_cpus or os.cpu_count(),
        resources=local_node_resources(settings.tiers),
        namespace=settings.namespace,
        include_dashboard=dashboard,
        log_to_driver=init_kwargs.pop("log_to_driver", False),
        **init_kwargs,
    )
    _record_as_current_cluster(context.address_info["gcs_address"])
    if dashboard:
        wait_for_job_agent()
    return (context.dashboard_url or None) if dashboard else None


def wait_for_job_agent(timeout_s: float = 60.0) -> bool:
    """Wait until this node's dashboard agent has registered: the Jobs API
    answers `ray job submit` with "No available agent" until then (it waits
    10 s for one), and on a busy machine the agent can start later than
    that. False, with a warning, if it did not come within ``timeout_s``."""
    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX
    from ray.experimental.internal_kv import _internal_kv_get

    key = DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX + ray.get_runtime_context().get_node_id()
    deadline = time.monotonic() + timeout_s
    while _internal_kv_get(key, namespace=KV_NAMESPACE_DASHBOARD) is None:
        if time.monotonic() > deadline:
            log.warning(
                "Ray's dashboard agent did not register in %.0f s: no Ray jobs yet", timeout_s
            )
            return False
        time.sleep(0.25)
    return True


def ingress_environment(settings: Settings) -> dict[str, str]:
    """What Serve reads, as each of its processes starts, to take HTTP
    through HAProxy instead of its Python proxy (`serve_ingress`): set
    before Ray starts (``ray start`` on a cluster: cluster.yaml). HAProxy
    keeps its files in a directory of this process's own and its stats and
    metrics on free ports, so two Rays on one host do not share them. Measured with
    ``make bench-http`` (README, Benchmarks)."""
    if settings.serve_ingress != "haproxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    state = _haproxy_directory(settings.http_port)
    stats_port, metrics_port = free_ports(2, besides={settings.http_port})
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # two cores: one thread measured best
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        # Ray 2.60's HAProxy binds a Prometheus frontend even with metrics off,
        # on 9101 unless told: a second deployment on the host failed to start
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
    }


def _haproxy_directory(http_port: int) -> Path:
    """One directory per user and HTTP port (two Rays cannot share a port,
    so they never share it; a restart reuses it), short because Serve puts a
    56-character directory under it and HAProxy refuses a socket path past
    97 characters."""
    directory = Path("/tmp") / f"cr-hap-{os.geteuid()}-{http_port}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        info = directory.stat()
        if info.st_uid == os.geteuid() and not info.st_mode & 0o077:
            return directory
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="cr-hap-"))  # not ours to use: a new one


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int, *, besides: Collection[int] = ()) -> list[int]:
    """Distinct free ports, none of them in `besides` (ports already chosen
    but not yet bound). Every probe stays bound until all are chosen: ports
    probed one after another can repeat, and `ray start` refused two of its
    components on one port in a CI run."""
    probes: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            probe = socket.socket()
            probes.append(probe)  # held, even when skipped: the next probe gets another
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
            if port not in besides:
                ports.append(port)
        return ports
    finally:
        for probe in probes:
            probe.close()


def _record_as_current_cluster(gcs_address: str) -> None:
    """Write this cluster's address where `ray start` writes its own. A Ray
    job's driver finds its cluster with "auto": the address file in the
    cluster's temp dir, else any GCS process on the host. ``ray.init``
    writes no file, so with a second Ray on the host a `ray job submit` to
    our dashboard could run its driver against the other cluster."""
    from ray._private.utils import write_ray_address
    from ray._private.worker import global_worker

    write_ray_address(gcs_address, global_worker.node.get_temp_dir_path())


def forget_current_cluster() -> None:
    """Remove the address file `start_local_ray` wrote, if it still names
    this cluster (a later `ray start` may have replaced it)."""
    from ray._common.utils import get_ray_address_file
    from ray._private.worker import global_worker

    if global_worker.node is None:
        return
    address_file = Path(get_ray_address_file(global_worker.node.get_temp_dir_path()))
    if address_file.exists() and address_file.read_text() == global_worker.node.gcs_address:
        address_file.unlink(missing_ok=True)


def prepare_database(settings: Settings) -> int:
    """Migrate to the newest schema; returns the local user's id."""
    from service.steps import local_user
    from storage.engines import make_engine
    from storage.migrate import upgrade
    from storage.sql import SqlTaskRepository

    engine = make_engine(settings.database_url)
    try:
        upgrade(engine)
        return local_user(SqlTaskRepository(engine), now=datetime.now(timezone.utc))
    finally:
        engine.dispose()


def local_token(settings: Settings, token_file: Path) -> tuple[int, str]:
    """The local user's id and API token, for the embedded default: the
    token kept in ``token_file`` while it still works, else a new one
    (written there, readable by this OS user only)."""
    from service.auth import issue_token, token_hash
    from storage.engines import make_engine
    from storage.sql import SqlTaskRepository

    user_id = prepare_database(settings)
    engine = make_engine(settings.database_url)
    try:
        repo = SqlTaskRepository(engine)
        if token_file.exists():
            kept = token_file.read_text().strip()
            if kept and repo.user_for_token(token_hash(kept)) == user_id:
                return user_id, kept
        _, token = issue_token(repo, user_id=user_id, label="local", now=datetime.now(timezone.utc))
    finally:
        engine.dispose()
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)
    token_file.write_text(token + "\n")
    return user_id, token


def control_plane_options(name: str, settings: Settings) -> dict:
    """Shards, dispatcher and pool take no CPU; ``control_plane_resources``
    (e.g. a resource only the head offers) keeps them off worker nodes that
    the autoscaler may remove."""
    return {
        "name": name,
        "namespace": settings.namespace,
        "lifetime": "detached",
        "get_if_exists": True,
        "num_cpus": 0,
        "resources": dict(settings.control_plane_resources),
    }


def deploy_actors(settings: Settings) -> None:
    from actors.dispatcher import DispatcherActor
    from actors.executor_pool import ExecutorPoolActor
    from actors.handles import DISPATCHER_NAME, POOL_NAME, shard_name
    from actors.shard_actor import ShardActor

    if settings.zookeeper_hosts:
        from actors.zk_mirror import ensure_chroot

        ensure_chroot(settings.zookeeper_hosts)
    pool = ExecutorPoolActor.options(**control_plane_options(POOL_NAME, settings)).remote(settings)
    wait_for_executors(pool, settings)
    dispatcher = DispatcherActor.options(**control_plane_options(DISPATCHER_NAME, settings)).remote(
        settings
    )
    ray.get(dispatcher.hello.remote())
    shards = [
        ShardActor.options(**control_plane_options(shard_name(i), settings)).remote(i, settings)
        for i in range(settings.num_shards)
    ]
    ray.get([shard.ready.remote() for shard in shards])


def wait_for_executors(pool, settings: Settings, timeout_s: float = 90.0) -> dict:
    """Until each tier has its minimum of executors heartbeating; a tier no
    node can host is reported and not waited for beyond the placement
    timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = ray.get(pool.status.remote())
        waiting = {
            name: tier
            for name, tier in status["tiers"].items()
            if tier["live"] < tier["min"] and not tier["unplaceable"]
        }
        if not waiting or time.monotonic() > deadline:
            for name, tier in status["tiers"].items():
                if tier["unplaceable"]:
                    log.warning("tier %s: %s", name, tier["unplaceable"])
            if waiting:
                log.warning("executors still starting: %s", sorted(waiting))
            return status
        time.sleep(0.2)


def deploy_http(settings: Settings) -> str:
    from ray import serve

    from serve_app.deployment import build_application

    serve.start(http_options={"host": settings.http_host, "port": settings.http_port})
    serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{settings.http_host}:{settings.http_port}"
    _await_http(url.replace("//0.0.0.0:", "//127.0.0.1:"))
    return url


def _await_http(url: str, timeout_s: float = 60.0) -> None:
    """Return once ``GET /healthz`` answers 200 on the public port: Serve
    says an app is running before its ingress routes to it (HAProxy takes
    the new replica in a moment later and answers 503 until then)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            log.warning("%s/healthz did not answer 200 within %.0f s", url, timeout_s)
            return
        time.sleep(0.1)


def deploy(settings: Settings, *, http: bool = True) -> str | None:
    started = time.monotonic()
    prepare_database(settings)
    deploy_actors(settings)
    url = deploy_http(settings) if http else None
    log.info("chronoray deployed in %.1f s", time.monotonic() - started)
    return url


def drain_and_stop(settings: Settings, *, grace_s: float = 60.0, progress=None) -> int:
    """``chronoray down``: stop taking work (the HTTP app goes, shards refuse
    submissions and fire nothing more), let what runs finish and its results
    commit (up to ``grace_s``), then remove the actors. Returns how many
    attempts were still running or unacknowledged at the end (0: a clean
    stop); those are resolved by the next start as ``executor_lost``. Queued
    and future tasks stay in the database for the next ``up``.
    ``progress(held)`` is called on each poll."""
    from actors.handles import DISPATCHER_NAME, shard_name

    _delete_http()
    shards = [_actor(shard_name(i), settings) for i in range(settings.num_shards)]
    stopping = [shard.stop.remote() for shard in shards if shard is not None]
    ray.wait(stopping, num_returns=len(stopping), timeout=10)
    dispatcher = _actor(DISPATCHER_NAME, settings)
    held: int | None = 0
    deadline = time.monotonic() + grace_s
    while dispatcher is not None:
        try:
            held = ray.get(dispatcher.drain.remote(), timeout=10)
        except Exception:
            log.warning("the dispatcher did not answer drain", exc_info=True)
            held = None
        if progress is not None:
            progress(held)
        if held == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    teardown(settings, http=False)
    return held if held is not None else -1


def teardown(settings: Settings, *, http: bool = True) -> None:
    """Remove chronoray's actors and Serve app (not the Ray cluster)."""
    from actors.handles import DISPATCHER_NAME, POOL_NAME, shard_name

    if http:
        _delete_http()
    from actors.executor import EXECUTOR_PREFIX

    executors = [
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == settings.namespace and entry["name"].startswith(EXECUTOR_PREFIX)
    ]
    # The pool first, so it does not replace the executors killed after it.
    names = [POOL_NAME, DISPATCHER_NAME, *(shard_name(i) for i in range(settings.num_shards))]
    for name in [*names, *executors]:
        handle = _actor(name, settings)
        if handle is not None:
            ray.kill(handle, no_restart=True)


def _delete_http(timeout_s: float = 60.0) -> None:
    """Delete the Serve app, waiting ``timeout_s`` at most: a Serve whose
    proxies are still restarting can keep the deletion waiting for minutes,
    and stopping must not hang on it."""
    import threading

    def delete() -> None:
        try:
            from ray import serve

            serve.delete(APP_NAME)
        except Exception:
            log.debug("no Serve app to delete", exc_info=True)

    deleting = threading.Thread(target=delete, name="serve-delete", daemon=True)
    deleting.start()
    deleting.join(timeout_s)
    if deleting.is_alive():
        log.warning("the Serve app was not deleted within %.0f s; going on", timeout_s)


def _actor(name: str, settings: Settings):
    from actors.handles import named_actor

    return named_actor(name, settings.namespace)
