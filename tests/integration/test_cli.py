"""The chronoray CLI against the real deployment: users and tokens (admin),
scripts, a JSON Lines file submitted with a progress bar, runs, tasks,
executors; --json on each."""

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres]
CHRONORAY = str(Path(sys.executable).parent / "chronoray")


def cli(deployment, *args, token=None, admin=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONORAY_")}
    env["CHRONORAY_DATA_DIR"] = "/nonexistent"  # no local token to fall back on
    if token:
        env["CHRONORAY_TOKEN"] = token
    if admin:
        env["CHRONORAY_ADMIN_TOKEN"] = deployment.settings.admin_token
    done = subprocess.run(
        [CHRONORAY, "--url", deployment.url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    return done.returncode, done.stdout, done.stderr


def test_users_scripts_file_submission_runs_and_executors(deployment, tmp_path):
    code, out, err = cli(deployment, "users", "create", "Cli", "User", "--json", admin=True)
    assert code == 0, err
    user = json.loads(out)
    token = user["token"]["token"]
    code, out, _ = cli(deployment, "users", "list", admin=True)
    assert code == 0 and "Cli" in out
    code, out, _ = cli(deployment, "users", "me", "--json", token=token)
    assert json.loads(out)["user_id"] == user["user_id"]
    code, _, err = cli(deployment, "users", "list", token=token)  # a user is no admin
    assert code == 1 and "401" in err

    script = tmp_path / "cli.sh"
    script.write_text('echo "line $N"')
    code, out, err = cli(deployment, "scripts", "add", "cli.sh", str(script), "--json", token=token)
    assert code == 0 and json.loads(out)["version"] == 1, err
    script.write_text('echo "line $N!"')
    cli(deployment, "scripts", "add", "cli.sh", str(script), token=token)
    code, out, _ = cli(deployment, "scripts", "versions", "cli.sh", "--json", token=token)
    assert [v["version"] for v in json.loads(out)["versions"]] == [2, 1]
    code, out, _ = cli(deployment, "scripts", "show", "cli.sh", "--body", token=token)
    assert out == 'echo "line $N!"'
    code, out, _ = cli(deployment, "scripts", "list", token=token)
    assert code == 0 and "cli.sh" in out

    tasks = tmp_path / "tasks.jsonl"
    now = time.time()
    tasks.write_text(
        "\n".join(
            json.dumps({"script": "cli.sh", "execute_at": now + 1, "variables": {"N": str(i)}})
            for i in range(25)
        )
        + "\n"
    )
    code, out, err = cli(
        deployment, "submit", "--file", str(tasks), "--batch-size", "10", token=token
    )
    assert code == 0, err
    assert "25 tasks submitted (25 new)" in out and "submitting tasks.jsonl" in err
    code, out, _ = cli(
        deployment, "submit", "--file", str(tasks), "--batch-size", "10", "--json", token=token
    )
    summary = json.loads(out)
    assert summary["submitted"] == 25 and summary["created"] == 25
    first = summary["task_ids"][0]
    wait_for(
        lambda: (
            json.loads(cli(deployment, "tasks", "show", str(first), "--json", token=token)[1])[
                "status"
            ]
            == "succeeded"
        ),
        timeout_s=60,
        what="a file task",
    )
    code, out, _ = cli(deployment, "runs", "list", str(first), "--json", token=token)
    [run] = json.loads(out)["runs"]
    assert run["status"] == "succeeded"
    code, out, _ = cli(deployment, "runs", "output", str(first), "1", token=token)
    assert out == "line 0!\n"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"script": "cli.sh", "execute_at": now + 60})
        + "\n"
        + json.dumps({"script": "cli.sh", "execute_at": "tomorrow"})
        + "\n"
    )
    code, _, err = cli(deployment, "submit", "--file", str(bad), token=token)
    assert code == 1 and "bad.jsonl:2" in err and "execute_at" in err
    code, _, err = cli(deployment, "submit", "--file", str(tmp_path / "none.jsonl"), token=token)
    assert code == 2

    code, out, _ = cli(deployment, "tasks", "list", "--script", "cli.sh", "--json", token=token)
    assert len(json.loads(out)["tasks"]) == 50  # the file twice; the bad file stored nothing
    later = cli(deployment, "submit", "cli.sh", "--at", "+1h", "--json", token=token)[1]
    task_id = json.loads(later)["task_id"]
    code, out, _ = cli(deployment, "tasks", "cancel", str(task_id), "--json", token=token)
    assert code == 0 and json.loads(out)["status"] == "cancelled"

    code, out, _ = cli(deployment, "executors", "--json", token=token)
    assert code == 0 and json.loads(out)["tiers"]
    code, out, _ = cli(deployment, "executors", token=token)
    assert code == 0 and "tier" in out

    code, _, err = cli(deployment, "tasks", "list", token="cr_wrong")
    assert code == 1 and "401" in err


def test_schedules_backfill_and_audit(deployment, tmp_path):
    _, token = deployment.new_user("cli-backfill")
    script = tmp_path / "tick.sh"
    script.write_text("true")
    cli(deployment, "scripts", "add", "tick.sh", str(script), token=token)
    code, out, err = cli(
        deployment, "schedules", "create", "tick.sh", "*/10 * * * *", "--json", token=token
    )
    assert code == 0, err
    schedule_id = str(json.loads(out)["schedule_id"])
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    window = ["--from", (now - timedelta(minutes=30)).isoformat(), "--to", now.isoformat()]
    code, out, err = cli(deployment, "schedules", "backfill", schedule_id, *window, token=token)
    assert code == 0 and "3 times in the window, 3 backfilled, 0 had an occurrence" in out, err
    code, out, _ = cli(
        deployment, "schedules", "backfill", schedule_id, *window, "--json", token=token
    )
    assert json.loads(out)["created"] == [] and json.loads(out)["existing"] == 3
    future = ["--from", now.isoformat(), "--to", (now + timedelta(hours=1)).isoformat()]
    code, _, err = cli(deployment, "schedules", "backfill", schedule_id, *future, token=token)
    assert code == 1 and "422" in err and "(to)" in err
    code, out, err = cli(deployment, "schedules", "audit", schedule_id, token=token)
    assert code == 0 and "expected 0, ran 0, missed 0, late 0, duplicated 0" in out, err
