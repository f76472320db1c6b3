"""Schedules and their occurrences in SQL (SQLite and PostgreSQL): firing
under each misfire and overlap policy, materialising the next occurrence
exactly once, pause/resume/delete/trigger."""

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from scheduling.errors import ScheduleNotFound, ScriptNotFound, TaskNotFound
from scheduling.lifecycle import RetryPolicy
from scheduling.models import Interpreter, NewTask, RunResult, TaskStatus
from scheduling.schedules import MisfirePolicy, MisfireRules, NewSchedule, OverlapPolicy
from storage.schema import tasks

UTC = timezone.utc
T = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a whole minute
LEASE = T + timedelta(minutes=10)


@pytest.fixture
def repo(repo):
    repo.misfire_rules = MisfireRules(grace_s=30, catch_up_window_s=150, max_catch_up=10)
    return repo


@pytest.fixture
def owner(repo):
    owner = repo.ensure_user(first_name="grace", last_name="hopper", now=T)
    repo.add_script(
        owner_id=owner, name="tick.sh", interpreter=Interpreter.BASH, body=b"date", now=T
    )
    return owner


def create(repo, owner, **kw):
    now = kw.pop("now", T - timedelta(seconds=30))
    new = NewSchedule(owner_id=owner, script_name="tick.sh", cron=kw.pop("cron", "* * * * *"), **kw)
    return repo.add_schedule(new, now=now)


def occurrences(repo, schedule_id):
    with repo.engine.connect() as conn:
        return conn.execute(
            select(tasks.c.task_id, tasks.c.nominal_at, tasks.c.status)
            .where(tasks.c.schedule_id == schedule_id)
            .order_by(tasks.c.nominal_at, tasks.c.task_id)
        ).all()


def fire(repo, task_ids, now, epoch=None):
    epoch = epoch or repo.start_shard(0, now=now)
    return repo.claim(task_ids, shard=0, epoch=epoch, lease_until=LEASE, now=now)


def finish(repo, spec, now):
    result = RunResult.of(
        spec,
        executor_id="e",
        tier="small",
        node_id="n",
        started_at=now,
        finished_at=now,
        exit_code=0,
        output_tail="",
        failure=None,
    )
    return repo.record_results([result], policy=RetryPolicy(), now=now)


def test_first_occurrence_is_stored_with_the_schedule(repo, owner):
    schedule, (task_id, at) = create(repo, owner)
    assert at == T and schedule.next_fire_at == T
    assert [
        (o.task_id, o.nominal_at, o.status) for o in occurrences(repo, schedule.schedule_id)
    ] == [(task_id, T, "scheduled")]
    with pytest.raises(ScriptNotFound):
        repo.add_schedule(NewSchedule(owner_id=owner, script_name="nope", cron="* * * * *"), now=T)


def test_firing_materialises_the_next_occurrence_once(repo, owner):
    schedule, (task_id, _) = create(repo, owner)
    epoch = repo.start_shard(0, now=T)
    claimed = fire(repo, [task_id], T, epoch)
    assert [s.task_id for s in claimed.specs] == [task_id]
    [(next_id, next_at)] = claimed.follow_ups
    assert next_at == T + timedelta(minutes=1)
    again = fire(repo, [task_id], T, epoch)  # a replayed or racing claim
    assert again.specs == [] and again.follow_ups == []
    nominal = [o.nominal_at for o in occurrences(repo, schedule.schedule_id)]
    assert nominal == [T, T + timedelta(minutes=1)]


@pytest.mark.parametrize(
    "policy, fired, missed, statuses",
    [
        # down from 11:59:30 to 12:03:30: 12:00 .. 12:03 missed
        (MisfirePolicy.SKIP, [], 4, ["skipped", "scheduled"]),
        (MisfirePolicy.FIRE_ONCE, [3], 3, ["queued", "scheduled"]),
        # window 150 s from 12:03:30 reaches 12:01:00: 12:01, 12:02, 12:03
        (MisfirePolicy.FIRE_ALL, [1, 2, 3], 1, ["queued", "queued", "queued", "scheduled"]),
    ],
)
def test_misfire_policies_after_downtime(repo, owner, policy, fired, missed, statuses):
    schedule, (task_id, _) = create(repo, owner, misfire_policy=policy)
    now = T + timedelta(minutes=3, seconds=30)
    claimed = fire(repo, [task_id], now)
    with repo.engine.connect() as conn:
        nominal = {
            r.task_id: r.nominal_at
            for r in conn.execute(
                select(tasks.c.task_id, tasks.c.nominal_at).where(
                    tasks.c.schedule_id == schedule.schedule_id
                )
            )
        }
    assert sorted(nominal[s.task_id] for s in claimed.specs) == [
        T + timedelta(minutes=m) for m in fired
    ]
    assert sorted(s.fire_time for s in claimed.specs) == [T + timedelta(minutes=m) for m in fired]
    assert all(s.due_at >= now for s in claimed.specs)  # caught up now, not back-dated
    with repo.engine.connect() as conn:  # every catch-up row stays in the claiming shard's range
        buckets = set(
            conn.execute(
                select(tasks.c.bucket).where(
                    tasks.c.task_id.in_([s.task_id for s in claimed.specs])
                )
            ).scalars()
        )
    assert len(buckets) <= 1
    assert [o.status for o in occurrences(repo, schedule.schedule_id)] == statuses
    assert claimed.follow_ups[0][1] == T + timedelta(minutes=4)
    assert repo.get_schedule(schedule.schedule_id, owner_id=owner).missed_fires == missed


