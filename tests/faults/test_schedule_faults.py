"""Schedules under faults: the shard that owns the next occurrence is killed
just before it is due; the whole scheduler is stopped over three fires."""

import os
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import ray
from sqlalchemy import select

from actors.handles import shard_handle
from scheduling.cron import CronSchedule
from storage.schema import schedules as schedules_table
from storage.schema import tasks
from tests.conftest import shared_file
from tests.ray_cluster import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow]
UTC = timezone.utc


def fired(path: Path) -> list[datetime]:
    if not path.exists():
        return []
    return [datetime.fromisoformat(line.split()[-1]) for line in path.read_text().splitlines()]


def sleep_until(at: datetime) -> None:
    time.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()))


def test_killing_the_owner_just_before_an_occurrence_still_fires_it_once(
    deployment, client, tmp_path
):
    ledger = shared_file(tmp_path, "ledger")
    client.register_script("owner-kill.sh", f'echo "$CHRONORAY_FIRE_TIME" >> {ledger}')
    schedule = client.create_schedule("owner-kill.sh", "*/5 * * * * *")
    target = schedule.next_fire_at + timedelta(
        seconds=5
    )  # its occurrence exists once the first fires
    owner = deployment.settings.wheel.shard_of(target)
    handle = shard_handle(owner, deployment.settings.namespace)
    pid = ray.get(handle.pid.remote())
    sleep_until(target - timedelta(seconds=0.8))
    os.kill(pid, signal.SIGKILL)
    sleep_until(target + timedelta(seconds=12))
    client.delete_schedule(schedule.schedule_id)
    times = fired(ledger)
    assert times.count(target) == 1, times
    assert len(times) == len(set(times))
    assert target + timedelta(seconds=10) in times  # the chain went on after the restart


def test_misfire_policies_after_the_scheduler_stopped_over_three_fires(
    deployment, client, tmp_path
):
    settings = deployment.settings
    pids = [
        ray.get(shard_handle(i, settings.namespace).pid.remote())
        for i in range(settings.num_shards)
    ]
    # Every 15 s, first in ~7 s: frozen from before the first fire until 32 s
    # after it, the shards miss exactly three fires, and when they resume the
    # first is more than the 30 s misfire grace late.
    base = datetime.now(UTC).replace(microsecond=0)
    first = base + timedelta(seconds=8)
    seconds = sorted((first.second + 15 * k) % 60 for k in range(4))
    cron = f"{','.join(map(str, seconds))} * * * * *"
    assert settings.misfire.grace_s < 32 and 15 * 3 > 32
    ids, ledgers = {}, {}
    for policy in ("skip", "fire_once", "fire_all"):
        ledgers[policy] = shared_file(tmp_path, policy)
        client.register_script(
            f"misfire-{policy}.sh", f'echo "$CHRONORAY_FIRE_TIME" >> {ledgers[policy]}'
        )
        ids[policy] = client.create_schedule(
            f"misfire-{policy}.sh", cron, misfire_policy=policy
        ).schedule_id

    stopped_at = datetime.now(UTC)
    assert stopped_at < first - timedelta(seconds=1), "set-up outlasted the first fire's lead"
    for pid in pids:  # every shard frozen: nothing fires
        os.kill(pid, signal.SIGSTOP)
    try:
        sleep_until(first + timedelta(seconds=32))
    finally:
        resumed_at = datetime.now(UTC)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    missed = CronSchedule(cron).fires_between(stopped_at, resumed_at, limit=100)
    assert len(missed) == 3 and missed[0] == first

    def counted_misses() -> dict[int, int]:
        with deployment.repo.engine.connect() as conn:
            return dict(
                conn.execute(
                    select(schedules_table.c.schedule_id, schedules_table.c.missed_fires).where(
                        schedules_table.c.schedule_id.in_(list(ids.values()))
                    )
                ).all()
            )

    expected = {ids["skip"]: 3, ids["fire_once"]: 2, ids["fire_all"]: 0}
    wait_for(  # the timers catch up; the runs finish
        lambda: (
            counted_misses() == expected
            and len(fired(ledgers["fire_once"])) >= 1
            and len(fired(ledgers["fire_all"])) >= 3
        ),
        timeout_s=30,
        what="the missed fires to be handled",
    )
    # the audit finds the three fires the skip policy dropped, and nothing else
    audit = client.audit_schedule(ids["skip"], stopped_at, resumed_at)
    assert [(f.nominal_at, f.kind) for f in audit.findings] == [(t, "missed") for t in missed]
    for schedule_id in ids.values():
        client.delete_schedule(schedule_id)

    assert fired(ledgers["skip"]) == []
    assert fired(ledgers["fire_once"]) == [missed[-1]]
    assert sorted(fired(ledgers["fire_all"])) == missed
    counted = counted_misses()
    with deployment.repo.engine.connect() as conn:
        occurrences = conn.execute(
            select(tasks.c.schedule_id, tasks.c.nominal_at, tasks.c.status).where(
                tasks.c.schedule_id.in_(list(ids.values()))
            )
        ).all()
    assert counted == {ids["skip"]: 3, ids["fire_once"]: 2, ids["fire_all"]: 0}
    nominal = {(o.schedule_id, o.nominal_at) for o in occurrences}
    assert len(nominal) == len(occurrences)  # no occurrence twice
