"""Table tests for the pure scheduling package."""

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest

from scheduling import ready_queue
from scheduling.clock import ManualClock
from scheduling.fire_timer import FireTimer
from scheduling.lifecycle import (
    MOVES,
    RESULT_SOURCE,
    RESULT_TARGETS,
    START,
    SUCCEED,
    RetryPolicy,
    after_attempt,
    after_redrive,
    classify,
)
from scheduling.models import FailureClass, Interpreter, Task, TaskSpec, TaskStatus, trusted
from scheduling.placement import FreeSlots
from scheduling.ready_queue import ReadyQueue
from scheduling.tiers import local_node_resources, local_tiers, production_tiers
from scheduling.timeline import Wheel, bucket_of, within_lookahead
from tests.conftest import T0

UTC = timezone.utc


@pytest.mark.parametrize(
    "at, bucket",
    [
        (datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC), 1772366400),
        (datetime(2026, 3, 1, 12, 0, 9, 999999, tzinfo=UTC), 1772366400),
        (datetime(2026, 3, 1, 12, 0, 10, tzinfo=UTC), 1772366410),
        (datetime(2026, 3, 1, 13, 0, 5, tzinfo=timezone(timedelta(hours=1))), 1772366400),
    ],
)
def test_bucket_is_ten_seconds_in_utc(at, bucket):
    assert bucket_of(at) == bucket


def test_bucket_refuses_naive_time():
    with pytest.raises(ValueError):
        bucket_of(datetime(2026, 3, 1, 12, 0, 0))


def test_a_sliced_range_spreads_its_tasks_over_every_shard_by_task_id():
    wheel = Wheel(num_shards=3, range_s=60, slices=3)
    at = datetime.fromtimestamp(1772366400 - 1772366400 % 180, tz=UTC)  # range 0 → shard 0
    owners = [wheel.owner_of(task_id, at) for task_id in range(9)]
    assert owners == [0, 1, 2] * 3
    later = at + timedelta(seconds=60)  # the next range starts one shard further
    assert [wheel.owner_of(task_id, later) for task_id in range(3)] == [1, 2, 0]
    assert wheel.shard_of(at) == 0  # submissions still go to the range's own shard
    with pytest.raises(ValueError):
        Wheel(num_shards=2, slices=3)


@pytest.mark.parametrize(
    "offset_s, shard",
    [(0, 0), (59, 0), (60, 1), (119, 1), (120, 2), (180, 0), (240, 1)],
)
def test_wheel_gives_consecutive_ranges_to_consecutive_shards(offset_s, shard):
    wheel = Wheel(num_shards=3, range_s=60)
    base = datetime.fromtimestamp(1772366400 - 1772366400 % 180, tz=UTC)  # range divisible by 3
    at = base + timedelta(seconds=offset_s)
    assert wheel.shard_of(at) == shard
    assert wheel.owner_of(7, at) == shard  # one slice: the range's own shard owns all


@pytest.mark.parametrize(
    "bad", [dict(num_shards=0), dict(num_shards=2, range_s=15), dict(num_shards=2, range_s=5)]
)
def test_wheel_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        Wheel(**bad)


@pytest.mark.parametrize(
    "priority, tier, eligible",
    [
        (0, "small", ["small", "medium", "large"]),
        (2, "small", ["small", "medium", "large"]),
        (3, "medium", ["medium", "large"]),
        (5, "medium", ["medium", "large"]),
        (6, "large", ["large"]),
        (99, "large", ["large"]),
    ],
)
def test_priority_maps_to_tier_or_stronger(priority, tier, eligible):
    table = production_tiers()
    assert table.tier_for(priority).name == tier
    assert [t.name for t in table.eligible(priority)] == eligible


def test_tier_actor_options_carry_resources():
    large = production_tiers().by_name("large")
    assert large.actor_options() == {
        "num_cpus": 2,
        "resources": {"chronoray_large": 1},
        "memory": 4096 * 1024 * 1024,
    }


