"""The TaskRepository contract, the same on every backend."""

from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import event, inspect, select

from scheduling.errors import IdempotencyConflict, ScriptNotFound, TaskNotCancellable, TaskNotFound
from scheduling.lifecycle import RetryPolicy
from scheduling.models import (
    FailureClass,
    Interpreter,
    NewTask,
    RunResult,
    SubmitResult,
    TaskStatus,
)
from scheduling.timeline import Wheel
from storage.repository import MAX_OUTPUT_TAIL_CHARS, TaskQuery
from storage.schema import tasks as task_table
from tests.conftest import T0

WHEEL = Wheel(num_shards=1, range_s=60)
POLICY = RetryPolicy(backoff_base_s=5.0, jitter=False)


def owner_in(repo):
    """A user with the script ``job.sh``."""
    owner = repo.ensure_user(first_name="ada", last_name="lovelace", now=T0)
    repo.add_script(
        owner_id=owner, name="job.sh", interpreter=Interpreter.BASH, body=b"echo hi", now=T0
    )
    return owner


@pytest.fixture
def owner(repo):
    return owner_in(repo)


def new(owner, seconds=0, **kw):
    return NewTask(
        owner_id=owner, script_name="job.sh", execute_at=T0 + timedelta(seconds=seconds), **kw
    )


def submit(repo, *tasks):
    results = repo.add_tasks(list(tasks), now=T0)
    return [r.task for r in results if isinstance(r, SubmitResult)]


def result(spec, *, failure=None, epoch=None):
    if epoch is not None:
        spec = replace(spec, epoch=epoch)
    return RunResult.of(
        spec,
        executor_id="small-0",
        tier="small",
        node_id="node",
        started_at=spec.due_at + timedelta(milliseconds=3),
        finished_at=spec.due_at + timedelta(seconds=1),
        exit_code=1 if failure else 0,
        output_tail="x" * 10_000,
        failure=failure,
    )


def test_users_are_found_again_and_scripts_versioned_by_content(repo, owner):
    assert repo.ensure_user(first_name="ada", last_name="lovelace", now=T0) == owner
    script, created = repo.add_script(
        owner_id=owner, name="job.sh", interpreter=Interpreter.BASH, body=b"echo hi", now=T0
    )
    assert (created, script.version, script.size_bytes) == (False, 1, 7)
    script2, created2 = repo.add_script(
        owner_id=owner, name="job.sh", interpreter=Interpreter.BASH, body=b"echo 2", now=T0
    )
    assert (created2, script2.version) == (True, 2)
    assert repo.get_script(owner_id=owner, name="job.sh").script_id == script2.script_id
    assert repo.get_script_body(script.script_id) == b"echo hi"
    with pytest.raises(ScriptNotFound):
        repo.get_script(owner_id=owner, name="other")


def test_add_tasks_stores_valid_items_and_returns_errors_for_the_rest(repo, owner):
    results = repo.add_tasks(
        [
            new(owner, 1, variables={"A": "1"}),
            NewTask(owner_id=owner, script_name="nope", execute_at=T0),
            new(owner, 2),
        ],
        now=T0,
    )
    assert isinstance(results[1], ScriptNotFound)
    first = results[0].task
    assert (first.status, first.attempt, first.priority, first.variables) == (
        TaskStatus.SCHEDULED,
        1,
        0,
        {"A": "1"},
    )
    assert first.execute_at == T0 + timedelta(seconds=1) and first.execute_at.tzinfo is not None
    assert repo.get_task(results[2].task.task_id).script_name == "job.sh"
    with pytest.raises(TaskNotFound):
        repo.get_task(first.task_id, owner_id=owner + 1000)


def test_idempotency_key_replay_and_conflict(repo, owner):
    [a] = repo.add_tasks([new(owner, idempotency_key="k", request_hash="h1")], now=T0)
    [b] = repo.add_tasks([new(owner, idempotency_key="k", request_hash="h1")], now=T0)
    [c] = repo.add_tasks([new(owner, idempotency_key="k", request_hash="h2")], now=T0)
    assert a.created and not b.created and a.task.task_id == b.task.task_id
    assert isinstance(c, IdempotencyConflict)


def test_claim_is_conditional_and_fenced_by_epoch(repo, owner):
    tasks = submit(repo, new(owner, 0), new(owner, 1), new(owner, 500))
    epoch = repo.start_shard(0, now=T0)
    due = repo.due_tasks(wheel=WHEEL, shard=0, before=T0 + timedelta(seconds=10), limit=100)
    assert [task_id for task_id, _ in due] == [tasks[0].task_id, tasks[1].task_id]
    assert repo.shard_epoch(0) == epoch and repo.shard_epoch(1) is None
    assert repo.start_shard(0, now=T0) == epoch + 1
    assert repo.shard_epoch(0) == epoch + 1  # what tells the old owner it was superseded
    stale = repo.claim(
        [t for t, _ in due], shard=0, epoch=epoch, lease_until=T0 + timedelta(seconds=60), now=T0
    )
    assert stale.specs == []
    specs = repo.claim(
        [t for t, _ in due],
        shard=0,
        epoch=epoch + 1,
        lease_until=T0 + timedelta(seconds=60),
        now=T0,
    ).specs
    assert [s.task_id for s in specs] == [tasks[0].task_id, tasks[1].task_id]
    assert (
        specs[0].script_sha256
        and specs[0].interpreter is Interpreter.BASH
        and specs[0].epoch == epoch + 1
    )
    assert (
        repo.claim([tasks[0].task_id], shard=0, epoch=epoch + 1, lease_until=T0, now=T0).specs == []
    )  # once
    assert repo.get_task(tasks[0].task_id).status is TaskStatus.QUEUED


