"""The plain Dispatcher with fake executors and shards."""

import asyncio
from datetime import timedelta

import pytest

from actors.dispatcher import LOSS_REPORTED_FOR_S, Dispatcher, ExecutorSlots
from scheduling.clock import ManualClock
from scheduling.models import CommittedResults, FailureClass, Outcome, RunResult, TaskStatus
from scheduling.tiers import production_tiers
from tests.conftest import T0
from tests.unit.fakes import FakeExecutor, FakeShardLink
from tests.unit.test_pure_scheduling import spec


def build(slots=None, *, credits=1, clock=None):
    slots = slots or {"small": 2, "medium": 1, "large": 1}
    tiers = production_tiers()
    executors = {
        name: ExecutorSlots(
            executor_id=f"{name}-0",
            tier=name,
            tier_rank=tiers.index_for(tiers.by_name(name).min_priority),
            slots=count,
            client=FakeExecutor(),
            credits=credits,
        )
        for name, count in slots.items()
    }
    shards = FakeShardLink()
    dispatcher = Dispatcher(
        tiers=tiers,
        executors=list(executors.values()),
        shards=shards,
        max_queued=100,
        clock=clock,
    )
    return dispatcher, executors, shards


def result(s, failure=None):
    return RunResult.of(
        s,
        executor_id="x",
        tier="small",
        node_id="n",
        started_at=T0,
        finished_at=T0,
        exit_code=0,
        output_tail="",
        failure=failure,
    )


def test_tasks_go_to_their_own_tier_first_and_never_to_a_weaker_one():
    async def scenario():
        dispatcher, ex, _ = build()
        await dispatcher.submit(
            [spec(1, priority=0), spec(2, priority=4), spec(3, priority=7), spec(4, priority=7)]
        )
        assert ex["small"].client.received == [1]
        assert ex["medium"].client.received == [2]
        assert ex["large"].client.received == [3]  # 4 waits: no weaker tier may take it
        assert (await dispatcher.room()) == 99

    asyncio.run(scenario())


def test_a_full_tier_overflows_to_a_stronger_one_and_the_rest_wait():
    async def scenario():
        dispatcher, ex, _ = build({"small": 1, "medium": 1})
        await dispatcher.submit([spec(i) for i in range(1, 5)])
        assert ex["small"].client.received == [1]
        assert ex["medium"].client.received == [2]
        assert dispatcher.stats()["queued"] == 2

    asyncio.run(scenario())


def test_an_executor_is_assigned_up_to_its_credit_window_and_never_more():
    async def scenario():
        dispatcher, ex, _ = build({"small": 2}, credits=2)
        specs = [spec(i, due=T0 + timedelta(seconds=i)) for i in range(1, 11)]
        await dispatcher.submit(specs)
        small = ex["small"]
        assert small.client.received == [1, 2, 3, 4]  # 2 slots × 2 credits, in order
        assert dispatcher.stats()["queued"] == 6
        for done in range(1, 7):  # each result frees one credit: one more, never two
            await dispatcher.report_results([result(specs[done - 1])])
            assert len(small.in_flight) == 4
            assert small.client.received == list(range(1, 5 + done))
        assert dispatcher.stats()["queued"] == 0

    asyncio.run(scenario())


def test_results_free_slots_reach_the_owner_shard_and_never_requeue():
    async def scenario():
        dispatcher, ex, shards = build({"small": 1})
        first, second = spec(1, shard=3), spec(2, shard=0, due=T0 + timedelta(seconds=1))
        await dispatcher.submit([first, second])
        assert ex["small"].client.received == [1]
        await dispatcher.report_results([result(first, FailureClass.EXIT_CODE)])
        assert ex["small"].client.received == [1, 2]
        assert [r.task_id for r in shards.results[3]] == [1]  # committed before the answer
        await dispatcher.submit([first])  # a restarted shard hands it over again
        await dispatcher.submit([second])  # still running: ignored too
        assert ex["small"].client.received == [1, 2]
        assert dispatcher.stats()["queued"] == 0

    asyncio.run(scenario())


def test_an_executor_that_refuses_gets_its_tasks_requeued():
    async def scenario():
        dispatcher, ex, _ = build({"small": 1})
        ex["small"].client.fail = True
        await dispatcher.submit([spec(1)])
        assert dispatcher.stats()["queued"] == 1
        ex["small"].client.fail = False
        await dispatcher.reconcile()
        assert ex["small"].client.received == [1]

    asyncio.run(scenario())