def overlapping(repo, owner, policy):
    """Occurrence 12:00 is running when 12:01 comes due."""
    schedule, (first_id, _) = create(repo, owner, overlap_policy=policy)
    epoch = repo.start_shard(0, now=T)
    [running] = fire(repo, [first_id], T, epoch).specs
    repo.mark_running([running], lease_grace_s=30, now=T)
    second_id = occurrences(repo, schedule.schedule_id)[1].task_id
    claimed = fire(repo, [second_id], T + timedelta(minutes=1), epoch)
    return schedule, running, second_id, claimed, epoch


def test_overlap_skip(repo, owner):
    schedule, _, second_id, claimed, _ = overlapping(repo, owner, OverlapPolicy.SKIP)
    assert claimed.specs == [] and claimed.cancelled == []
    assert repo.get_task(second_id).status is TaskStatus.SKIPPED
    assert repo.get_schedule(schedule.schedule_id, owner_id=owner).skipped_fires == 1


def test_overlap_allow(repo, owner):
    _, _, second_id, claimed, _ = overlapping(repo, owner, OverlapPolicy.ALLOW)
    assert [s.task_id for s in claimed.specs] == [second_id]


def test_overlap_cancel_previous(repo, owner):
    _, running, second_id, claimed, _ = overlapping(repo, owner, OverlapPolicy.CANCEL_PREVIOUS)
    assert [s.task_id for s in claimed.specs] == [second_id]
    assert claimed.cancelled == [(running.task_id, running.attempt)]
    assert repo.get_task(running.task_id).status is TaskStatus.CANCELLED
    assert finish(repo, running, T + timedelta(minutes=1)) == []  # its late result changes nothing
    assert repo.get_task(running.task_id).status is TaskStatus.CANCELLED


def test_overlap_buffer_one_waits_then_fires_when_the_run_ends(repo, owner):
    schedule, running, second_id, claimed, epoch = overlapping(
        repo, owner, OverlapPolicy.BUFFER_ONE
    )
    assert claimed.specs == []
    assert repo.get_task(second_id).status is TaskStatus.SCHEDULED  # buffered
    third_id = occurrences(repo, schedule.schedule_id)[2].task_id
    third = fire(repo, [third_id], T + timedelta(minutes=2), epoch)
    assert (
        third.specs == [] and repo.get_task(third_id).status is TaskStatus.SKIPPED
    )  # one waits at most
    watch = finish(repo, running, T + timedelta(minutes=2, seconds=5))
    assert [task_id for task_id, _ in watch] == [second_id]
    later = fire(repo, [second_id], T + timedelta(minutes=2, seconds=5), epoch)
    assert [s.task_id for s in later.specs] == [second_id]


def test_pause_resume_change_delete_and_trigger(repo, owner):
    schedule, (first_id, _) = create(repo, owner)
    paused, follow = repo.change_schedule(
        schedule.schedule_id, owner_id=owner, changes={"paused": True}, now=T
    )
    assert paused.paused and paused.next_fire_at is None and follow is None
    assert repo.get_task(first_id).status is TaskStatus.CANCELLED
    resumed, (new_id, at) = repo.change_schedule(
        schedule.schedule_id,
        owner_id=owner,
        changes={"paused": False, "cron": "*/5 * * * *"},
        now=T + timedelta(seconds=1),
    )
    assert at == T + timedelta(minutes=5) and resumed.cron == "*/5 * * * *"
    trigger_id, trigger_at = repo.trigger_schedule(
        schedule.schedule_id, owner_id=owner, now=T + timedelta(seconds=2)
    )
    assert repo.get_task(trigger_id).nominal_at == trigger_at
    repo.delete_schedule(schedule.schedule_id, owner_id=owner, now=T + timedelta(seconds=3))
    assert repo.get_task(new_id).status is TaskStatus.CANCELLED
    with pytest.raises(ScheduleNotFound):
        repo.get_schedule(schedule.schedule_id, owner_id=owner)
    with pytest.raises(ScheduleNotFound):
        repo.get_schedule(schedule.schedule_id + 1000, owner_id=owner)


def test_history_lists_occurrences_with_their_runs(repo, owner):
    schedule, (task_id, _) = create(repo, owner)
    [spec] = fire(repo, [task_id], T).specs
    finish(repo, spec, T + timedelta(milliseconds=5))
    history = repo.schedule_history(schedule.schedule_id, owner_id=owner)
    assert [h["nominal_at"] for h in history] == [T + timedelta(minutes=1), T]
    assert history[1]["status"] is TaskStatus.SUCCEEDED and len(history[1]["runs"]) == 1


def test_unique_occurrence_survives_two_shards_racing(repo, owner):
    schedule, (task_id, _) = create(repo, owner)
    e0 = repo.start_shard(0, now=T)
    e1 = repo.start_shard(1, now=T)
    a = repo.claim([task_id], shard=0, epoch=e0, lease_until=LEASE, now=T)
    b = repo.claim([task_id], shard=1, epoch=e1, lease_until=LEASE, now=T)
    assert len(a.specs) + len(b.specs) == 1
    with repo.engine.connect() as conn:
        count = conn.execute(
            select(func.count()).where(tasks.c.schedule_id == schedule.schedule_id)
        ).scalar()
    assert count == 2


def test_retention_removes_old_finished_tasks_and_runs_in_batches_and_keeps_the_rest(repo, owner):
    """Old: a run finished, an occurrence skipped by misfire, a cancelled
    task. Kept: a task finished recently, a task still scheduled (however
    old its due time), and the schedule with its counters."""
    schedule, (occurrence, _) = create(repo, owner, misfire_policy=MisfirePolicy.SKIP)
    fire(repo, [occurrence], T + timedelta(minutes=3, seconds=30))  # 4 missed, 1 skipped row
    [old_run, recent_run, pending, cancelled] = [
        r.task
        for r in repo.add_tasks(
            [
                NewTask(owner_id=owner, script_name="tick.sh", execute_at=T + timedelta(days=d))
                for d in (0, 39, -5, 0)
            ],
            now=T - timedelta(days=6),
        )
    ]
    repo.cancel_task(cancelled.task_id, owner_id=owner, now=T)
    for task, at in ((old_run, T), (recent_run, T + timedelta(days=39))):
        [spec] = fire(repo, [task.task_id], at).specs
        finish(repo, spec, at)
    assert repo.get_task(old_run.task_id).status is TaskStatus.SUCCEEDED
    missed = repo.get_schedule(schedule.schedule_id, owner_id=owner).missed_fires

    now = T + timedelta(days=40)  # 30 days of history: everything at T is older
    removed = []
    while batch := repo.purge_finished(before=now - timedelta(days=30), limit=1):
        removed.append(batch)
    assert removed == [1, 1, 1]  # one per transaction
    remaining = {
        task_id
        for task_id in (old_run.task_id, recent_run.task_id, pending.task_id, cancelled.task_id)
        if _exists(repo, task_id)
    }
    assert remaining == {recent_run.task_id, pending.task_id}
    assert repo.list_runs(old_run.task_id) == [] and len(repo.list_runs(recent_run.task_id)) == 1
    assert [o.status for o in occurrences(repo, schedule.schedule_id)] == ["scheduled"]
    assert repo.get_schedule(schedule.schedule_id, owner_id=owner).missed_fires == missed == 4


def _exists(repo, task_id) -> bool:
    try:
        repo.get_task(task_id)
        return True
    except TaskNotFound:
        return False


def test_backfill_creates_each_missing_time_once_and_fires_them_beside_the_plan(repo, owner):
    """Backfilled times an hour old are no misfires (the schedule skips
    misfires), fire under the backfill's overlap policy, and neither move
    the plan nor add occurrences after them; a second backfill adds nothing."""
    now = T + timedelta(hours=1)
    schedule, _ = create(
        repo, owner, cron="*/10 * * * *", misfire_policy=MisfirePolicy.SKIP, now=now
    )
    sid = schedule.schedule_id
    before = occurrences(repo, sid)
    window = [T + timedelta(minutes=10 * i) for i in range(6)]
    created = repo.backfill_schedule(
        sid, owner_id=owner, fires=window, overlap=OverlapPolicy.ALLOW, now=now
    )
    assert len(created) == 6 and {at for _, at in created} == {now}
    again = repo.backfill_schedule(
        sid, owner_id=owner, fires=window, overlap=OverlapPolicy.ALLOW, now=now
    )
    assert again == []
    claimed = fire(repo, [task_id for task_id, _ in created], now)
    assert sorted(s.nominal_at for s in claimed.specs) == window
    assert claimed.follow_ups == []  # no chain from a backfilled time
    after = repo.get_schedule(sid, owner_id=owner)
    assert after.next_fire_at == schedule.next_fire_at and after.missed_fires == 0
    assert len(occurrences(repo, sid)) == len(before) + 6