def test_one_shot_tasks_are_claimed_as_their_specs_in_one_statement(repo, owner):
    """The claim moves the rows and returns what executors need (the
    script's digest and interpreter included) in due order; on PostgreSQL
    nothing is read again. A task already claimed is left."""
    script, _ = repo.add_script(  # not the first script: each spec carries its own's
        owner_id=owner, name="py.py", interpreter=Interpreter.PYTHON, body=b"print(1)", now=T0
    )
    tasks = submit(
        repo,
        replace(
            new(owner, 2, variables={"A": "1"}, priority=7, timeout_s=9.5), script_name="py.py"
        ),
        new(owner, 1, max_attempts=3),
        new(owner, 0),
    )
    epoch = repo.start_shard(0, now=T0)
    [first] = repo.claim(
        [tasks[2].task_id], shard=0, epoch=epoch, lease_until=T0 + timedelta(seconds=9), now=T0
    ).specs
    sent, stop = statements_on(repo.engine, "UPDATE")
    every, stop_every = statements_on(repo.engine, "")
    try:
        specs = repo.claim(
            [t.task_id for t in tasks[:2]],
            shard=0,
            epoch=epoch,
            lease_until=T0 + timedelta(seconds=30),
            now=T0,
        ).specs
    finally:
        stop_every()
        stop()
    # SQLite's RETURNING cannot carry the script's columns: it reads them after
    assert len(sent) == 1 and len(every) == (1 if repo.engine.dialect.name == "postgresql" else 2)
    assert [s.task_id for s in specs] == [tasks[1].task_id, tasks[0].task_id]  # due order
    assert first.task_id == tasks[2].task_id
    again = [t.task_id for t in tasks]
    assert repo.claim(again, shard=0, epoch=epoch, lease_until=T0, now=T0).specs == []
    spec = specs[1]
    assert (spec.script_id, spec.script_sha256, spec.interpreter) == (
        script.script_id,
        script.sha256,
        Interpreter.PYTHON,
    )
    assert specs[0].interpreter is Interpreter.BASH
    assert (spec.attempt, spec.epoch, spec.shard, spec.priority, spec.timeout_s) == (
        1,
        epoch,
        0,
        7,
        9.5,
    )
    assert (dict(spec.variables), spec.due_at) == ({"A": "1"}, T0 + timedelta(seconds=2))
    task = repo.get_task(tasks[0].task_id)
    assert (task.status, task.lease_expires_at) == (
        TaskStatus.QUEUED,
        T0 + timedelta(seconds=30),
    )


def test_wheel_assigns_each_task_to_one_shard(repo, owner):
    wheel = Wheel(num_shards=2, range_s=60)
    base = T0 - timedelta(seconds=T0.timestamp() % 120)
    submit(repo, *(new(owner, (base - T0).total_seconds() + s) for s in (0, 30, 60, 90)))
    later = base + timedelta(seconds=200)
    shard0 = repo.due_tasks(wheel=wheel, shard=0, before=later, limit=10)
    shard1 = repo.due_tasks(wheel=wheel, shard=1, before=later, limit=10)
    assert len(shard0) == len(shard1) == 2
    assert {t for t, _ in shard0}.isdisjoint({t for t, _ in shard1})


def test_a_burst_in_a_sliced_range_is_claimed_by_every_shard_and_fenced_per_shard(repo, owner):
    """The hot-range split: 90 tasks due at one instant, 3 shards, 3 slices.
    Each shard finds and claims its own third; a superseded incarnation
    claims nothing; each shard's sweep hands over only its own stale
    attempts, as specs that name their owner."""
    wheel = Wheel(num_shards=3, range_s=60, slices=3)
    tasks = submit(repo, *(new(owner) for _ in range(90)))
    epochs = {shard: repo.start_shard(shard, now=T0) for shard in range(3)}
    due = {
        shard: [t for t, _ in repo.due_tasks(wheel=wheel, shard=shard, before=T0, limit=100)]
        for shard in range(3)
    }
    assert sorted(len(ids) for ids in due.values()) == [30, 30, 30]
    assert set().union(*due.values()) == {t.task_id for t in tasks}
    for shard, ids in due.items():
        assert all(wheel.owner_of(task_id, T0) == shard for task_id in ids)
    stale_epoch = epochs[1]
    epochs[1] = repo.start_shard(1, now=T0)  # shard 1 restarted: its old incarnation is fenced
    lease = T0 + timedelta(seconds=30)
    assert repo.claim(due[1], shard=1, epoch=stale_epoch, lease_until=lease, now=T0).specs == []
    for shard, ids in due.items():
        specs = repo.claim(ids, shard=shard, epoch=epochs[shard], lease_until=lease, now=T0).specs
        assert len(specs) == 30 and {s.shard for s in specs} == {shard}
    later = T0 + timedelta(seconds=31)  # every queue lease ran out: each sweep takes its own
    for shard in range(3):
        swept = repo.stale_queued(
            wheel=wheel,
            shard=shard,
            now=later,
            lease_until=later + timedelta(seconds=30),
            limit=100,
        )
        assert sorted(s.task_id for s in swept) == sorted(due[shard])
        assert {s.shard for s in swept} == {shard}