def test_local_tiers_need_no_cpu_and_the_node_offers_their_slots():
    table = local_tiers(executors=2)
    assert all(t.num_cpus == 0 for t in table)
    # room for each tier's pool at its largest
    assert local_node_resources(table) == {
        "chronoray_small": 4,
        "chronoray_medium": 4,
        "chronoray_large": 4,
    }


@pytest.mark.parametrize(
    "attempt, max_attempts, priority, failure, status, next_attempt, next_priority, delay_s",
    [
        (1, 3, 0, None, TaskStatus.SUCCEEDED, 1, 0, None),
        (1, 3, 0, FailureClass.EXIT_CODE, TaskStatus.SCHEDULED, 2, 1, 1.0),
        (2, 3, 1, FailureClass.TIMEOUT, TaskStatus.SCHEDULED, 3, 3, 2.0),  # to medium (3)
        (2, 3, 3, FailureClass.TIMEOUT, TaskStatus.SCHEDULED, 3, 6, 2.0),  # to large (6)
        (1, 3, 0, FailureClass.MEMORY, TaskStatus.SCHEDULED, 2, 3, 1.0),  # more memory
        (3, 3, 2, FailureClass.EXIT_CODE, TaskStatus.DEAD, 3, 2, None),
        (1, 5, 4, FailureClass.EXECUTOR_LOST, TaskStatus.SCHEDULED, 2, 4, 0.0),  # now, same
        (4, 10, 3, FailureClass.EXIT_CODE, TaskStatus.SCHEDULED, 5, 4, 8.0),
        (4, 10, 9, FailureClass.EXIT_CODE, TaskStatus.SCHEDULED, 5, 9, 8.0),  # capped
    ],
)
def test_after_attempt_escalates_by_failure_class(
    attempt, max_attempts, priority, failure, status, next_attempt, next_priority, delay_s
):
    outcome = after_attempt(
        attempt=attempt,
        max_attempts=max_attempts,
        priority=priority,
        failure=failure,
        policy=RetryPolicy(backoff_base_s=1.0, priority_cap=9, jitter=False),
        now=T0,
        tiers=local_tiers(),
    )
    assert (outcome.status, outcome.attempt, outcome.priority) == (
        status,
        next_attempt,
        next_priority,
    )
    expected = None if delay_s is None else T0 + timedelta(seconds=delay_s)
    assert outcome.execute_at == expected


def test_only_the_first_executor_loss_counts_against_the_attempts():
    policy = RetryPolicy(max_free_losses=2)
    attempt, max_attempts, lost = 1, 2, 0
    statuses = []
    for _ in range(5):
        outcome = after_attempt(
            attempt=attempt,
            max_attempts=max_attempts,
            priority=0,
            failure=FailureClass.EXECUTOR_LOST,
            policy=policy,
            now=T0,
            lost_count=lost,
        )
        statuses.append(outcome.status)
        attempt, max_attempts, lost = outcome.attempt, outcome.max_attempts, outcome.lost_count
    # loss 1 uses attempt 1 of 2; losses 2 and 3 are free; loss 4 uses the last attempt
    assert statuses == [TaskStatus.SCHEDULED] * 3 + [TaskStatus.DEAD] * 2
    assert (attempt, lost) == (4, 5)


@pytest.mark.parametrize("started", [True, False])
@pytest.mark.parametrize("attempt, max_attempts, lost_count", [(1, 1, 0), (2, 5, 1), (4, 4, 3)])
def test_a_success_is_decided_without_the_row(attempt, max_attempts, lost_count, started):
    """What lets storage write a success without reading its row first: from
    any status a result applies to, whatever the row's limits and losses, a
    success ends the task and keeps them as they are."""
    outcome = after_attempt(
        attempt=attempt,
        max_attempts=max_attempts,
        priority=4,
        failure=None,
        policy=RetryPolicy(),
        now=T0,
        lost_count=lost_count,
        tiers=local_tiers(),
        started=started,
    )
    assert (outcome.status, outcome.attempt, outcome.priority) == (SUCCEED.target, attempt, 4)
    assert (outcome.max_attempts, outcome.lost_count, outcome.execute_at) == (
        max_attempts,
        lost_count,
        None,
    )
    assert SUCCEED.source == RESULT_SOURCE


