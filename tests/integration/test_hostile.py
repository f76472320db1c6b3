"""Hostile scripts through real executors: each ends within its timeout + 1 s,
leaves no process behind, and the executors survive."""

import os
import time
import uuid
from urllib.parse import urlsplit

import pytest
import ray

from actors.cgroups import CgroupMode
from actors.executor import EXECUTOR_PREFIX
from actors.handles import POOL_NAME
from actors.sandbox import SandboxLimits, cgroup_support
from scheduling.models import Interpreter
from tests.unit.fakes import processes_with
from tests.unit.test_network import Listener, probe_script_body
from tests.unit.test_sandbox import HOSTILE

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow]


def executor_ids(deployment) -> set[str]:
    pool = ray.get_actor(POOL_NAME, namespace=deployment.settings.namespace)
    return {e["executor_id"] for e in ray.get(pool.status.remote())["executors"]}


# Beside a fork bomb and floods on a 2-core machine, the memory hog reaches
# its cgroup's limit (and the kernel's OOM kill) in its own time: it has more
# than the others' 3 s, so what ends it is the memory limit, not the clock.
TIMEOUT_S = {"2 GB resident in small pieces": 20}


def test_hostile_scripts_are_contained(deployment, client):
    before = executor_ids(deployment)
    marker = uuid.uuid4().hex
    tasks = {}
    for i, (name, (interpreter, body)) in enumerate(HOSTILE.items()):
        script = f"hostile-{i}"
        client.register_script(
            script, body, interpreter="python" if interpreter is Interpreter.PYTHON else "bash"
        )
        tasks[name] = client.submit(
            script,
            time.time(),
            timeout_s=TIMEOUT_S.get(name, 3),
            max_attempts=1,
            variables={"MARK": marker},
        )
    views = dict(
        zip(tasks, client.wait([t.task_id for t in tasks.values()], timeout_s=60), strict=True)
    )
    for name, view in views.items():
        [run] = view.runs
        took = (run.finished_at - run.started_at).total_seconds()
        print(f"{name}: {run.failure and run.failure.value} after {took:.2f} s")
        assert took < TIMEOUT_S.get(name, 3) + 1, name
        assert view.task.status.value == "dead", name
    # the small tier: 256 MB resident per script, 128 MB of scratch
    assert views["2 GB resident in small pieces"].runs[0].failure.value == "memory"
    assert "No space left on device" in views["disk filler"].runs[0].output_tail
    assert views["infinite loop"].runs[0].failure.value == "timeout"
    assert views["setsid escape"].runs[0].failure.value == "timeout"
    time.sleep(0.5)
    assert processes_with(f"MARK={marker}") == []
    # the executors survived: none was declared dead or replaced
    assert executor_ids(deployment) >= before
    client.register_script("after-hostile.sh", "echo still here")
    [after] = client.wait([client.submit("after-hostile.sh", time.time()).task_id])
    assert after.task.status.value == "succeeded" and after.runs[0].output_tail == "still here\n"


def test_scripts_reach_the_network_but_not_the_control_plane(deployment, client):
    """The embedded default, `egress`: PostgreSQL, the API and ZooKeeper are
    refused to a script; a service outside the control plane is reached."""
    settings = deployment.settings
    outside = Listener("127.0.0.2")
    try:
        targets = {
            "postgres": (
                "127.0.0.1",
                urlsplit(os.environ["CHRONORAY_TEST_POSTGRES_URL"]).port,
            ),
            "api": ("127.0.0.1", settings.http_port),
            "outside": ("127.0.0.2", outside.port),
        }
        if settings.zookeeper_hosts:
            first = settings.zookeeper_hosts.split(",")[0].split("/")[0]  # no chroot
            host, _, port = first.rpartition(":")
            targets["zookeeper"] = (host, int(port))
        client.register_script("egress-probe.sh", probe_script_body(targets))
        [view] = client.wait([client.submit("egress-probe.sh", time.time()).task_id])
        seen = dict(line.split("=") for line in view.runs[0].output_tail.split())
        assert seen == {name: "reached" if name == "outside" else "refused" for name in targets}, (
            seen
        )
    finally:
        outside.sock.close()
    for executor_id in executor_ids(deployment):
        executor = ray.get_actor(EXECUTOR_PREFIX + executor_id, namespace=settings.namespace)
        info = ray.get(executor.info.remote(), timeout=30)
        assert info["network"] == settings.tiers.by_name(info["tier"]).network.value
        mode = cgroup_support(SandboxLimits()).mode  # the executors' host is this one
        assert info["cgroups"].startswith(
            "no writable cgroups" if mode is CgroupMode.NONE else f"cgroup {mode.value} under"
        ), info["cgroups"]


def test_a_tier_without_network_reaches_nothing(deployment, client):
    """The test deployment's medium tier has the policy `none`."""
    outside = Listener("127.0.0.2")
    try:
        targets = {
            "api": ("127.0.0.1", deployment.settings.http_port),
            "outside": ("127.0.0.2", outside.port),
        }
        client.register_script("none-probe.sh", probe_script_body(targets))
        task = client.submit("none-probe.sh", time.time(), priority=2)
        [view] = client.wait([task.task_id])
        [run] = view.runs
        assert run.tier == "medium"
        assert dict(line.split("=") for line in run.output_tail.split()) == {
            "api": "refused",
            "outside": "refused",
        }
    finally:
        outside.sock.close()