def claimed(repo, owner, **kw):
    [task] = submit(repo, new(owner, **kw))
    epoch = repo.start_shard(0, now=T0)
    [spec] = repo.claim(
        [task.task_id], shard=0, epoch=epoch, lease_until=T0 + timedelta(seconds=30), now=T0
    ).specs
    return spec


def claim_all(repo, tasks):
    """A new incarnation of shard 0 and the specs of ``tasks`` it claimed."""
    epoch = repo.start_shard(0, now=T0)
    specs = repo.claim(
        [t.task_id for t in tasks],
        shard=0,
        epoch=epoch,
        lease_until=T0 + timedelta(seconds=30),
        now=T0,
    ).specs
    return epoch, specs


def test_success_is_recorded_once_with_its_run(repo, owner):
    spec = claimed(repo, owner)
    assert repo.mark_running([spec], lease_grace_s=5, now=T0) == [spec.key]
    assert repo.mark_running([spec], lease_grace_s=5, now=T0) == []  # the gate opens once
    assert repo.get_task(spec.task_id).status is TaskStatus.RUNNING
    assert repo.record_results([result(spec)], policy=POLICY, now=T0) == []
    assert repo.record_results([result(spec)], policy=POLICY, now=T0) == []  # replay: no second run
    assert repo.get_task(spec.task_id).status is TaskStatus.SUCCEEDED
    [run] = repo.list_runs(spec.task_id)
    assert run.fire_lag_ms == pytest.approx(3.0) and len(run.output_tail) == 4096
    assert (run.executor_id, run.tier, run.failure) == ("small-0", "small", None)


def test_failures_retry_with_rising_priority_then_die(repo, owner):
    spec = claimed(repo, owner, max_attempts=2)
    [(retried_id, retried_at)] = repo.record_results(
        [result(spec, failure=FailureClass.EXIT_CODE)], policy=POLICY, now=T0
    )
    retried = repo.get_task(retried_id)
    assert retried_at == retried.execute_at
    assert (retried.status, retried.attempt, retried.priority) == (TaskStatus.SCHEDULED, 2, 1)
    assert retried.execute_at == T0 + timedelta(seconds=5)
    epoch = repo.start_shard(0, now=T0)
    [second] = repo.claim(
        [spec.task_id], shard=0, epoch=epoch, lease_until=T0 + timedelta(seconds=30), now=T0
    ).specs
    assert repo.record_results([result(spec)], policy=POLICY, now=T0) == []  # stale attempt ignored
    assert repo.get_task(spec.task_id).status is TaskStatus.QUEUED
    repo.record_results([result(second, failure=FailureClass.TIMEOUT)], policy=POLICY, now=T0)
    task = repo.get_task(spec.task_id)
    assert (task.status, task.attempt) == (TaskStatus.DEAD, 2)
    assert [(r.attempt, r.priority, r.failure) for r in repo.list_runs(spec.task_id)] == [
        (1, 0, FailureClass.EXIT_CODE),
        (2, 1, FailureClass.TIMEOUT),
    ]


def test_a_result_from_another_epoch_changes_nothing(repo, owner):
    spec = claimed(repo, owner)
    assert repo.record_results([result(spec, epoch=spec.epoch + 7)], policy=POLICY, now=T0) == []
    assert repo.get_task(spec.task_id).status is TaskStatus.QUEUED
    assert repo.list_runs(spec.task_id) == []


def test_stale_queued_attempts_are_leased_again_without_using_an_attempt(repo, owner):
    spec = claimed(repo, owner)
    later = T0 + timedelta(seconds=31)
    assert repo.stale_queued(wheel=WHEEL, shard=0, now=T0, lease_until=later, limit=10) == []
    assert [s.task_id for s in repo.queued_specs(wheel=WHEEL, shard=0, limit=10)] == [spec.task_id]
    [stale] = repo.stale_queued(
        wheel=WHEEL, shard=0, now=later, lease_until=later + timedelta(seconds=30), limit=10
    )
    assert stale == spec  # the same attempt, handed over again
    assert repo.get_task(spec.task_id).lease_expires_at == later + timedelta(seconds=30)
    assert repo.running_specs(wheel=WHEEL, limit=10) == []
    repo.mark_running([spec], lease_grace_s=5, now=T0)
    assert repo.queued_specs(wheel=WHEEL, shard=0, limit=10) == []
    assert repo.running_specs(wheel=WHEEL, limit=10) == [spec]


