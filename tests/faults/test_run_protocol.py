"""The run protocol under SIGKILL, on the session deployment (real Ray,
PostgreSQL and ZooKeeper): the reduced chaos subset of issue 10. Scripts
append ``task attempt`` to a ledger; the ledger and the database must agree
that nothing acknowledged was lost and no attempt started twice."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
import ray

from actors.executor_pool import EXECUTOR_PREFIX
from actors.handles import DISPATCHER_NAME, POOL_NAME, shard_handle
from tests.conftest import shared_file
from tests.ray_cluster import runs_per_task, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow]


def actor(deployment, name):
    return ray.get_actor(name, namespace=deployment.settings.namespace)


def sigkill(handle) -> None:
    """SIGKILL an actor's process and wait until Ray has restarted it."""
    pid = ray.get(handle.pid.remote(), timeout=30)
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: ray.get(handle.pid.remote(), timeout=30) != pid,
        timeout_s=60,
        interval_s=0.2,
        what="the actor to restart",
    )


def ledger_script(client, name: str, ledger, body: str = "") -> None:
    client.register_script(
        name, f'echo "$CHRONORAY_TASK_ID $CHRONORAY_ATTEMPT" >> {ledger}\n{body}'
    )


def ledger_lines(ledger) -> Counter:
    return Counter(tuple(map(int, line.split())) for line in ledger.read_text().splitlines())


def assert_each_ran_once(ledger, task_ids) -> None:
    lines = ledger_lines(ledger)
    ran = Counter(task_id for task_id, _ in lines.elements())
    assert {t: ran[t] for t in task_ids if ran[t] != 1} == {}, "a task ran other than once"


def test_output_with_nul_invalid_utf8_or_10_mb_changes_nothing_for_other_tasks(
    deployment, client, tmp_path
):
    """Defect 1 (confirmed before the fix: every later task of the shard
    re-ran until dead). Scenario 4 at reduced size."""
    ledger = shared_file(tmp_path, "ledger")
    ledger_script(client, "chaos-normal.sh", ledger)
    client.register_script("chaos-nul.sh", r"printf 'before\0after'")
    client.register_script("chaos-utf8.sh", r"printf 'bad \xff\xfe bytes'")
    client.register_script("chaos-10mb.sh", "head -c 10000000 /dev/zero | tr '\\0' x")
    due = time.time() + 2
    bad = [client.submit(name, due) for name in ("chaos-nul.sh", "chaos-utf8.sh", "chaos-10mb.sh")]
    normal = client.submit_many(
        [{"script": "chaos-normal.sh", "execute_at": due + i * 0.05} for i in range(60)]
    )
    started = time.monotonic()
    views = client.wait([t.task_id for t in bad + normal], timeout_s=60)
    print(f"63 tasks final {time.monotonic() - started:.1f} s after submission")
    assert {v.task.status.value for v in views} == {"succeeded"}
    assert {v.task.attempt for v in views} == {1}
    nul, utf8, big = (v.runs[0].output_tail for v in views[:3])
    assert "before" in nul and "\x00" not in nul
    assert "bad" in utf8 and "\ufffd" in utf8
    assert big == "x" * 4096
    assert_each_ran_once(ledger, [t.task_id for t in normal])


def test_sigkill_of_the_dispatcher_neither_reruns_nor_strands_attempts(
    deployment, client, tmp_path
):
    """Defect 2 and scenario 1 at reduced size: results in flight and
    running attempts survive the dispatcher; each task runs exactly once."""
    ledger = shared_file(tmp_path, "ledger")
    ledger_script(client, "chaos-dispatcher.sh", ledger, 'sleep "$NAP"')
    rng = random.Random(1)
    start = time.time() + 2
    tasks = client.submit_many(
        [
            {
                "script": "chaos-dispatcher.sh",
                "execute_at": start + i * 0.1,
                "max_attempts": 1,
                "variables": {"NAP": f"{rng.uniform(0.2, 2.0):.2f}"},
            }
            for i in range(150)
        ]
    )
    dispatcher = actor(deployment, DISPATCHER_NAME)
    for at in (4, 9):
        time.sleep(max(0.0, start + at - time.time()))
        sigkill(dispatcher)
    views = client.wait([t.task_id for t in tasks], timeout_s=120, poll_s=0.5)
    assert Counter(v.task.status.value for v in views) == {"succeeded": 150}
    assert {v.task.attempt for v in views} == {1}
    assert set(runs_per_task(deployment, [t.task_id for t in tasks]).values()) == {1}
    assert_each_ran_once(ledger, [t.task_id for t in tasks])


