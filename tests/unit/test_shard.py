"""The plain Shard class over a SQLite repository, a fake dispatcher and a
manual clock: no Ray, no sleeping."""

import asyncio
from dataclasses import replace
from datetime import timedelta

import pytest

from actors.results import ResultRecorder
from actors.shard_actor import Shard, Superseded
from chronoray.settings import Settings
from scheduling.clock import ManualClock
from scheduling.errors import Unavailable
from scheduling.lifecycle import RetryPolicy
from scheduling.models import FailureClass, Interpreter, NewTask, RunResult, TaskStatus
from storage.sql import SqlTaskRepository
from tests.conftest import T0
from tests.sqlite import rows_in, sqlite_repository
from tests.unit.fakes import FakeDispatcher, FakePeers

SETTINGS = Settings(
    database_url="sqlite://",
    num_shards=1,
    prefire_ms=200,
    lookahead_s=60,
    retry=RetryPolicy(backoff_base_s=2.0, jitter=False),
)


class World:
    def __init__(self, settings=SETTINGS, room=1000):
        self.clock = ManualClock(T0)
        self.repo = sqlite_repository()
        self.owner = self.repo.ensure_user(first_name="a", last_name="b", now=T0)
        self.repo.add_script(
            owner_id=self.owner, name="s", interpreter=Interpreter.BASH, body=b"true", now=T0
        )
        self.dispatcher = FakeDispatcher(room=room)
        self.peers = FakePeers()
        self.settings = settings

    def shard(self, index=0):
        return Shard(
            index=index,
            repo=self.repo,
            dispatcher=self.dispatcher,
            peers=self.peers,
            settings=self.settings,
            clock=self.clock,
        )

    def new(self, seconds, **kw):
        return NewTask(
            owner_id=self.owner, script_name="s", execute_at=T0 + timedelta(seconds=seconds), **kw
        )


def run(coro):
    return asyncio.run(coro)


def test_submitted_task_fires_within_the_prefire_lead_not_before():
    world = World()

    async def scenario():
        shard = world.shard()
        await shard.start()
        [result] = await shard.submit([world.new(5)])
        assert result.created and result.task.status is TaskStatus.SCHEDULED
        assert shard.next_wake_s() == 1.0  # capped, though due in 4.8 s
        world.clock.advance(4.7)
        assert await shard.fire_due() == 0
        assert shard.next_wake_s() == pytest.approx(0.1)
        world.clock.advance(0.1)  # 0.2 s before due: the lead
        assert await shard.fire_due() == 1
        [spec] = world.dispatcher.received
        assert spec.due_at == T0 + timedelta(seconds=5)  # the executor waits for the instant
        assert world.repo.get_task(result.task.task_id).status is TaskStatus.QUEUED
        assert await shard.fire_due() == 0  # fired once

    run(scenario())


def test_a_full_dispatcher_gets_nothing_more():
    world = World(room=2)

    async def scenario():
        shard = world.shard()
        await shard.start()
        await shard.submit([world.new(0) for _ in range(5)])
        assert await shard.fire_due() == 2
        assert await shard.fire_due() == 0
        world.dispatcher.capacity = 10
        assert await shard.fire_due() == 3

    run(scenario())


def test_tasks_beyond_the_lookahead_are_loaded_by_the_sweep_when_they_come_near():
    world = World()

    async def scenario():
        shard = world.shard()
        await shard.start()
        await shard.submit([world.new(3600)])
        world.clock.advance(3600 - 30)
        assert await shard.fire_due() == 0
        await shard.sweep()
        world.clock.advance(30)
        assert await shard.fire_due() == 1

    run(scenario())


def test_a_restarted_shard_rebuilds_from_the_database_and_fences_the_old_one():
    world = World()

    async def scenario():
        old = world.shard()
        await old.start()
        await old.submit([world.new(1), world.new(2)])
        new = world.shard()  # the restart: same index, fresh memory
        assert await new.start() == 2
        world.clock.advance(2)
        with pytest.raises(Superseded):  # the stale epoch claims nothing
            await old.fire_due()
        assert await new.fire_due() == 2

    run(scenario())