def test_long_queued_attempts_are_those_leased_before_a_bound_on_any_shard(repo, owner):
    spec = claimed(repo, owner)  # its lease ends at T0 + 30 s
    leased_later = T0 + timedelta(seconds=30)
    assert repo.long_queued(wheel=WHEEL, lease_ends_before=leased_later, limit=10) == []
    after = leased_later + timedelta(microseconds=1)
    assert repo.long_queued(wheel=WHEEL, lease_ends_before=after, limit=10) == [spec]
    repo.mark_running([spec], lease_grace_s=5, now=T0)
    assert repo.long_queued(wheel=WHEEL, lease_ends_before=after, limit=10) == []


def test_the_start_gate_refuses_every_attempt_but_the_current_one(repo, owner):
    """Defect 4: an executor starts a script only after its own queued →
    running commit; a stale or repeated hand-over never passes."""
    spec = claimed(repo, owner, max_attempts=3)
    stale_epoch = replace(spec, epoch=spec.epoch + 1)
    assert repo.mark_running([stale_epoch], lease_grace_s=5, now=T0) == []
    repo.record_results([result(spec, failure=FailureClass.EXIT_CODE)], policy=POLICY, now=T0)
    assert repo.mark_running([spec], lease_grace_s=5, now=T0) == []  # attempt 1 is over
    epoch = repo.start_shard(0, now=T0)
    [second] = repo.claim(
        [spec.task_id], shard=0, epoch=epoch, lease_until=T0 + timedelta(seconds=30), now=T0
    ).specs
    assert repo.mark_running([spec, second], lease_grace_s=5, now=T0) == [second.key]


def test_a_loss_before_the_start_gate_never_uses_an_attempt(repo, owner):
    """Defect 6: max_attempts=1 tasks lost before their script started
    (queued) go back at once, and may still run."""
    from scheduling.lifecycle import lost_result

    spec = claimed(repo, owner, max_attempts=1)
    for attempt in (1, 2, 3):
        epoch = repo.start_shard(0, now=T0)
        [lost] = (
            repo.claim(
                [spec.task_id], shard=0, epoch=epoch, lease_until=T0 + timedelta(seconds=30), now=T0
            ).specs
            if attempt > 1
            else [spec]
        )
        repo.record_results([lost_result(lost, now=T0)], policy=POLICY, now=T0)
        task = repo.get_task(spec.task_id)
        assert task.status is TaskStatus.SCHEDULED, f"loss {attempt} used the only attempt"
    assert (task.attempt, task.max_attempts, task.lost_count) == (4, 4, 3)


def test_a_loss_read_before_the_start_gate_and_written_after_it_uses_the_attempt(
    postgres_repo, monkeypatch
):
    """A loss (an executor declared dead) is decided from the status it
    read. If the start gate commits between that read and the write, the
    script may be running: the loss must not be free, or the attempt would
    run again beside it. The gate is committed from another connection at
    the moment of the decision."""
    from scheduling.lifecycle import lost_result
    from storage.sql import firing

    repo = postgres_repo
    owner = repo.ensure_user(first_name="ada", last_name="lovelace", now=T0)
    repo.add_script(
        owner_id=owner, name="job.sh", interpreter=Interpreter.BASH, body=b"echo hi", now=T0
    )
    spec = claimed(repo, owner, max_attempts=1)
    decided_from = []
    real = firing.may_have_started

    def gate_commits_meanwhile(result, status):
        decided_from.append(status)
        if len(decided_from) == 1:
            assert repo.mark_running([spec], lease_grace_s=5, now=T0) == [spec.key]
        return real(result, status)

    monkeypatch.setattr(firing, "may_have_started", gate_commits_meanwhile)
    repo.record_results([lost_result(spec, now=T0)], policy=POLICY, now=T0)
    assert decided_from == [TaskStatus.QUEUED, TaskStatus.RUNNING]  # decided again
    task = repo.get_task(spec.task_id)
    # the loss came after the start: it used the only attempt, no second run
    assert (task.status, task.attempt, task.max_attempts) == (TaskStatus.DEAD, 1, 1)
    [run] = repo.list_runs(spec.task_id)
    assert (run.attempt, run.failure) == (1, FailureClass.EXECUTOR_LOST)


def test_cancel_only_before_start(repo, owner):
    [task] = submit(repo, new(owner, 100))
    assert repo.cancel_task(task.task_id, owner_id=owner, now=T0).status is TaskStatus.CANCELLED
    assert repo.cancel_task(task.task_id, owner_id=owner, now=T0).status is TaskStatus.CANCELLED
    epoch = repo.start_shard(0, now=T0)
    assert repo.claim([task.task_id], shard=0, epoch=epoch, lease_until=T0, now=T0).specs == []
    spec = claimed(repo, owner)
    with pytest.raises(TaskNotCancellable):
        repo.cancel_task(spec.task_id, owner_id=owner, now=T0)
    with pytest.raises(TaskNotFound):
        repo.cancel_task(spec.task_id, owner_id=owner + 99, now=T0)


def test_sql_schema_matches_the_migrations(repo):
    """The metadata queries are written against is what Alembic creates."""
    from storage.schema import metadata

    inspector = inspect(repo.engine)
    assert set(inspector.get_table_names()) >= set(metadata.tables)
    for name, table in metadata.tables.items():
        assert {c["name"] for c in inspector.get_columns(name)} == {c.name for c in table.columns}


