"""The run protocol under SIGKILL, on the session deployment (real Ray,
PostgreSQL and ZooKeeper): the chaos harness's scenarios 1-4, 8 and 10 at
reduced size (``make chaos`` runs all 12 at full size on durable
PostgreSQL), and `chronoray down` followed by a new start. Scripts append
``task attempt clock`` to a ledger; the ledger and the database must agree
that nothing acknowledged was lost and no attempt started twice."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import ray

from bench.chaos import (
    SCENARIOS,
    Harness,
    Outcome,
    ledger_body,
    ledger_entries,
    ledger_lines,
    table,
)
from tests.conftest import shared_file
from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow]

# scenario -> load factor: a few seconds of load each
REDUCED = {4: 0.3, 1: 0.075, 3: 0.3, 8: 0.1, 2: 0.3, 10: 0.3}


@pytest.mark.parametrize("number", list(REDUCED))
def test_chaos_scenario_at_reduced_size(deployment, tmp_path, number):
    """Scenario 4 is defect 1 (confirmed before its fix: every later task of
    the shard re-ran until dead); 1 is defect 2; 2 is defect 3 (confirmed:
    4 of 2,073 stored twice); 3 is defect 5; 8 is defect 6; 10 is two owners
    of one shard (the older one must step aside, not fire beside)."""
    harness = Harness.attach(deployment, tmp_path)
    outcome = Outcome(str(number))
    SCENARIOS[number](harness, outcome, REDUCED[number])
    print(table([outcome]))
    assert outcome.acknowledged > 0
    assert outcome.passed, outcome.problems


def ledger_script(client, name: str, ledger, body: str = "") -> None:
    client.register_script(name, ledger_body(ledger, body))


def describe_runs(view) -> list[str]:
    """What each run of a task ended as, for a failure's message: the
    executor's own errors are in the output tail (the test cluster's logs
    go with it)."""
    return [
        f"task {view.task.task_id} attempt {run.attempt} on {run.executor_id}: "
        f"{run.failure.value if run.failure else 'ok'} exit {run.exit_code} "
        f"started {run.started_at}: {run.output_tail[-300:]!r}"
        for run in view.runs
    ]


def assert_each_ran_once(ledger, task_ids) -> None:
    ran = Counter(task_id for task_id, _ in ledger_lines(ledger).elements())
    assert {t: ran[t] for t in task_ids if ran[t] != 1} == {}, "a task ran other than once"


def test_a_queued_attempt_whose_hand_over_never_arrived_runs_once_without_its_lease(
    deployment, client, tmp_path
):
    """The dispatcher's net under every way of dropping an attempt on its
    way: one queued in the database since longer than DROPPED_AFTER_S that
    no one holds (here claimed behind its shard's back, as if the hand-over
    were lost) is placed by a recovery pass (every 5 s) and runs once, on
    time, not when its 10-minute queue lease ends."""
    from actors.dispatcher import DROPPED_AFTER_S
    from actors.handles import dispatcher_handle

    ledger = shared_file(tmp_path, "ledger")
    ledger_script(client, "dropped.sh", ledger)
    # Its shard would claim it 250 ms before; two recovery passes fit before
    # (one is a no-op while an executor does not say what it holds).
    due = time.time() + 12
    task = client.submit("dropped.sh", due, max_attempts=1)
    shard = deployment.settings.wheel.owner_of(task.task_id, task.execute_at)
    now = datetime.now(UTC)
    leased_at = now - timedelta(seconds=DROPPED_AFTER_S + 1)
    claimed = deployment.repo.claim(
        [task.task_id],
        shard=shard,
        epoch=deployment.repo.shard_epoch(shard),
        lease_until=leased_at + timedelta(seconds=deployment.settings.queue_lease_s),
        now=now,
    )
    assert [spec.task_id for spec in claimed.specs] == [task.task_id]
    [view] = client.wait([task.task_id], timeout_s=30)
    assert view.task.status.value == "succeeded", describe_runs(view)
    [(_, attempt, started, _)] = ledger_entries(ledger)
    assert attempt == 1
    assert due <= started < due + 1.0, "placed by a recovery pass before it was due"
    stats = ray.get(dispatcher_handle(deployment.settings.namespace).stats.remote(), timeout=10)
    assert stats["dropped_recovered"] >= 1


def test_down_lets_running_scripts_finish_and_the_next_start_runs_the_rest(
    deployment, client, tmp_path
):
    """Defect 8 and scenario 6 at reduced size. `chronoray down` (drain and
    stop) with short scripts running, long ones that outlive the grace, and
    future tasks; then a new start: the short ones finished once, the long
    ones are resolved at start (executor_lost, run again), the future ones
    run once. Nothing stays running."""
    from chronoray.deploy import deploy, drain_and_stop

    ledger = shared_file(tmp_path, "ledger")
    # a retry runs at once: the test need not wait out a second long nap
    ledger_script(client, "chaos-down.sh", ledger, '[ "$CHRONORAY_ATTEMPT" -gt 1 ] || sleep "$NAP"')
    now = time.time()

    def sleepers(count: int, at: float, nap: str, **fields):
        request = {"script": "chaos-down.sh", "execute_at": at, "variables": {"NAP": nap}}
        return client.submit_many([{**request, **fields}] * count)

    short = sleepers(6, now, "3", max_attempts=1)
    long = sleepers(2, now, "12", max_attempts=2)
    future = sleepers(10, now + 20, "0")
    wait_for(lambda: len(ledger_lines(ledger)) == 8, timeout_s=30, what="8 scripts to start")
    held = drain_and_stop(deployment.settings, grace_s=6)
    assert held == 2  # the long ones outlived the grace
    views = client.wait([t.task_id for t in short], timeout_s=5)
    assert [(v.task.status.value, v.task.attempt) for v in views] == [("succeeded", 1)] * 6

    deploy(deployment.settings)
    views = client.wait([t.task_id for t in long + future], timeout_s=90, poll_s=0.5)
    assert Counter(v.task.status.value for v in views) == {"succeeded": 12}, [
        describe_runs(v) for v in views if v.task.status.value != "succeeded"
    ]
    assert [v.task.attempt for v in views[:2]] == [2, 2], [describe_runs(v) for v in views[:2]]
    assert [v.runs[0].failure.value for v in views[:2]] == ["executor_lost"] * 2
    lines = ledger_lines(ledger)
    assert {(t.task_id, a): lines[(t.task_id, a)] for t in long for a in (1, 2)} == {
        (t.task_id, a): 1 for t in long for a in (1, 2)
    }
    assert_each_ran_once(ledger, [t.task_id for t in short + future])