def test_cancel_drops_waiting_attempts_and_kills_running_ones():
    async def scenario():
        dispatcher, ex, _ = build({"small": 1})
        await dispatcher.submit([spec(1), spec(2), spec(3)])
        assert ex["small"].client.received == [1]
        await dispatcher.cancel([(1, 1), (2, 1)])
        assert ex["small"].client.cancelled == [(1, 1)]
        assert ex["small"].client.received == [1, 3]  # 2 was dropped, 3 took the slot
        await dispatcher.submit([spec(2)])  # a late hand-over of a cancelled attempt
        assert dispatcher.stats()["queued"] == 0

    asyncio.run(scenario())


def test_an_executor_hears_back_only_after_the_shard_committed():
    """Defect 2: results parked in a dispatcher's memory die with it."""

    async def scenario():
        dispatcher, ex, shards = build({"small": 1})
        shards.fail = True
        await dispatcher.submit([spec(1)])
        try:
            await dispatcher.report_results([result(spec(1))])
        except ConnectionError:
            pass
        else:
            raise AssertionError("acknowledged a result no shard committed")
        assert dispatcher.stats()["executors"]["small-0"]["running"] == 0  # the slot is free
        shards.fail = False
        await dispatcher.report_results([result(spec(1))])  # the executor sends it again
        assert [r.task_id for r in shards.results[0]] == [1]

    asyncio.run(scenario())


def test_running_attempts_no_executor_holds_are_lost_at_once():
    """Defects 2 and 8: after a dispatcher or whole-cluster restart, running
    rows whose executor is gone are retried now, not when a lease ends."""

    async def scenario():
        dispatcher, ex, shards = build({"small": 1, "medium": 1})
        held, orphan = spec(1), spec(2)
        ex["small"].client.holds = [held.key]
        lost = (await dispatcher.recover([held, orphan], []))[0]
        assert [(r.task_id, r.failure) for r in lost] == [(2, FailureClass.EXECUTOR_LOST)]
        assert [r.task_id for r in shards.results[0]] == [2]
        assert lost[0].started_at is None

        ex["medium"].client.fail = True  # cannot tell what it holds: no verdict
        assert await dispatcher.recover([spec(3)], []) == ([], [])

    asyncio.run(scenario())


def test_a_draining_dispatcher_places_nothing_and_counts_what_executors_hold():
    """`chronoray down`: queued attempts stay queued; what runs may finish."""

    async def scenario():
        dispatcher, ex, _ = build({"small": 1})
        ex["small"].client.holds = [(1, 1)]
        assert await dispatcher.drain() == 1
        await dispatcher.submit([spec(2)])
        assert ex["small"].client.received == []
        assert dispatcher.stats()["queued"] == 1
        ex["small"].client.holds = []
        assert await dispatcher.drain() == 0
        ex["small"].client.fail = True
        assert await dispatcher.drain() is None  # cannot tell: not done

    asyncio.run(scenario())


def test_a_cancel_for_an_attempt_the_dispatcher_does_not_place_reaches_every_executor():
    """A running attempt this dispatcher lost track of (a restart, a
    reconcile catching up) is still killed: a cancel_previous schedule
    relies on it (its flaky CI failure: the previous run completed)."""

    async def scenario():
        dispatcher, ex, _ = build({"small": 1, "medium": 1})
        await dispatcher.cancel([(7, 1)])
        assert ex["small"].client.cancelled == [(7, 1)]
        assert ex["medium"].client.cancelled == [(7, 1)]

    asyncio.run(scenario())


def test_reconcile_keeps_what_was_placed_or_finished_while_an_executor_answered():
    async def scenario():
        dispatcher, ex, _ = build({"small": 2})
        client = ex["small"].client
        done, placed_meanwhile = spec(1), spec(2)
        await dispatcher.submit([done])
        answer = asyncio.Event()

        async def slow_running():
            await answer.wait()
            return [done]  # the executor's view, taken before 2 arrived and 1 finished

        client.running = slow_running
        reconciling = asyncio.ensure_future(dispatcher.reconcile())
        await asyncio.sleep(0)
        await dispatcher.report_results([result(done)])
        await dispatcher.submit([placed_meanwhile])
        answer.set()
        await reconciling
        assert list(ex["small"].in_flight) == [placed_meanwhile.key]

    asyncio.run(scenario())