def test_escalation_follows_the_tier_table_and_executor_losses_are_free_after_the_first(
    repo, owner
):
    from scheduling.lifecycle import lost_result
    from scheduling.tiers import local_tiers

    spec = claimed(repo, owner, max_attempts=3)
    tiers = local_tiers()  # small 0-2, medium 3-5, large 6+
    repo.record_results(
        [result(spec, failure=FailureClass.TIMEOUT)], policy=POLICY, now=T0, tiers=tiers
    )
    task = repo.get_task(spec.task_id)
    assert (task.attempt, task.priority) == (2, 3)  # a timeout moves to the next tier
    epoch = repo.start_shard(0, now=T0)
    for attempt in (2, 3, 4):
        [lost] = repo.claim(
            [spec.task_id], shard=0, epoch=epoch, lease_until=T0 + timedelta(seconds=30), now=T0
        ).specs
        assert lost.attempt == attempt
        assert repo.mark_running([lost], lease_grace_s=5, now=T0) == [lost.key]  # it started
        repo.record_results([lost_result(lost, now=T0)], policy=POLICY, now=T0, tiers=tiers)
        task = repo.get_task(spec.task_id)
        # the first loss uses attempt 2 of 3; later ones are free
        assert task.status is TaskStatus.SCHEDULED and task.priority == 3
        assert task.execute_at == T0  # at once, no backoff
    assert (task.attempt, task.lost_count, task.max_attempts) == (5, 3, 5)


def test_dead_tasks_are_listed_and_can_be_redriven(repo, owner):
    from scheduling.errors import TaskNotRetryable

    spec = claimed(repo, owner, max_attempts=1)
    repo.record_results([result(spec, failure=FailureClass.EXIT_CODE)], policy=POLICY, now=T0)
    [dead] = repo.list_tasks(TaskQuery(owner_id=owner, statuses=frozenset({TaskStatus.DEAD})))
    assert dead.task_id == spec.task_id and dead.status is TaskStatus.DEAD
    other = repo.ensure_user(first_name="b", last_name="c", now=T0)
    assert repo.list_tasks(TaskQuery(owner_id=other)) == []
    with pytest.raises(TaskNotFound):
        repo.redrive(spec.task_id, owner_id=other, attempts=1, now=T0)
    later = T0 + timedelta(minutes=5)
    task = repo.redrive(spec.task_id, owner_id=owner, attempts=2, now=later)
    assert (task.status, task.attempt, task.max_attempts) == (TaskStatus.SCHEDULED, 2, 3)
    assert task.execute_at == later
    assert repo.list_tasks(TaskQuery(owner_id=owner, statuses=frozenset({TaskStatus.DEAD}))) == []
    with pytest.raises(TaskNotRetryable):
        repo.redrive(spec.task_id, owner_id=owner, attempts=1, now=later)


def test_list_tasks_filters_newest_first_and_keeps_owners_apart(repo, owner):
    other = repo.ensure_user(first_name="eve", last_name="x", now=T0)
    repo.add_script(owner_id=other, name="job.sh", interpreter=Interpreter.BASH, body=b"x", now=T0)
    mine = submit(repo, *(new(owner, seconds=10 * i) for i in range(4)))
    submit(repo, NewTask(owner_id=other, script_name="job.sh", execute_at=T0))
    repo.cancel_task(mine[1].task_id, owner_id=owner, now=T0)
    ids = [t.task_id for t in mine]

    def listed(**kw):
        return [t.task_id for t in repo.list_tasks(TaskQuery(owner_id=owner, **kw))]

    assert listed() == ids[::-1]
    assert listed(limit=2) == ids[:1:-1]
    assert listed(below_id=ids[2]) == ids[1::-1]
    assert listed(statuses=frozenset({TaskStatus.CANCELLED})) == [ids[1]]
    assert listed(script_name="job.sh", due_from=T0 + timedelta(seconds=10)) == ids[:0:-1]
    assert listed(due_before=T0 + timedelta(seconds=20)) == ids[1::-1]
    assert listed(script_name="nope.sh") == [] and listed(schedule_id=123) == []


def test_an_atomic_batch_stores_all_or_nothing(repo, owner):
    from scheduling.errors import BatchRejected

    good = [new(owner, seconds=i) for i in range(3)]
    bad = NewTask(owner_id=owner, script_name="missing.sh", execute_at=T0)
    with pytest.raises(BatchRejected) as rejected:
        repo.add_tasks([*good, bad], now=T0, atomic=True)
    [(index, error)] = rejected.value.failures
    assert index == 3 and isinstance(error, ScriptNotFound)
    assert repo.list_tasks(TaskQuery(owner_id=owner)) == []
    stored = repo.add_tasks(good, now=T0, atomic=True)
    assert len(repo.list_tasks(TaskQuery(owner_id=owner))) == 3 == len(stored)