def test_sigkill_of_the_pool_leaves_running_scripts_alone(deployment, client, tmp_path):
    """Defect 5 and scenario 3 at reduced size: a restarting pool must not
    make its executors kill healthy work."""
    ledger = shared_file(tmp_path, "ledger")
    ledger_script(client, "chaos-pool.sh", ledger, "sleep 8")
    due = time.time() + 1
    tasks = client.submit_many(
        [{"script": "chaos-pool.sh", "execute_at": due, "max_attempts": 1} for _ in range(12)]
    )
    wait_for(lambda: len(ledger_lines(ledger)) == 12, timeout_s=30, what="every script to start")
    sigkill(actor(deployment, POOL_NAME))
    views = client.wait([t.task_id for t in tasks], timeout_s=60, poll_s=0.5)
    assert [(v.task.status.value, v.task.attempt) for v in views] == [("succeeded", 1)] * 12
    assert_each_ran_once(ledger, [t.task_id for t in tasks])


def test_executors_killed_just_before_the_due_instant_use_no_attempt(deployment, client, tmp_path):
    """Defect 6 and scenario 8 at reduced size: attempts handed over early
    (prefire) whose executor dies before the start are retried for free."""
    ledger = shared_file(tmp_path, "ledger")
    ledger_script(client, "chaos-prefire.sh", ledger)
    namespace = deployment.settings.namespace
    pool = actor(deployment, POOL_NAME)
    large = [
        e["executor_id"]
        for e in ray.get(pool.status.remote())["executors"]
        if e["tier"] == "large" and e["state"] == "live"
    ]
    assert large, "no live executor of the large tier"
    pids = [
        ray.get(ray.get_actor(EXECUTOR_PREFIX + e, namespace=namespace).info.remote())["pid"]
        for e in large
    ]
    due = time.time() + 4
    tasks = client.submit_many(
        [
            {"script": "chaos-prefire.sh", "execute_at": due, "max_attempts": 1, "priority": 3}
            for _ in range(10)
        ]
    )
    dispatcher = actor(deployment, DISPATCHER_NAME)

    def handed_over():
        stats = ray.get(dispatcher.stats.remote())
        return sum(stats["executors"].get(e, {}).get("running", 0) for e in large) == 10

    wait_for(handed_over, timeout_s=10, interval_s=0.01, what="the early hand-over")
    time.sleep(max(0.0, due - 0.1 - time.time()))
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    views = client.wait([t.task_id for t in tasks], timeout_s=90, poll_s=0.5)
    assert Counter(v.task.status.value for v in views) == {"succeeded": 10}
    assert all(v.runs[0].failure.value == "executor_lost" for v in views)
    assert_each_ran_once(ledger, [t.task_id for t in tasks])


