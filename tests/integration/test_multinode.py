"""Tiers on several Ray nodes with different resources (simulated cluster,
in a process of its own: see tests/multinode_scenario.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import create_postgres_database

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def facts():
    done = subprocess.run(
        [sys.executable, "-m", "tests.multinode_scenario", create_postgres_database("multinode")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("FACTS ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(lines[-1][len("FACTS ") :])


def test_low_priority_tasks_run_on_small_nodes(facts):
    runs = [run for task in facts["low_priority"] for run in task]
    assert len(runs) == 4
    assert {(r["tier"], r["failure"]) for r in runs} == {("small", None)}
    assert {r["node"] for r in runs} <= {"small-a", "small-b"}


def test_an_escalated_retry_runs_on_the_large_node(facts):
    first, second = facts["escalated"]
    assert (first["tier"], first["failure"]) == ("small", "exit_code")
    assert first["node"] in {"small-a", "small-b"}
    assert (second["priority"], second["tier"], second["node"]) == (1, "large", "large")
    assert second["failure"] is None


def test_removing_a_node_retries_its_tasks_elsewhere(facts):
    removed = facts["removed_node"]
    print(f"node {removed} removed; its tasks finished {facts['retried_after_removal_s']} s later")
    moved = 0
    for task in facts["after_removal"]:
        assert task["status"] == "succeeded"
        last = task["runs"][-1]
        assert last["failure"] is None and last["node"] != removed
        if len(task["runs"]) > 1:
            assert [r["failure"] for r in task["runs"]] == ["executor_lost", None]
            moved += 1
    assert moved == facts["running_before_removal"][removed]


def test_a_tier_no_node_can_host_is_reported(facts):
    gpu = facts["pool"]["gpu"]
    assert gpu["live"] == 0 and "chronoray_gpu" in gpu["unplaceable"]
    assert facts["pool"]["large"]["unplaceable"] is None