@pytest.mark.parametrize(
    "output",
    [
        "before\x00after",  # PostgreSQL refuses NUL in text
        b"bad \xff\xfe utf-8".decode("utf-8", errors="surrogateescape"),  # lone surrogates
        "x" * 10_000_000,  # 10 MB of text
    ],
    ids=["nul", "invalid-utf8", "10mb"],
)
def test_any_output_is_stored_as_text_without_failing_the_batch(repo, owner, output):
    """Defect 1: one script's output must not poison result recording."""
    bad, good = claimed(repo, owner), claimed(repo, owner)
    results = [replace(result(bad), output_tail=output), result(good)]
    repo.record_results(results, policy=POLICY, now=T0)
    assert repo.get_task(bad.task_id).status is TaskStatus.SUCCEEDED
    assert repo.get_task(good.task_id).status is TaskStatus.SUCCEEDED
    [run] = repo.list_runs(bad.task_id)
    assert "\x00" not in run.output_tail and len(run.output_tail) <= 4096
    run.output_tail.encode("utf-8")  # valid text


def test_a_replayed_submission_stores_nothing_twice(repo, owner):
    """Defect 3: Ray replays ``submit`` on a restarted shard after a commit
    whose answer was lost; keyless tasks carry a minted request identity."""
    first = new(owner, 5)
    [stored] = repo.add_tasks([first], now=T0)
    [again] = repo.add_tasks([first, new(owner, 6)], now=T0)[:1]
    assert stored.created and not again.created
    assert again.task.task_id == stored.task.task_id
    assert len(repo.list_tasks(TaskQuery(owner_id=owner))) == 2


def test_a_retry_in_the_same_group_commit_as_its_original_is_not_a_conflict(repo, owner):
    """Defect 10: a retry that lands in the same batch as its original."""
    original = new(owner, 5, idempotency_key="k1", request_hash="h")
    retry = new(owner, 5, idempotency_key="k1", request_hash="h")
    other = new(owner, 5, idempotency_key="k1", request_hash="different")
    first, second, third = repo.add_tasks([original, retry, other], now=T0)
    assert first.created and not second.created and second.task == first.task
    assert isinstance(third, IdempotencyConflict)
    replayed, twice = repo.add_tasks([original, original], now=T0)
    assert replayed.task.task_id == twice.task.task_id == first.task.task_id


def test_stale_queued_leases_again_only_what_it_hands_over(repo, owner):
    first, second = claimed(repo, owner), claimed(repo, owner)
    later = T0 + timedelta(seconds=31)
    [handed] = repo.stale_queued(
        wheel=WHEEL, shard=0, now=later, lease_until=later + timedelta(seconds=30), limit=1
    )
    [left] = {first.task_id, second.task_id} - {handed.task_id}
    assert repo.get_task(left).lease_expires_at == T0 + timedelta(seconds=30)  # still stale
    [next_turn] = repo.stale_queued(
        wheel=WHEEL, shard=0, now=later, lease_until=later + timedelta(seconds=30), limit=1
    )
    assert next_turn.task_id == left


def statements_on(engine, verb: str):
    """The SQL statements starting with ``verb`` (or a WITH) sent while the
    block runs; ``""``: every statement."""
    sent: list[str] = []

    def note(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("WITH", verb)) and verb in statement.upper():
            sent.append(statement)

    event.listen(engine, "before_cursor_execute", note)
    return sent, lambda: event.remove(engine, "before_cursor_execute", note)


def test_a_batch_passes_the_start_gate_and_records_its_results_in_one_statement_per_kind(
    repo, owner
):
    tasks = submit(repo, *(new(owner, max_attempts=2) for _ in range(50)))
    epoch, specs = claim_all(repo, tasks)
    stale = replace(specs[0], epoch=epoch + 1)  # another incarnation's: must not pass
    sent, stop = statements_on(repo.engine, "UPDATE")
    try:
        started = repo.mark_running([*specs, stale], lease_grace_s=5, now=T0)
        gate_updates = len(sent)
        failures = [FailureClass.EXIT_CODE if i % 2 else None for i in range(len(specs))]
        retries = repo.record_results(
            [result(spec, failure=f) for spec, f in zip(specs, failures, strict=True)],
            policy=POLICY,
            now=T0,
        )
    finally:
        stop()
    assert sorted(started) == sorted(spec.key for spec in specs)
    # the gate's one, the results' one; on PostgreSQL the successes' apart: they need no read
    result_writes = 2 if repo.engine.dialect.name == "postgresql" else 1
    assert gate_updates == 1 and len(sent) == 1 + result_writes
    assert len(retries) == 25  # the failed half is scheduled again; the rest succeeded
    statuses = [repo.get_task(spec.task_id).status for spec in specs]
    assert statuses.count(TaskStatus.SUCCEEDED) == 25 and statuses.count(TaskStatus.SCHEDULED) == 25
    assert all(len(repo.list_runs(spec.task_id)) == 1 for spec in specs)


def test_a_warm_up_opens_its_connections_and_builds_the_run_path_changing_no_row(repo, owner):
    """An executor warms up before its first heartbeat: its pool's
    connections are opened and, on PostgreSQL, the start gate's and the
    results' writes are built and run once, on no rows."""
    [task] = submit(repo, new(owner))
    task_id = task.task_id
    tasks_before = repo.get_task(task_id)
    sent, stop = statements_on(repo.engine, "UPDATE")
    try:
        repo.warm_up(connections=2, now=T0)
    finally:
        stop()
    assert repo.engine.pool.checkedin() >= 2
    assert repo.get_task(task_id) == tasks_before and repo.list_runs(task_id) == []
    on_postgres = repo.engine.dialect.name == "postgresql"
    assert len(sent) == (3 if on_postgres else 0)  # the gate, a success, another result