def test_an_attempt_on_its_way_to_an_executor_outlives_a_reconcile_that_answered_first():
    """Ray runs an async actor's calls out of order: an executor may answer
    `running` before it takes a batch sent to it earlier. The attempt stays
    placed, so losing that executor reports it (dropped here, it waited as
    queued in the database until its lease ran out)."""

    async def scenario():
        dispatcher, ex, shards = build({"small": 1})
        client = ex["small"].client
        arrive = asyncio.Event()
        take = client.run_batch

        async def late_run_batch(specs):
            await arrive.wait()
            return await take(specs)

        client.run_batch = late_run_batch
        placing = asyncio.ensure_future(dispatcher.submit([spec(1)]))
        await asyncio.sleep(0)
        await dispatcher.reconcile()  # the executor's answer: nothing yet
        arrive.set()
        await placing
        assert client.received == [1]
        assert list(ex["small"].in_flight) == [(1, 1)]
        lost = await dispatcher.sync_members([])  # that executor is declared dead
        assert [r.task_id for r in lost] == [1]
        assert [r.task_id for r in shards.results[0]] == [1]

    asyncio.run(scenario())


def test_an_attempt_reported_lost_is_not_placed_again_when_its_hand_over_fails_after():
    """Its loss put the task back as a new attempt; placed again, the old one
    could pass its start gate before the loss was committed, and both run."""

    async def scenario():
        dispatcher, ex, shards = build({"small": 1, "medium": 1})
        client = ex["small"].client
        refuse = asyncio.Event()

        async def dying_run_batch(specs):
            await refuse.wait()
            raise ConnectionError("executor is gone")

        client.run_batch = dying_run_batch
        placing = asyncio.ensure_future(dispatcher.submit([spec(1)]))
        await asyncio.sleep(0)
        lost = await dispatcher.sync_members([ex["medium"]])
        assert [r.task_id for r in lost] == [1]
        refuse.set()
        await placing
        assert dispatcher.stats()["queued"] == 0
        assert ex["medium"].client.received == []

    asyncio.run(scenario())


def test_a_queued_attempt_no_one_holds_is_placed_again_and_none_that_someone_holds():
    """The net under every way of dropping an attempt on its way: what the
    database says is queued since long ago, and neither this dispatcher nor
    an executor holds, is placed again rather than left to its lease."""

    async def scenario():
        dispatcher, ex, _ = build({"small": 1})
        client = ex["small"].client
        placed, waiting, finished, held, dropped = (spec(i) for i in range(1, 6))
        await dispatcher.submit([placed, waiting])  # one slot: `waiting` waits here
        await dispatcher.report_results([result(finished)])  # its result is on its way
        client.holds = [held.key]  # taken by the executor, unknown here
        queued = [placed, waiting, finished, held, dropped]
        assert await dispatcher.recover([], queued) == ([], [dropped])
        assert client.received == [1]
        assert dispatcher.stats()["queued"] == 2  # `waiting` and `dropped`, in order
        assert dispatcher.stats()["dropped_recovered"] == 1
        assert await dispatcher.recover([], queued) == ([], [])  # now it waits here
        await dispatcher.report_results([result(placed)])
        assert client.received == [1, 2]

        client.fail = True  # cannot tell what it holds: no verdict
        assert await dispatcher.recover([], [spec(7)]) == ([], [])
        client.fail = False
        await dispatcher.drain()
        assert await dispatcher.recover([], [spec(8)]) == ([], [])  # `chronoray down`

    asyncio.run(scenario())


def test_a_recovery_pass_asks_each_executor_once_for_orphans_and_dropped_alike():
    async def scenario():
        dispatcher, ex, shards = build({"small": 1})
        client = ex["small"].client
        asked = 0
        holding = client.holding

        async def counted_holding():
            nonlocal asked
            asked += 1
            return await holding()

        client.holding = counted_holding
        orphan, dropped = spec(1), spec(2)
        lost, placed = await dispatcher.recover([orphan], [dropped])
        assert [r.task_id for r in lost] == [1] and placed == [dropped]
        assert asked == 1
        assert client.received == [2]

    asyncio.run(scenario())


