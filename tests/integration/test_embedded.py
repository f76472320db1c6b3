"""`make run`'s command on SQLite: up within 60 s, the README's quick start
and its `ray job submit` command work verbatim, `chronoray down` drains it
(a running script finishes and its result is stored) and stops it."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from chronoray.deploy import MALLOC_ENVIRONMENT, free_port
from storage.schema import tasks
from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def readme_block(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    pattern = rf"<!-- {marker} -->\n```bash\n(.*?)```\n<!-- /{marker} -->"
    return re.search(pattern, readme, re.S).group(1)


def quickstart(port: int) -> str:
    return readme_block("quickstart").replace("127.0.0.1:8000", f"127.0.0.1:{port}")


def listeners_on(port: int) -> str:
    """Who listens on ``port`` (for a failure's message)."""
    shown = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=False)
    return "\n".join(line for line in shown.stdout.splitlines() if f":{port} " in line)


def pids_matching(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


def children_of(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(child) for child in found.stdout.split()]


def cmdline_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""  # it exited since it was listed


def environ_of(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def json_objects(text: str) -> list[dict]:
    """curl prints bodies back to back, without newlines."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) != -1:
        obj, at = decoder.raw_decode(text, at)
        objects.append(obj)
    return objects


def test_up_on_sqlite_serves_the_readme_quick_start(tmp_path, deployment):
    """``deployment`` keeps a second Ray on the host: a job's driver finds its
    cluster by "auto", which picks any GCS on the host unless the cluster's
    temp dir names it, so the job must still reach `up`'s cluster."""
    other_gcs_port = deployment.head.address.rsplit(":", 1)[1]
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="cre-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHRONORAY_", "RAY_"))}
    env.update(
        {
            "CHRONORAY_DATA_DIR": str(tmp_path / "data"),
            "CHRONORAY_HTTP_PORT": str(port),
            "RAY_TMPDIR": ray_tmp,
        }
    )
    log = open(tmp_path / "up.log", "w+")
    started = time.monotonic()
    up = subprocess.Popen(
        [str(Path(sys.executable).parent / "chronoray"), "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while "chronoray is up at" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() - started < 60, "not up within 60 s"
            time.sleep(0.25)
        up_after_s = time.monotonic() - started
        print(f"chronoray up after {up_after_s:.1f} s")
        # up's raylet and the actors it started run with up's malloc settings
        [raylet] = pids_matching(f"ray/raylet/raylet .*{ray_tmp}")
        actors = [pid for pid in children_of(raylet) if "Shell" in cmdline_of(pid)]
        assert len(actors) >= 4, [cmdline_of(pid) for pid in children_of(raylet)]
        for pid in [raylet, *actors]:
            assert environ_of(pid).items() >= MALLOC_ENVIRONMENT.items(), cmdline_of(pid)
        assert (tmp_path / "data" / "chronoray.db").exists()

        printed = re.search(
            r"^export CHRONORAY_TOKEN=(\S+)$", (tmp_path / "up.log").read_text(), re.M
        )
        assert printed, (tmp_path / "up.log").read_text()[-3000:]
        token = printed.group(1)
        assert (tmp_path / "data" / "local-token").read_text().strip() == token
        shown = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", quickstart(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "CHRONORAY_TOKEN": token},
        )
        assert shown.returncode == 0, shown.stderr
        task = json_objects(shown.stdout)[-1]
        assert task["status"] == "succeeded", task
        assert task["output"] == "hello world\n"
        assert 0 <= task["fire_lag_ms"] < 100

        # The README's `ray job submit`, verbatim, from the checkout (the
        # dashboard on 127.0.0.1:8265, Ray's token auth on)
        assert (
            "Ray jobs: RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265"
            in (tmp_path / "up.log").read_text()
        ), (tmp_path / "up.log").read_text()[-3000:] + listeners_on(8265)
        job = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", readme_block("job-submit")],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith(("CHRONORAY_", "RAY_"))},
        )
        assert job.returncode == 0, job.stdout[:3000] + job.stdout[-3000:] + listeners_on(8265)
        driver_address = re.search(r"Using address (\S+) set in the environment", job.stdout)
        assert driver_address, job.stdout[:3000]
        assert not driver_address.group(1).endswith(f":{other_gcs_port}"), job.stdout[:3000]
        summary = json.loads(
            [line for line in job.stdout.splitlines() if line.startswith('{"scheduled"')][-1]
        )
        assert summary["scheduled"] == summary["succeeded"] == 20

        base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
        # the README's console: sign in at /ui with the printed token (SQLite)
        with httpx.Client(base_url=base, timeout=30) as browser:
            form = browser.get("/ui/login")
            check = re.search(r'name="login_check" value="([^"]+)"', form.text).group(1)
            signed = browser.post("/ui/login", data={"token": token, "login_check": check})
            assert signed.status_code == 303 and signed.headers["location"] == "/ui/"
            overview = browser.get("/ui/")
            assert overview.status_code == 200 and 'id="count-succeeded"' in overview.text
            listed = browser.get("/ui/tasks")
            assert listed.status_code == 200 and "hello.sh" in listed.text
        httpx.post(
            f"{base}/v1/scripts",
            json={"name": "slow.sh", "body": "sleep 3; echo drained"},
            headers=auth,
        ).raise_for_status()
        slow = httpx.post(
            f"{base}/v1/tasks", json={"script": "slow.sh", "execute_at": time.time()}, headers=auth
        ).json()["task_id"]
        wait_for(
            lambda: (
                httpx.get(f"{base}/v1/tasks/{slow}", headers=auth).json()["status"] == "running"
            ),
            timeout_s=30,
            what="the slow script to start",
        )
        down = subprocess.run(
            [str(Path(sys.executable).parent / "chronoray"), "down"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.wait(timeout=10) == 0
        assert not list(Path(ray_tmp).rglob("ray_current_cluster")), "up left its address file"
        assert "every running script finished" in (tmp_path / "up.log").read_text()
        assert not (tmp_path / "data" / "up.json").exists()
        engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'chronoray.db'}")
        with engine.connect() as conn:
            row = conn.execute(
                select(tasks.c.status, tasks.c.attempt).where(tasks.c.task_id == slow)
            ).one()
        engine.dispose()
        assert tuple(row) == ("succeeded", 1)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
        finally:
            subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]


def test_up_refuses_a_tier_no_node_can_host(tmp_path):
    """Checked against the Ray that `up` started: a tier asking for more
    CPUs than the node has would leave its executors pending forever."""
    config = tmp_path / "chronoray.yaml"
    config.write_text(
        "dashboard_port: 0\n"
        "tiers:\n"
        "  - {name: small, min_priority: 0, resources: {chronoray_small: 1}}\n"
        "  - {name: huge, min_priority: 5, num_cpus: 64, resources: {chronoray_huge: 1}}\n"
    )
    ray_tmp = tempfile.mkdtemp(prefix="cre-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHRONORAY_", "RAY_"))}
    env.update({"CHRONORAY_DATA_DIR": str(tmp_path / "data"), "RAY_TMPDIR": ray_tmp})
    try:
        up = subprocess.run(
            [str(Path(sys.executable).parent / "chronoray"), "up", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert up.returncode == 2, up.stdout + up.stderr
    said = " ".join(up.stderr.split())
    assert f"{config}:4: tier 'huge' asks for chronoray_huge=1, CPU=64" in said, said
    assert "chronoray is up" not in up.stdout