def test_successes_are_recorded_with_their_runs_in_one_statement_on_postgres(postgres_repo):
    """A success needs no read of its row: one statement moves the rows and
    logs the runs. A success of another epoch in the same batch changes
    nothing and logs no run; one whose row is still queued is applied (a
    result applies to any status in flight)."""
    repo = postgres_repo
    owner = owner_in(repo)
    tasks = submit(repo, *(new(owner, max_attempts=3) for _ in range(6)))
    epoch, specs = claim_all(repo, tasks)
    repo.mark_running(specs[:4], lease_grace_s=5, now=T0)  # the rest still queued
    stale = replace(specs[1], epoch=epoch + 1)
    outcomes = []
    sent, stop = statements_on(repo.engine, "")  # every statement
    try:
        watch = repo.record_results(
            [result(specs[0]), result(stale), result(specs[2]), result(specs[4])],
            policy=POLICY,
            now=T0,
            on_outcome=lambda r, status, schedule_id: outcomes.append((r.task_id, status)),
        )
    finally:
        stop()
    assert watch == [] and len(sent) == 1, sent
    ended = {specs[0].task_id, specs[2].task_id, specs[4].task_id}  # queued: a result applies too
    assert sorted(outcomes) == sorted((i, TaskStatus.SUCCEEDED) for i in ended)
    for spec in specs:
        task = repo.get_task(spec.task_id)
        runs = repo.list_runs(spec.task_id)
        if spec.task_id in ended:
            assert (task.status, task.attempt, task.max_attempts, task.lease_expires_at) == (
                TaskStatus.SUCCEEDED,
                1,
                3,
                None,
            )
            [run] = runs
            assert (run.attempt, run.exit_code, run.failure, run.output_tail) == (
                1,
                0,
                None,
                "x" * MAX_OUTPUT_TAIL_CHARS,  # the tail, as every write keeps it
            )
            assert (run.started_at, run.finished_at, run.executor_id) == (
                spec.due_at + timedelta(milliseconds=3),
                spec.due_at + timedelta(seconds=1),
                "small-0",
            )
        else:
            assert task.status in (TaskStatus.RUNNING, TaskStatus.QUEUED) and runs == []
    # a replay of the same successes decides nothing and logs nothing more
    assert repo.record_results([result(specs[0])], policy=POLICY, now=T0) == []
    assert len(repo.list_runs(specs[0].task_id)) == 1


def test_a_write_of_one_statement_runs_in_autocommit_and_any_other_in_a_transaction(
    postgres_repo,
):
    """The start gate and a batch of successes are one statement each on
    PostgreSQL: they go without BEGIN and COMMIT (one round trip), and
    their rows are committed when the call returns. Results that need a
    read, a write and an insert stay in one transaction."""
    repo = postgres_repo
    owner = owner_in(repo)
    tasks = submit(repo, *(new(owner, max_attempts=3) for _ in range(3)))
    _, specs = claim_all(repo, tasks)
    modes: list[tuple[str, bool]] = []

    def note(conn, cursor, statement, parameters, context, executemany):
        modes.append((statement.split()[0].upper(), cursor.connection.autocommit))

    event.listen(repo.engine, "before_cursor_execute", note)
    try:
        assert sorted(repo.mark_running(specs, lease_grace_s=5, now=T0)) == sorted(
            s.key for s in specs
        )
        gate, modes[:] = list(modes), []
        repo.record_results([result(specs[0]), result(specs[1])], policy=POLICY, now=T0)
        successes, modes[:] = list(modes), []
        retried = repo.record_results(
            [result(specs[2], failure=FailureClass.EXIT_CODE)], policy=POLICY, now=T0
        )
        failure = list(modes)
    finally:
        event.remove(repo.engine, "before_cursor_execute", note)
    assert gate == [("UPDATE", True)]
    assert len(successes) == 1 and successes[0][1] is True
    assert len(failure) >= 3 and not any(autocommit for _, autocommit in failure), failure
    assert [t for t, _ in retried] == [specs[2].task_id]
    # committed on return: another connection sees them
    with repo.engine.connect() as other:
        ended = other.execute(
            select(task_table.c.task_id, task_table.c.status).where(
                task_table.c.task_id.in_([s.task_id for s in specs])
            )
        ).all()
    assert dict(ended) == {
        specs[0].task_id: TaskStatus.SUCCEEDED.value,
        specs[1].task_id: TaskStatus.SUCCEEDED.value,
        specs[2].task_id: TaskStatus.SCHEDULED.value,
    }