def test_the_losses_of_a_dead_executor_reach_their_shard_though_it_failed_to_answer_once():
    async def scenario():
        dispatcher, ex, shards = build({"small": 1, "medium": 1})
        await dispatcher.submit([spec(1)])
        shards.fail = True  # the owner shard is restarting
        lost = await dispatcher.sync_members([ex["medium"]])
        assert [r.task_id for r in lost] == [1] and shards.results == {}
        shards.fail = False
        assert await dispatcher.sync_members([ex["medium"]]) == []  # nothing newly lost
        assert [r.task_id for r in shards.results[0]] == [1]  # reported again, once
        await dispatcher.sync_members([ex["medium"]])
        assert len(shards.results[0]) == 1
        assert dispatcher.stats()["late_results"] == 0

    asyncio.run(scenario())


def test_a_loss_its_shard_never_takes_is_given_up_after_a_minute_and_left_to_the_net():
    async def scenario():
        clock = ManualClock(T0)
        dispatcher, ex, shards = build({"small": 1, "medium": 1}, clock=clock)
        lost = spec(1)
        await dispatcher.submit([lost])
        shards.fail = True  # its shard is gone (a redeploy with fewer shards)
        await dispatcher.sync_members([ex["medium"]])
        assert await dispatcher.recover([], [lost]) == ([], [])  # its loss is being reported
        clock.advance(LOSS_REPORTED_FOR_S + 1)
        await dispatcher.sync_members([ex["medium"]])
        assert await dispatcher.recover([], [lost]) == ([], [lost])
        assert ex["medium"].client.received == [1]

    asyncio.run(scenario())


def test_results_an_executor_committed_free_slots_and_reach_their_shards_as_decided():
    async def scenario():
        dispatcher, ex, shards = build({"small": 1})
        first, second = spec(1, shard=3), spec(2, shard=0)
        await dispatcher.submit([first, second])
        assert ex["small"].client.received == [1]
        done = result(first, FailureClass.EXIT_CODE)
        retry_at = T0 + timedelta(seconds=2)
        committed = CommittedResults(
            outcomes=(Outcome(result=done, status=TaskStatus.SCHEDULED, schedule_id=None),),
            watch=((1, retry_at),),
        )
        await dispatcher.report_results([done], committed)
        assert ex["small"].client.received == [1, 2]  # the slot is free
        assert shards.results == {}  # nothing recorded twice
        assert shards.committed == {3: [CommittedResults(watch=((1, retry_at),))]}
        assert counted(dispatcher, "chronoray_retries_total", failure="exit_code") == 1

    asyncio.run(scenario())


async def one_committed(*, shard, failure=None, status=TaskStatus.SUCCEEDED, watch=()):
    """A dispatcher with one attempt placed, its result, and what its
    executor's commit decided."""
    dispatcher, _, shards = build({"small": 1})
    placed = spec(1, shard=shard)
    await dispatcher.submit([placed])
    done = result(placed, failure)
    outcome = Outcome(result=done, status=status, schedule_id=None)
    return dispatcher, shards, done, CommittedResults(outcomes=(outcome,), watch=watch)


def test_a_success_an_executor_committed_is_counted_here_and_costs_its_shard_no_call():
    async def scenario():
        dispatcher, shards, done, committed = await one_committed(shard=3)
        await dispatcher.report_results([done], committed)
        assert shards.committed == {} and shards.results == {}
        assert counted(dispatcher, "chronoray_fire_lag_seconds_count", tier="small") == 1

    asyncio.run(scenario())


def test_outcomes_are_counted_once_though_a_failed_announcement_is_reported_again():
    async def scenario():
        dispatcher, shards, done, committed = await one_committed(
            shard=0,
            failure=FailureClass.TIMEOUT,
            status=TaskStatus.SCHEDULED,
            watch=((1, T0 + timedelta(seconds=2)),),
        )
        shards.fail = True
        with pytest.raises(ConnectionError):
            await dispatcher.report_results([done], committed)
        assert counted(dispatcher, "chronoray_retries_total", failure="timeout") == 0
        shards.fail = False
        await dispatcher.report_results([done], committed)  # the executor's resend
        assert counted(dispatcher, "chronoray_retries_total", failure="timeout") == 1
        assert len(shards.committed[0]) == 1

    asyncio.run(scenario())


def counted(dispatcher, name, **labels):
    return sum(
        sample.value
        for family in dispatcher.metrics.families()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )
