"""Python drivers: chronoray.Client directly and through `ray job submit`."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scheduling.errors import InvalidInput, ScriptNotFound

pytestmark = [pytest.mark.ray, pytest.mark.postgres]
ROOT = Path(__file__).resolve().parents[2]


def test_client_registers_submits_waits_and_validates(client):
    client.register_script(
        "client.py", "import os\nprint('py', os.environ['X'])\n", interpreter="python"
    )
    task = client.submit("client.py", time.time() + 1, variables={"X": "1"})
    [view] = client.wait([task.task_id], timeout_s=60)
    assert view.task.status.value == "succeeded" and view.runs[0].output_tail == "py 1\n"
    with pytest.raises(ScriptNotFound):
        client.submit("missing.py", time.time())
    with pytest.raises(InvalidInput) as bad:
        client.submit("client.py", "2030-01-01T00:00:00")
    assert bad.value.field == "execute_at"


@pytest.mark.slow
def test_example_driver_through_ray_job_submit(deployment):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for _ in range(20):  # the head's job agent may still be starting
        completed = submit_job(deployment, env)
        if "No available agent" not in completed.stderr:
            break
        time.sleep(3)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads(
        [line for line in completed.stdout.splitlines() if line.startswith("{")][-1]
    )
    assert summary["scheduled"] == summary["succeeded"] == 5
    assert len(summary["outputs"]) == 5
    assert all(o.startswith("hello from task ") for o in summary["outputs"])


def submit_job(deployment, env):
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            deployment.head.dashboard_url,
            "--working-dir",
            str(ROOT / "examples"),
            "--",
            sys.executable,
            "schedule_batch.py",
            "--count",
            "5",
            "--namespace",
            deployment.settings.namespace,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def test_cli_registers_submits_and_shows(deployment, tmp_path):
    chronoray = str(Path(sys.executable).parent / "chronoray")
    script = tmp_path / "cli.sh"
    script.write_text('echo "cli says $GREETING"')

    def cli(*args):
        done = subprocess.run(
            [chronoray, "--url", deployment.url, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "CHRONORAY_TOKEN": deployment.token},
        )
        return done.returncode, done.stdout, done.stderr

    code, out, _ = cli("scripts", "add", "cli.sh", str(script), "--json")
    assert code == 0 and json.loads(out)["name"] == "cli.sh"
    code, out, _ = cli("submit", "cli.sh", "--at", "+1s", "--var", "GREETING=hi", "--json")
    assert code == 0
    task_id = json.loads(out)["task_id"]
    deadline = time.monotonic() + 60
    while True:
        code, out, _ = cli("tasks", "show", str(task_id), "--json")
        shown = json.loads(out)
        if shown["status"] == "succeeded" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert shown["status"] == "succeeded" and shown["output"] == "cli says hi\n"
    code, _, err = cli("submit", "cli.sh", "--at", "2030-01-01T00:00:00")
    assert code == 1 and "422" in err and "execute_at" in err
    code, _, err = cli("tasks", "show", "99999999")
    assert code == 1 and "404" in err
    code, out, _ = cli("tasks", "list", "--script", "cli.sh", "--status", "succeeded", "--json")
    assert code == 0 and [t["task_id"] for t in json.loads(out)["tasks"]] == [task_id]
    code, _, err = cli("tasks", "list", "--status", "finished")
    assert code == 1 and "422" in err and "status" in err


def test_client_lists_tasks_page_by_page(client):
    client.register_script("listed.sh", "echo listed")
    later = time.time() + 3600
    submitted = [client.submit("listed.sh", later + i).task_id for i in range(5)]
    seen, cursor = [], None
    while True:
        page, cursor = client.list_tasks(script="listed.sh", limit=2, cursor=cursor)
        seen += [t.task_id for t in page]
        if cursor is None:
            break
    assert seen == submitted[::-1]
    for task_id in submitted:
        client.cancel(task_id)
    assert client.list_tasks(script="listed.sh", status=["scheduled"])[0] == []


def test_cli_manages_a_schedule(deployment, tmp_path):
    chronoray = str(Path(sys.executable).parent / "chronoray")

    def cli(*args):
        done = subprocess.run(
            [chronoray, "--url", deployment.url, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "CHRONORAY_TOKEN": deployment.token},
        )
        return done.returncode, done.stdout, done.stderr

    script = tmp_path / "cli-cron.sh"
    script.write_text("echo tick")
    assert cli("scripts", "add", "cli-cron.sh", str(script))[0] == 0
    code, out, _ = cli(
        "schedules", "create", "cli-cron.sh", "30 2 * * *", "--timezone", "Europe/Berlin", "--json"
    )
    assert code == 0
    schedule_id = str(json.loads(out)["schedule_id"])
    code, out, _ = cli("schedules", "preview", schedule_id, "--count", "3", "--json")
    assert code == 0 and len(json.loads(out)["fires"]) == 3
    code, out, _ = cli("schedules", "update", schedule_id, "--cron", "0 3 * * *", "--json")
    assert code == 0 and json.loads(out)["cron"] == "0 3 * * *"
    code, out, _ = cli("schedules", "pause", schedule_id, "--json")
    assert code == 0 and json.loads(out)["paused"] is True
    code, out, _ = cli("schedules", "show", schedule_id, "--json")
    assert code == 0 and json.loads(out)["next_fire_at"] is None
    code, _, err = cli("schedules", "update", schedule_id, "--cron", "0 0 30 2 *")
    assert code == 1 and "422" in err and "cron" in err
    assert cli("schedules", "delete", schedule_id)[0] == 0
    code, _, err = cli("schedules", "show", schedule_id)
    assert code == 1 and "404" in err