def test_a_late_report_of_an_earlier_attempt_beside_the_current_one_applies_only_the_current(
    repo, owner
):
    spec = claimed(repo, owner, max_attempts=3)
    repo.record_results([result(spec, failure=FailureClass.EXIT_CODE)], policy=POLICY, now=T0)
    epoch = repo.start_shard(0, now=T0)
    [second] = repo.claim(
        [spec.task_id], shard=0, epoch=epoch, lease_until=T0 + timedelta(seconds=30), now=T0
    ).specs
    assert repo.record_results([result(spec), result(second)], policy=POLICY, now=T0) == []
    task = repo.get_task(spec.task_id)
    assert (task.status, task.attempt) == (TaskStatus.SUCCEEDED, 2)
    assert [run.attempt for run in repo.list_runs(spec.task_id)] == [1, 2]


def test_a_large_batch_stores_each_task_as_given_in_its_order(repo, owner):
    """On PostgreSQL with one INSERT per thousand rows, whose text does not
    depend on the rows (SQLite: row by row)."""
    news = [
        new(
            owner,
            seconds=i % 90,
            variables={"I": str(i)} if i % 3 else {},
            priority=i % 10,
            max_attempts=1 + i % 4,
            timeout_s=10.0 + i,
            idempotency_key=f"key-{i}" if i % 2 else None,
            request_hash=f"h{i}",
        )
        for i in range(1500)
    ]
    sent, stop = statements_on(repo.engine, "INSERT")
    try:
        results = repo.add_tasks(news, now=T0)
    finally:
        stop()
    assert len({r.task.task_id for r in results}) == 1500
    for given, result_ in zip(news, results, strict=True):
        stored = repo.get_task(result_.task.task_id)
        assert result_.created and stored == result_.task
        assert (stored.execute_at, stored.variables, stored.priority) == (
            given.execute_at,
            dict(given.variables),
            given.priority,
        )
        assert (stored.max_attempts, stored.timeout_s, stored.idempotency_key) == (
            given.max_attempts,
            given.timeout_s,
            given.idempotency_key,
        )
    if repo.engine.dialect.name == "postgresql":
        assert len(sent) == 2 and sent[0] == sent[1]  # 1,000 and 500 rows, one text


@pytest.mark.parametrize("size", [1, 3, 1001])
def test_a_batch_of_alike_tasks_returns_each_as_stored(repo, owner, size):
    """Fields the rows of a batch agree on go as one value, not an array,
    and what a submission returns is built from what it wrote, not read
    back: each must equal the task as read (a burst due at one instant;
    a batch of one)."""
    news = [new(owner, seconds=30, variables={"SAME": "yes"}, priority=2) for _ in range(size)]
    results = repo.add_tasks(news, now=T0)
    assert len({r.task.task_id for r in results}) == size
    for result_ in results:
        stored = repo.get_task(result_.task.task_id)
        assert result_.created and stored == result_.task
        assert stored.nominal_at == stored.execute_at == T0 + timedelta(seconds=30)
        assert (stored.variables, stored.priority, stored.lost_count) == ({"SAME": "yes"}, 2, 0)


def test_a_fresh_batch_does_not_look_up_its_request_ids_and_a_replay_still_does(repo, owner):
    """Request ids minted for the call (the batch endpoint, Client.submit_batch)
    cannot be stored yet: no lookup. A shard's group commit, which Ray may
    replay, still finds what the first call stored."""
    news = [new(owner, seconds=30 + i) for i in range(3)]
    sent, stop = statements_on(repo.engine, "SELECT")
    try:
        first = repo.add_tasks(news, now=T0, atomic=True, fresh=True)
    finally:
        stop()
    assert all(r.created for r in first)
    assert not [s for s in sent if "request_id" in s], sent
    replayed = repo.add_tasks(news, now=T0)
    assert [r.task.task_id for r in replayed] == [r.task.task_id for r in first]
    assert not any(r.created for r in replayed)


def test_a_page_of_a_users_tasks_is_read_in_its_order_soon_after_a_bulk_load(postgres_repo):
    """Right after a bulk load into an empty table the planner believes it
    is still empty and sorted every task of the user for a page of 50
    (106-180 ms at 200,000). The repository analyzes the table once enough
    tasks were stored; then the page is read from an index, in order."""
    import time

    from sqlalchemy import text

    from storage.repository import TaskQuery
    from storage.sql import tasks as task_sql

    repo = postgres_repo
    owner = repo.ensure_user(first_name="ada", last_name="lovelace", now=T0)
    repo.add_script(
        owner_id=owner, name="job.sh", interpreter=Interpreter.BASH, body=b"echo hi", now=T0
    )
    for _ in range(12):
        repo.add_tasks([new(owner, 3600 + i) for i in range(1000)], now=T0, atomic=True)

    def plan() -> str:
        with repo.engine.connect() as conn:
            query = task_sql.list_query(TaskQuery(owner_id=owner, limit=50))
            compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
            return "\n".join(row[0] for row in conn.execute(text(f"EXPLAIN {compiled}")))

    deadline = time.monotonic() + 30
    while repo.statistics.analyses == 0:  # the analysis runs on a thread of its own
        assert time.monotonic() < deadline, "the table was not analyzed after 12,000 tasks"
        time.sleep(0.05)
    shown = plan()
    assert "Index Scan Backward" in shown and "Sort" not in shown, shown
    page = repo.list_tasks(TaskQuery(owner_id=owner, limit=50))
    assert len(page) == 50
    assert [t.task_id for t in page] == sorted((t.task_id for t in page), reverse=True)