def test_a_restarted_shard_hands_over_queued_tasks_again():
    """The old incarnation died between its claim and the hand-over."""
    world = World()

    async def scenario():
        old = world.shard()
        await old.start()
        [submitted] = await old.submit([world.new(0)])
        world.repo.claim(
            [submitted.task.task_id],
            shard=0,
            epoch=old.epoch,
            lease_until=T0 + timedelta(seconds=600),
            now=T0,
        )
        assert world.dispatcher.received == []
        new = world.shard()
        await new.start()
        assert [s.task_id for s in world.dispatcher.received] == [submitted.task.task_id]

    run(scenario())


def result_for(spec, *, failure, now):
    return RunResult.of(
        spec,
        executor_id="e",
        tier="small",
        node_id="n",
        started_at=now,
        finished_at=now,
        exit_code=1 if failure else 0,
        output_tail="boom" if failure else "ok",
        failure=failure,
    )


def test_failure_retries_with_higher_priority_after_backoff_then_dead():
    world = World()

    async def scenario():
        shard = world.shard()
        await shard.start()
        [submitted] = await shard.submit([world.new(0, max_attempts=2)])
        task_id = submitted.task.task_id
        await shard.fire_due()
        [first] = world.dispatcher.received
        assert (
            await shard.record_results(
                [result_for(first, failure=FailureClass.EXIT_CODE, now=world.clock.now())]
            )
            == 1
        )
        task = world.repo.get_task(task_id)
        assert (task.status, task.attempt, task.priority) == (TaskStatus.SCHEDULED, 2, 1)
        assert task.execute_at == T0 + timedelta(seconds=2)
        world.clock.advance(1.7)
        assert await shard.fire_due() == 0
        world.clock.advance(0.2)
        assert await shard.fire_due() == 1
        second = world.dispatcher.received[-1]
        assert (second.attempt, second.priority) == (2, 1)
        # a replayed first result changes nothing now
        assert (
            await shard.record_results([result_for(first, failure=None, now=world.clock.now())])
            == 0
        )
        await shard.record_results(
            [result_for(second, failure=FailureClass.EXIT_CODE, now=world.clock.now())]
        )
        assert world.repo.get_task(task_id).status is TaskStatus.DEAD
        assert [r.priority for r in world.repo.list_runs(task_id)] == [0, 1]

    run(scenario())


def test_a_retry_that_moves_to_another_range_is_handed_to_its_owner():
    world = World(
        settings=SETTINGS.with_(num_shards=2, retry=RetryPolicy(backoff_base_s=60.0, jitter=False))
    )

    async def scenario():
        base = T0 - timedelta(seconds=T0.timestamp() % 120)  # a range owned by shard 0
        world.clock._now = base
        shard = world.shard(0)
        await shard.start()
        [submitted] = await shard.submit([world.new((base - T0).total_seconds())])
        await shard.fire_due()
        [spec] = world.dispatcher.received
        await shard.record_results([result_for(spec, failure=FailureClass.TIMEOUT, now=base)])
        assert world.peers.tracked == {1: [(submitted.task.task_id, base + timedelta(seconds=60))]}

    run(scenario())


def test_a_shard_hints_its_peers_only_of_tasks_inside_the_look_ahead():
    """Beyond the look-ahead an owner would drop the hint: none is sent, and
    the owner's sweep finds the tasks once they come inside it."""
    world = World(settings=SETTINGS.with_(num_shards=2, range_slices=2))

    async def scenario():
        base = T0 - timedelta(seconds=T0.timestamp() % 120)  # shard 0's range, as is base + 240 s
        later = base + timedelta(seconds=240)
        world.clock._now = base
        shard, owner = world.shard(0), world.shard(1)
        await shard.start()
        await owner.start()
        results = await shard.submit([world.new((later - T0).total_seconds()) for _ in range(4)])
        assert world.peers.tracked == {}
        world.clock._now = later - timedelta(seconds=SETTINGS.lookahead_s / 2)
        await owner.sweep()
        world.clock._now = later
        assert await owner.fire_due() == 2  # the odd ids: its slice
        assert sorted(s.task_id for s in world.dispatcher.received) == sorted(
            r.task.task_id for r in results if r.task.task_id % 2
        )

    run(scenario())