def test_backfill_under_skip_runs_one_time_while_another_is_in_flight(repo, owner):
    now = T + timedelta(hours=1)
    schedule, _ = create(repo, owner, cron="*/10 * * * *", now=now)
    window = [T, T + timedelta(minutes=10), T + timedelta(minutes=20)]
    created = repo.backfill_schedule(
        schedule.schedule_id, owner_id=owner, fires=window, overlap=OverlapPolicy.SKIP, now=now
    )
    claimed = fire(repo, [task_id for task_id, _ in created], now)
    assert [s.nominal_at for s in claimed.specs] == [T]
    statuses = {o.nominal_at: o.status for o in occurrences(repo, schedule.schedule_id)}
    assert [statuses[at] for at in window] == ["queued", "skipped", "skipped"]
    assert repo.get_schedule(schedule.schedule_id, owner_id=owner).skipped_fires == 2


def test_occurrences_between_reads_a_window_with_runs(repo, owner):
    schedule, (task_id, at) = create(repo, owner)
    [spec] = fire(repo, [task_id], T).specs
    repo.mark_running([spec], lease_grace_s=30, now=T)
    finish(repo, spec, T + timedelta(seconds=1))
    stored, runs = repo.schedule_occurrences(
        [schedule.schedule_id], owner_id=owner, start=T, end=T + timedelta(seconds=1)
    )
    assert stored == {schedule.schedule_id: [(task_id, T, TaskStatus.SUCCEEDED)]}
    assert [r.attempt for r in runs[task_id]] == [1]


def test_occurrences_due_together_fire_as_one_batch_beside_those_a_policy_decides(repo, owner):
    """Sixty schedules on time at 12:01 are claimed together; in the same
    claim a late one (fire_once) and an overlapping one (skip) still get
    their policies. On PostgreSQL the on-time ones take a fixed number of
    statements, not a dozen each."""
    from sqlalchemy import event

    on_time = [create(repo, owner, now=T + timedelta(seconds=30)) for _ in range(60)]
    late, (late_id, _) = create(repo, owner, misfire_policy=MisfirePolicy.FIRE_ONCE)
    busy, (busy_first, _) = create(repo, owner, overlap_policy=OverlapPolicy.SKIP)
    epoch = repo.start_shard(0, now=T)
    [running] = fire(repo, [busy_first], T, epoch).specs
    repo.mark_running([running], lease_grace_s=30, now=T)
    busy_second = occurrences(repo, busy.schedule_id)[1].task_id
    statements: list[str] = []

    def note(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(repo.engine, "before_cursor_execute", note)
    try:
        now = T + timedelta(
            minutes=1, seconds=5
        )  # 5 s after 12:01; the late one's 12:00 is 65 s old
        ids = [task_id for _, (task_id, _) in on_time] + [late_id, busy_second]
        claimed = fire(repo, ids, now, epoch)
    finally:
        event.remove(repo.engine, "before_cursor_execute", note)
    fired = {s.task_id for s in claimed.specs}
    assert fired == {task_id for _, (task_id, _) in on_time} | {late_id}
    for schedule, _ in on_time:
        assert [(o.nominal_at, o.status) for o in occurrences(repo, schedule.schedule_id)] == [
            (T + timedelta(minutes=1), "queued"),
            (T + timedelta(minutes=2), "scheduled"),
        ]
        assert repo.get_schedule(
            schedule.schedule_id, owner_id=owner
        ).next_fire_at == T + timedelta(minutes=2)
    # late under fire_once: runs its latest time (12:01), one missed (12:00)
    assert repo.get_task(late_id).nominal_at == T + timedelta(minutes=1)
    assert repo.get_schedule(late.schedule_id, owner_id=owner).missed_fires == 1
    assert repo.get_task(busy_second).status is TaskStatus.SKIPPED
    assert repo.get_schedule(busy.schedule_id, owner_id=owner).skipped_fires == 1
    assert sorted(at for _, at in claimed.follow_ups) == [T + timedelta(minutes=2)] * 62
    if repo.engine.dialect.name == "postgresql":
        # one by one, each on-time occurrence took about a dozen statements
        assert len(statements) < 60, len(statements)