def test_the_moves_and_results_are_the_documented_state_machine():
    """Every edge a writer may take, from scheduling.lifecycle: a final status
    is left only by a redrive of a dead task, and nothing reaches RUNNING
    without passing QUEUED (the start gate)."""
    edges = {(source, move.target) for move in MOVES for source in move.source}
    edges |= {(source, target) for source in RESULT_SOURCE for target in RESULT_TARGETS}
    S = TaskStatus
    assert edges == {
        (S.SCHEDULED, S.QUEUED),
        (S.SCHEDULED, S.CANCELLED),
        (S.SCHEDULED, S.SKIPPED),
        (S.QUEUED, S.RUNNING),
        (S.QUEUED, S.CANCELLED),
        (S.RUNNING, S.CANCELLED),
        (S.DEAD, S.SCHEDULED),
        *((flight, end) for flight in (S.QUEUED, S.RUNNING) for end in RESULT_TARGETS),
    }
    assert {source for source, _ in edges if source.is_final} == {S.DEAD}
    assert {source for source, target in edges if target is S.RUNNING} == {S.QUEUED}
    assert START.allowed_from(S.QUEUED) and not START.allowed_from(S.SCHEDULED)


def test_a_redrive_gives_the_next_attempt_more_attempts_due_now():
    outcome = after_redrive(attempt=3, attempts=2, priority=5, now=T0)
    assert (outcome.status, outcome.attempt, outcome.max_attempts) == (
        TaskStatus.SCHEDULED,
        4,
        5,
    )
    assert (outcome.priority, outcome.execute_at) == (5, T0)


@pytest.mark.parametrize(
    "exit_code, timed_out, output, launch_error, expected",
    [
        (0, False, "fine", None, None),
        (1, False, "boom", None, FailureClass.EXIT_CODE),
        (-9, True, "", None, FailureClass.TIMEOUT),
        (1, False, "Traceback ...\nMemoryError\n", None, FailureClass.MEMORY),
        (2, False, "bash: xmalloc: cannot allocate 10 bytes", None, FailureClass.MEMORY),
        (-9, False, "", None, FailureClass.MEMORY),  # killed, not by us: the OOM killer
        (None, False, "", "FileNotFoundError", FailureClass.LAUNCH_ERROR),
    ],
)
def test_classify(exit_code, timed_out, output, launch_error, expected):
    assert (
        classify(
            exit_code=exit_code,
            timed_out=timed_out,
            output_tail=output,
            launch_error=launch_error,
        )
        is expected
    )


def test_backoff_is_exponential_capped_and_fully_jittered():
    policy = RetryPolicy(backoff_base_s=1.0, backoff_max_s=10.0, jitter=False)
    assert [policy.backoff_s(n) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 10, 10]
    jittered = RetryPolicy(backoff_base_s=1.0, backoff_max_s=10.0)
    draws = [jittered.backoff_s(4) for _ in range(500)]
    assert all(0 <= d <= 8 for d in draws)
    assert min(draws) < 1 and max(draws) > 7  # spread over the whole range, not near 8


def test_tier_table_names_the_escalation_targets():
    table = local_tiers()
    assert table.stronger_than(0).name == "medium"
    assert table.stronger_than(7).name == "large"  # the strongest is its own next
    assert table.more_memory_than(1).name == "medium"


def spec(task_id, *, priority=0, due=T0, attempt=1, shard=0):
    return TaskSpec(
        task_id=task_id,
        attempt=attempt,
        epoch=1,
        shard=shard,
        priority=priority,
        due_at=due,
        script_id=1,
        script_sha256="x",
        interpreter=Interpreter.BASH,
        variables={},
        timeout_s=10,
    )