def test_in_a_sliced_range_the_submitting_shard_hands_each_task_to_its_owner():
    world = World(settings=SETTINGS.with_(num_shards=2, range_slices=2))

    async def scenario():
        base = T0 - timedelta(seconds=T0.timestamp() % 120)  # the range is shard 0's
        world.clock._now = base
        shard = world.shard(0)
        await shard.start()
        results = await shard.submit([world.new((base - T0).total_seconds()) for _ in range(4)])
        ids = [r.task.task_id for r in results]
        theirs = [i for i in ids if i % 2]  # odd ids are the second slice: shard 1's
        assert world.peers.tracked == {1: [(i, base) for i in theirs]}
        assert await shard.fire_due() == 2  # shard 0 fires its own slice only
        assert sorted(s.task_id for s in world.dispatcher.received) == [
            i for i in ids if i % 2 == 0
        ]

    run(scenario())


def test_a_stale_queue_lease_hands_the_same_attempt_over_again():
    """Defect 6: a hand-over that never arrived (or a task still waiting for
    a slot) is offered again; no attempt is used."""
    world = World(settings=SETTINGS.with_(queue_lease_s=10))

    async def scenario():
        shard = world.shard()
        await shard.start()
        [submitted] = await shard.submit([world.new(0, max_attempts=1)])
        await shard.fire_due()
        [handed] = world.dispatcher.received
        world.dispatcher.received.clear()  # the hand-over was lost on the way
        world.clock.advance(11)
        await shard.sweep()
        assert world.dispatcher.received == [handed]
        task = world.repo.get_task(submitted.task.task_id)
        assert (task.status, task.attempt) == (TaskStatus.QUEUED, 1)
        assert world.repo.list_runs(task.task_id) == []

    run(scenario())


def test_a_failed_hand_over_is_sent_again_on_the_next_turn():
    """Defect 7: a dispatcher that does not answer fails one turn of the
    loop; the claimed attempts are kept and sent when it answers."""
    world = World()

    async def scenario():
        shard = world.shard()
        await shard.start()
        await shard.submit([world.new(0)])
        real_submit = world.dispatcher.submit

        async def refuse(specs):
            raise TimeoutError("the dispatcher did not answer")

        world.dispatcher.submit = refuse
        with pytest.raises(TimeoutError):
            await shard.fire_due()
        assert world.dispatcher.received == []
        world.dispatcher.submit = real_submit
        await shard.fire_due()
        assert len(world.dispatcher.received) == 1

    run(scenario())


def test_a_result_the_database_refuses_is_isolated_to_its_task():
    """Defect 1: one refused item must not hold up the rest of its batch."""
    world = World()

    async def scenario():
        shard = world.shard()
        await shard.start()
        await shard.submit([world.new(0), world.new(0)])
        await shard.fire_due()
        bad, good = world.dispatcher.received
        real = world.repo.record_results

        def picky(results, *, on_outcome, **kw):
            if any(r.output_tail == "poison" for r in results):
                for result in results:  # as SQL does: outcomes seen, then the commit fails
                    on_outcome(result, TaskStatus.SUCCEEDED, None)
                raise ValueError("invalid byte sequence")
            return real(results, on_outcome=on_outcome, **kw)

        world.repo.record_results = picky
        now = world.clock.now()
        poisoned = replace(result_for(bad, failure=None, now=now), output_tail="poison")
        await shard.record_results([poisoned, result_for(good, failure=None, now=now)])
        assert world.repo.get_task(good.task_id).status is TaskStatus.SUCCEEDED
        assert world.repo.get_task(bad.task_id).status is TaskStatus.SUCCEEDED
        [run_] = world.repo.list_runs(bad.task_id)
        assert "could not be stored" in run_.output_tail
        [lag] = [f for f in shard.metrics.families() if f.name == "chronoray_fire_lag_seconds"]
        [count] = [s.value for s in lag.samples if s.name.endswith("_count")]
        assert count == 2  # the failed batch's outcomes are not counted

    run(scenario())