def test_shard_sigkill_during_keyless_submissions_stores_each_answer_once(
    deployment, http, tmp_path
):
    """Defect 3 (confirmed before the fix: 4 of 2,073 stored twice) and
    scenario 2 at reduced size: one row per 2xx, and each runs."""
    settings = deployment.settings
    ledger = shared_file(tmp_path, "ledger")
    http.post(
        "/v1/scripts",
        json={"name": "chaos-submit.sh", "body": f'echo "$CHRONORAY_TASK_ID 1" >> {ledger}'},
    ).raise_for_status()
    answered: list[int] = []
    refused = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def submitter(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            at = datetime.now(timezone.utc) + timedelta(seconds=rng.uniform(5, 8))
            try:
                answer = http.post(
                    "/v1/tasks", json={"script": "chaos-submit.sh", "execute_at": at.isoformat()}
                )
            except Exception as exc:
                refused[type(exc).__name__] += 1
                continue
            if answer.status_code in (200, 201):
                with lock:
                    answered.append(answer.json()["task_id"])
            else:
                refused[answer.status_code] += 1

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(2):
            time.sleep(2)
            owner = settings.wheel.shard_of(datetime.now(timezone.utc) + timedelta(seconds=6))
            sigkill(shard_handle(owner, settings.namespace))
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    print(f"{len(answered)} acknowledged, refused: {dict(refused)}")
    assert len(answered) > 50
    assert set(refused) <= {503}, f"refusals other than 503: {refused}"
    from sqlalchemy import func, select

    from storage.schema import scripts, tasks

    with deployment.repo.engine.connect() as conn:
        stored = conn.execute(
            select(func.count())
            .select_from(tasks.join(scripts, scripts.c.script_id == tasks.c.script_id))
            .where(scripts.c.name == "chaos-submit.sh")
        ).scalar()
    assert stored == len(answered) == len(set(answered))
    wait_for(
        lambda: len(ledger_lines(ledger)) >= len(answered),
        timeout_s=60,
        interval_s=0.5,
        what="every acknowledged task to run",
    )
    assert_each_ran_once(ledger, answered)


def test_two_owners_of_one_shard_never_start_an_attempt_twice(deployment, client, tmp_path):
    """Scenario 10 at reduced size: the shard's actor is stopped (SIGSTOP), a
    second owner starts on the same database and fires, then the first
    wakes (SIGCONT). Epoch fencing keeps the first from claiming; the named
    actor takes the shard back and the second owner leaves."""
    from actors.shard_actor import ShardActor
    from chronoray.deploy import control_plane_options

    settings = deployment.settings
    ledger = shared_file(tmp_path, "ledger")
    ledger_script(client, "chaos-owners.sh", ledger)
    start = time.time() + 3
    owner = settings.wheel.shard_of(datetime.fromtimestamp(start, timezone.utc))
    # 16 s of tasks, all due in the range of one shard's owner
    due = [start + i * 0.2 for i in range(80)]
    due = [
        t for t in due if settings.wheel.shard_of(datetime.fromtimestamp(t, timezone.utc)) == owner
    ]
    tasks = client.submit_many(
        [{"script": "chaos-owners.sh", "execute_at": t, "max_attempts": 1} for t in due]
    )
    first = shard_handle(owner, settings.namespace)
    pid = ray.get(first.pid.remote(), timeout=30)
    os.kill(pid, signal.SIGSTOP)
    try:
        second = ShardActor.options(
            **{**control_plane_options(f"second-owner-{owner}", settings), "max_restarts": 0}
        ).remote(owner, settings)
        ray.get(second.ready.remote(), timeout=30)
        time.sleep(max(0.0, start + 6 - time.time()))  # the second owner fires for a while
    finally:
        os.kill(pid, signal.SIGCONT)
    views = client.wait([t.task_id for t in tasks], timeout_s=90, poll_s=0.5)
    assert Counter(v.task.status.value for v in views) == {"succeeded": len(tasks)}
    assert {v.task.attempt for v in views} == {1}
    assert_each_ran_once(ledger, [t.task_id for t in tasks])

    def second_left() -> bool:
        try:
            ray.get(second.pid.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return True
        return False

    wait_for(second_left, timeout_s=30, interval_s=0.5, what="the second owner to leave")
    assert ray.get(first.pid.remote(), timeout=10) == pid  # the named actor kept its shard


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
    ledger_script(client, "chaos-down.sh", ledger, 'sleep "$NAP"')
    now = time.time()
    short = client.submit_many(
        [
            {
                "script": "chaos-down.sh",
                "execute_at": now,
                "max_attempts": 1,
                "variables": {"NAP": "3"},
            }
            for _ in range(6)
        ]
    )
    long = client.submit_many(
        [
            {
                "script": "chaos-down.sh",
                "execute_at": now,
                "max_attempts": 2,
                "variables": {"NAP": "12"},
            }
            for _ in range(2)
        ]
    )
    future = client.submit_many(
        [
            {"script": "chaos-down.sh", "execute_at": now + 20, "variables": {"NAP": "0"}}
            for _ in range(10)
        ]
    )
    wait_for(lambda: len(ledger_lines(ledger)) == 8, timeout_s=30, what="8 scripts to start")
    held = drain_and_stop(deployment.settings, grace_s=6)
    assert held == 2  # the long ones outlived the grace
    views = client.wait([t.task_id for t in short], timeout_s=5)
    assert [(v.task.status.value, v.task.attempt) for v in views] == [("succeeded", 1)] * 6

    deploy(deployment.settings)
    views = client.wait([t.task_id for t in long + future], timeout_s=90, poll_s=0.5)
    assert Counter(v.task.status.value for v in views) == {"succeeded": 12}
    assert [v.task.attempt for v in views[:2]] == [2, 2]
    assert [v.runs[0].failure.value for v in views[:2]] == ["executor_lost"] * 2
    lines = ledger_lines(ledger)
    assert {(t.task_id, a): lines[(t.task_id, a)] for t in long for a in (1, 2)} == {
        (t.task_id, a): 1 for t in long for a in (1, 2)
    }
    assert_each_ran_once(ledger, [t.task_id for t in short + future])