def test_ready_queue_orders_by_priority_then_due_then_arrival():
    queue = ReadyQueue()
    queue.push_many(
        [
            spec(1, priority=0, due=T0),
            spec(2, priority=5, due=T0 + timedelta(seconds=5)),
            spec(3, priority=5, due=T0),
            spec(4, priority=0, due=T0),
        ]
    )
    order = [s.task_id for s, _ in queue.take(FreeSlots([(0, "slot", 10)]))]
    assert order == [3, 2, 1, 4]
    assert len(queue) == 0


def test_ready_queue_ignores_a_repeated_attempt_but_takes_a_new_one():
    queue = ReadyQueue()
    assert queue.push(spec(1))
    assert not queue.push(spec(1))
    assert queue.push(spec(1, attempt=2))
    assert len(queue) == 2


def large_from_6(priority: int) -> int:
    return 1 if priority >= 6 else 0


def test_ready_queue_skips_what_cannot_be_placed_without_blocking_the_rest():
    queue = ReadyQueue(rank_of=large_from_6)
    queue.push_many([spec(1, priority=7), spec(2, priority=0), spec(3, priority=0)])
    placed = queue.take(FreeSlots([(0, "small", 5), (1, "large", 0)]))
    assert [s.task_id for s, _ in placed] == [2, 3]
    assert (1, 1) in queue and len(queue) == 1


def test_placement_stops_when_no_slot_is_free_without_looking_at_the_rest(monkeypatch):
    """10,000 queued, 3 free slots: three pops, not a scan of the queue."""
    queue = ReadyQueue(rank_of=large_from_6)
    queue.push_many(spec(i, priority=i % 10, due=T0 + timedelta(seconds=i)) for i in range(10_000))
    pops = []
    real_pop = ready_queue.heapq.heappop
    monkeypatch.setattr(ready_queue.heapq, "heappop", lambda heap: pops.append(1) or real_pop(heap))
    placed = queue.take(FreeSlots([(0, "small-a", 1), (0, "small-b", 1), (1, "large", 1)]))
    assert len(placed) == 3 and len(pops) == 3 and len(queue) == 9_997
    assert queue.take(FreeSlots([])) == [] and len(pops) == 3
    # only the small tier has room: the large tasks at the front are not popped
    placed = queue.take(FreeSlots([(0, "small-a", 2)]))
    assert all(s.priority < 6 for s, _ in placed) and len(pops) == 5


def test_free_slots_take_the_weakest_eligible_tier_then_the_least_busy_executor():
    free = FreeSlots([(0, "s1", 1), (0, "s2", 2), (1, "m1", 1), (2, "l1", 3)])
    assert free.strongest() == 2
    assert [free.reserve(0) for _ in range(3)] == ["s2", "s1", "s2"]  # most free first
    assert free.reserve(0) == "m1"  # small is full: the next stronger tier
    assert free.reserve(1) == "l1" and free.reserve(2) == "l1"  # never a weaker tier
    assert free.reserve(2) == "l1" and free.reserve(0) is None
    assert free.strongest() is None and not free


def test_fire_timer_pops_due_with_lead_and_sleeps_at_most_the_cap():
    clock = ManualClock(T0)
    timer = FireTimer()
    timer.add(1, T0 + timedelta(seconds=5))
    timer.add(2, T0 + timedelta(seconds=0.2))
    timer.add(3, T0 + timedelta(seconds=0.1))
    assert timer.seconds_until_next(now=clock.now(), lead_s=0.0, cap_s=1.0) == pytest.approx(0.1)
    assert timer.pop_due(now=clock.now(), lead_s=0.15) == [3]
    assert timer.pop_due(now=clock.now(), lead_s=0.25) == [2]
    assert timer.seconds_until_next(now=clock.now(), cap_s=1.0) == 1.0  # 5 s away: capped
    clock.advance(5)
    assert timer.pop_due(now=clock.now()) == [1]
    assert timer.seconds_until_next(now=clock.now(), cap_s=1.0) == 1.0  # empty


def test_fire_timer_moves_a_rescheduled_task_and_respects_limit():
    timer = FireTimer()
    timer.add(1, T0)
    timer.add(1, T0 + timedelta(seconds=30))  # a retry moved it
    timer.add(2, T0)
    timer.add(3, T0)
    assert timer.pop_due(now=T0, limit=1) == [2]
    assert timer.pop_due(now=T0) == [3]
    assert timer.pop_due(now=T0 + timedelta(seconds=30)) == [1]
    timer.add(4, T0)
    timer.discard(4)
    assert timer.pop_due(now=T0) == [] and len(timer) == 0


def test_waiting_tasks_age_so_retries_cannot_starve_new_work():
    queue = ReadyQueue(aging_s=10.0)
    queue.push_many(
        [
            spec(1, priority=0, due=T0),  # new work, waiting since T0
            spec(2, priority=2, due=T0 + timedelta(seconds=15)),  # a retry, escalated twice
            spec(3, priority=2, due=T0 + timedelta(seconds=25)),  # a later retry
        ]
    )
    assert queue.depth_by_priority() == {0: 1, 2: 2}
    # priority is worth 10 s of waiting: task 1 (key T0) beats task 3 (T0 + 5 s)
    assert [s.task_id for s, _ in queue.take(FreeSlots([(0, "slot", 10)]))] == [2, 1, 3]
    assert queue.depth_by_priority() == {}


def test_with_a_cgroup_a_sigkill_is_memory_only_by_its_oom_count():
    """Ray SIGKILLs a worker's children as the worker exits (`chronoray down`
    after its grace): with the cgroup's OOM count at hand, such a kill is the
    executor's loss, not the script's memory (a CI run recorded it as memory)."""
    killed = dict(exit_code=-9, timed_out=False, output_tail="", launch_error=None)
    assert classify(**killed, oom_known=True) is FailureClass.EXECUTOR_LOST
    assert classify(**killed, oom_known=True, oom_killed=True) is FailureClass.MEMORY
    assert classify(**killed) is FailureClass.MEMORY  # no cgroup: the OOM killer's guess


def test_only_what_is_due_within_the_lookahead_goes_on_a_timer():
    now = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
    entries = [
        (1, now - timedelta(seconds=5)),  # overdue: at once
        (2, now + timedelta(seconds=60)),  # on the window's edge: in
        (3, now + timedelta(seconds=60, microseconds=1)),  # beyond: the sweep's
        (4, now + timedelta(days=30)),
    ]
    assert within_lookahead(entries, now=now, lookahead_s=60) == entries[:2]
    assert within_lookahead(iter(entries), now=now, lookahead_s=0) == entries[:1]


def test_trusted_builds_what_the_constructor_builds_and_insists_on_every_field():
    values = {
        "task_id": 7,
        "owner_id": 1,
        "script_id": 2,
        "script_name": "a.sh",
        "execute_at": T0,
        "status": TaskStatus.QUEUED,
        "priority": 3,
        "attempt": 2,
        "max_attempts": 5,
        "variables": {"A": "b"},
        "timeout_s": 9.5,
        "idempotency_key": "k",
        "created_at": T0,
        "updated_at": T0 + timedelta(seconds=1),
        "lease_expires_at": None,
        "epoch": 4,
        "schedule_id": None,
        "nominal_at": T0,
        "lost_count": 1,
    }
    built = trusted(Task, values)
    assert built == Task(**values) and type(built) is Task
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.priority = 0  # type: ignore[misc]
    with pytest.raises(TypeError, match="needs exactly"):
        trusted(Task, {k: v for k, v in values.items() if k != "lost_count"})  # no defaults
    with pytest.raises(TypeError, match="needs exactly"):
        trusted(Task, {**values, "lost_cuont": 1})