def test_a_superseded_owner_claims_nothing_and_says_so():
    """Scenario 10 in miniature: a second owner starts on the same database
    while the first is stopped; the first must notice, not fire beside it."""
    world = World()

    async def scenario():
        first = world.shard()
        await first.start()
        [a] = await first.submit([world.new(5)])
        second = world.shard()  # same index, same database: a newer epoch
        await second.start()
        assert second.epoch == first.epoch + 1
        world.clock.advance(5)
        with pytest.raises(Superseded):
            await first.fire_due()  # its claim is fenced off
        with pytest.raises(Superseded):
            await first.sweep()
        assert world.dispatcher.received == []
        assert await second.fire_due() == 1
        [b] = await first.submit([world.new(10)])  # submissions need no epoch
        await first.start()  # taking the shard back fences the second
        world.clock.advance(5)
        with pytest.raises(Superseded):
            await second.sweep()
        assert await first.fire_due() == 1
        assert [s.task_id for s in world.dispatcher.received] == [a.task.task_id, b.task.task_id]

    run(scenario())


def test_a_stopping_shard_refuses_submissions_with_unavailable():
    world = World()

    async def scenario():
        shard = world.shard()
        await shard.start()
        shard.accepting = False
        with pytest.raises(Unavailable):
            await shard.submit([world.new(5)])
        assert rows_in(world.repo, "tasks") == 0

    run(scenario())


def test_a_claim_that_committed_with_its_answer_lost_is_handed_over_by_the_next_sweep():
    """Found by the chaos harness (scenario 5, PostgreSQL restarted with -m
    immediate): the claim's commit landed, its answer did not, and the
    attempts sat queued with no one to hand them over until the queue lease
    (10 minutes) ran out."""
    world = World()

    class AnswerLost(SqlTaskRepository):
        lose_next = True

        def claim(self, *args, **kwargs):
            claimed = super().claim(*args, **kwargs)
            if self.lose_next:
                self.lose_next = False
                raise Unavailable("server closed the connection unexpectedly")
            return claimed

    world.repo.__class__ = AnswerLost

    async def scenario():
        shard = world.shard()
        await shard.start()
        [result] = await shard.submit([world.new(1)])
        world.clock.advance(1)
        with pytest.raises(Unavailable):
            await shard.fire_due()
        assert world.repo.get_task(result.task.task_id).status is TaskStatus.QUEUED
        assert world.dispatcher.received == []
        await shard.sweep()
        assert [s.task_id for s in world.dispatcher.received] == [result.task.task_id]

    run(scenario())


def test_what_an_executor_committed_is_counted_and_its_retry_timed_by_the_shard():
    world = World()

    async def scenario():
        shard = world.shard()
        await shard.start()
        [submitted] = await shard.submit([world.new(0, max_attempts=2)])
        await shard.fire_due()
        [first] = world.dispatcher.received
        executor_side = ResultRecorder(world.repo, world.settings, name="e", clock=world.clock)
        committed = await executor_side.record(
            [result_for(first, failure=FailureClass.EXIT_CODE, now=world.clock.now())]
        )
        task = world.repo.get_task(submitted.task.task_id)
        assert (task.status, task.attempt) == (TaskStatus.SCHEDULED, 2)
        assert committed.watch == ((task.task_id, T0 + timedelta(seconds=2)),)
        await shard.results_committed(committed)
        [retries] = [f for f in shard.metrics.families() if f.name == "chronoray_retries"]
        assert [s.value for s in retries.samples if s.name.endswith("_total")] == [1.0]
        world.clock.advance(1.9)  # within the prefire lead: the shard's timer holds it
        assert await shard.fire_due() == 1
        assert world.dispatcher.received[-1].attempt == 2

    run(scenario())
