"""One real Ray head for the whole test session (with the dashboard, so
`ray job submit` works), chronoray deployed on it against a fresh
PostgreSQL database, and helpers the integration and fault tests share."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import ray

from chronoray.deploy import free_port, free_ports
from chronoray.settings import Settings
from scheduling.lifecycle import RetryPolicy
from scheduling.tiers import NetworkPolicy, TierTable, local_node_resources, slot_tier
from storage.engines import make_engine
from storage.sql import SqlTaskRepository

BIN = Path(sys.executable).parent


def wait_for(condition, *, timeout_s: float, interval_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class RayHead:
    address: str
    dashboard_url: str
    temp_dir: Path
    process: subprocess.Popen

    @classmethod
    def start(
        cls, resources: dict[str, float], num_cpus: int = 2, *, gcs_redis: str | None = None
    ) -> "RayHead":
        """``gcs_redis``: GCS fault tolerance, its tables in this Redis (under
        a namespace of this head's own). Then `ray start` does not block: a
        blocking one tears the node down when the GCS dies."""
        port, dashboard, client, agent, metrics = free_ports(5)
        temp_dir = Path(tempfile.mkdtemp(prefix="crt-", dir="/tmp"))
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
        if gcs_redis:
            env["RAY_REDIS_ADDRESS"] = gcs_redis
            env["RAY_external_storage_namespace"] = temp_dir.name
        process = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                *([] if gcs_redis else ["--block"]),
                "--disable-usage-stats",
                f"--port={port}",
                f"--num-cpus={num_cpus}",
                f"--resources={json.dumps(resources)}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}",
                f"--temp-dir={temp_dir}",
                # fixed defaults would collide with any other Ray on the host
                f"--dashboard-agent-listen-port={agent}",
                f"--metrics-export-port={metrics}",
            ],
            env=env,
            stdout=open(temp_dir / "head.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        head = cls(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", temp_dir, process)
        try:
            if gcs_redis and process.wait(timeout=120) != 0:
                raise RuntimeError(f"ray start: {(temp_dir / 'head.log').read_text()[-3000:]}")
            wait_for(head._dashboard_up, timeout_s=90, interval_s=0.5, what="the Ray head")
        except BaseException:
            head.stop()
            raise
        return head

    def _dashboard_up(self) -> bool:
        if self.process.poll() not in (None, 0):
            raise RuntimeError(
                f"ray start exited: {(self.temp_dir / 'head.log').read_text()[-3000:]}"
            )
        try:
            return httpx.get(f"{self.dashboard_url}/api/version", timeout=2).status_code == 200
        except Exception:
            return False

    def stop(self) -> None:
        """A throwaway head: SIGTERM, then SIGKILL after 5 s (a blocking
        `ray start` took more than 30 s to act on SIGTERM at the end of
        every session)."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Whatever ray start left behind in its session, by its temp dir.
        subprocess.run(["pkill", "-9", "-f", str(self.temp_dir)], check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# Narrow priority bands, so that three failures climb every tier.
# The medium tier's scripts have no network (`none`), to test that policy on
# real executors; the others keep the default, `egress`. The small tier's
# 256 MB hold the hostile memory test; its scratch is smaller than its
# memory, so a disk filler meets ENOSPC before the OOM killer.
TEST_TIERS = TierTable(
    [
        slot_tier(
            name,
            low,
            executors=2,
            max_executors=3,
            slots=8,
            script_memory_mb=memory,
            scratch_mb=scratch,
            network=network,
        )
        for name, low, memory, scratch, network in (
            ("small", 0, 256, 128, NetworkPolicy.EGRESS),
            ("medium", 2, 1024, 256, NetworkPolicy.NONE),
            ("large", 3, 2048, 256, NetworkPolicy.EGRESS),
        )
    ]
)


def settings_for_tests(database_url: str) -> Settings:
    namespace = f"chronoray-test-{uuid.uuid4().hex[:8]}"
    zookeeper = os.environ.get("CHRONORAY_TEST_ZOOKEEPER_HOSTS")
    return Settings(
        database_url=database_url,
        namespace=namespace,
        num_shards=2,
        range_s=60,
        sweep_interval_s=1.0,
        retention_interval_s=2.0,
        lease_grace_s=10.0,
        tiers=TEST_TIERS,
        retry=RetryPolicy(backoff_base_s=0.3, backoff_max_s=2.0),
        http_port=free_port(),
        # a chroot per deployment: sessions of other tests stay out of its view
        zookeeper_hosts=f"{zookeeper}/{namespace}" if zookeeper else None,
        zookeeper_session_timeout_s=4.0,
        admin_token=f"admin-{uuid.uuid4().hex}",
        # the session's `ray start` runs without Serve's HAProxy variables;
        # the HAProxy default is tested end to end by test_embedded (chronoray up)
        serve_ingress="proxy",
    )


@dataclass
class Deployment:
    settings: Settings
    url: str
    head: RayHead
    repo: SqlTaskRepository
    token: str  # the local user's, the same user chronoray.Client acts as without a token

    def new_user(self, name: str) -> tuple[int, str]:
        """A user made through the admin API, and a token of theirs."""
        admin = {"Authorization": f"Bearer {self.settings.admin_token}"}
        user = httpx.post(
            f"{self.url}/v1/users", json={"first_name": name, "last_name": "tester"}, headers=admin
        )
        user.raise_for_status()
        user_id = user.json()["user_id"]
        token = httpx.post(f"{self.url}/v1/users/{user_id}/tokens", json={}, headers=admin)
        token.raise_for_status()
        return user_id, token.json()["token"]


def deploy_for_tests(database_url: str) -> Deployment:
    from chronoray.deploy import deploy, prepare_database
    from service.auth import issue_token

    settings = settings_for_tests(database_url)
    head = RayHead.start(local_node_resources(settings.tiers))
    try:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(
            address=head.address,
            namespace=settings.namespace,
            log_to_driver=False,
            logging_level="error",
        )
        url = deploy(settings)
    except BaseException:
        ray.shutdown()
        head.stop()
        raise
    repo = SqlTaskRepository(make_engine(settings.database_url))
    _, token = issue_token(
        repo, user_id=prepare_database(settings), label="tests", now=datetime.now(timezone.utc)
    )
    return Deployment(settings=settings, url=url, head=head, repo=repo, token=token)


def runs_per_task(deployment: Deployment, task_ids) -> dict[int, int]:
    """How many runs the runs table holds for each of these tasks."""
    from sqlalchemy import func, select

    from storage.schema import runs

    with deployment.repo.engine.connect() as conn:
        return dict(
            conn.execute(
                select(runs.c.task_id, func.count())
                .where(runs.c.task_id.in_(list(task_ids)))
                .group_by(runs.c.task_id)
            ).all()
        )


def run_rows(deployment: Deployment, task_ids) -> list[dict]:
    """The runs table's rows for these tasks (for failure messages)."""
    from sqlalchemy import select

    from storage.schema import runs

    with deployment.repo.engine.connect() as conn:
        rows = conn.execute(
            select(runs).where(runs.c.task_id.in_(list(task_ids))).order_by(runs.c.run_id)
        )
        return [dict(row._mapping) for row in rows]
