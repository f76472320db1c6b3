"""The plain ExecutorPool (membership, heartbeats, sizing) and the
dispatcher following it, with fake executors and a hand-driven clock."""

import asyncio

from actors.dispatcher import Dispatcher, ExecutorSlots
from actors.executor import ExecutorDraining, Heartbeat
from actors.executor_pool import ExecutorPool
from scheduling.clock import ManualClock
from scheduling.models import FailureClass
from scheduling.tiers import PoolTiming, TierTable, slot_tier
from tests.conftest import T0
from tests.unit.fakes import FakeExecutor, FakeShardLink
from tests.unit.test_dispatcher import result
from tests.unit.test_pure_scheduling import spec

TIMING = PoolTiming(
    heartbeat_s=1.0, misses=3, placement_timeout_s=10.0, idle_s=20.0, reap_after_s=30.0
)
TIERS = TierTable(
    [
        slot_tier("small", 0, executors=1, max_executors=3),
        slot_tier("large", 5, executors=1, slots=2),
    ]
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Factory:
    def __init__(self) -> None:
        self.created: list[str] = []
        self.destroyed: list[str] = []

    def create(self, tier, executor_id):
        self.created.append(executor_id)
        return executor_id  # the handle

    def destroy(self, handle) -> None:
        self.destroyed.append(handle)


def build():
    clock, factory = Clock(), Factory()
    pool = ExecutorPool(tiers=TIERS, factory=factory, timing=TIMING, clock=clock)
    return pool, clock, factory


def beat_all(pool, running=0, told=None):
    """Every executor heartbeats; one told to drain (``told``, kept across
    calls) says it is drained on its next beat when it runs nothing."""
    told = set() if told is None else told
    for executor_id in [e["executor_id"] for e in pool.status()["executors"]]:
        reply = pool.heartbeat(executor_id, running, drained=executor_id in told and not running)
        if reply == Heartbeat.DRAIN:
            told.add(executor_id)


def test_executors_join_after_their_first_heartbeat():
    pool, clock, factory = build()
    assert [i.split("-")[0] for i in factory.created] == ["small", "large"]
    assert pool.executors() == []  # not placed yet: the dispatcher must not use them
    small = factory.created[0]
    assert pool.heartbeat(small, 0, "node-1") == Heartbeat.LIVE
    assert [(i.executor_id, i.node) for i in pool.executors()] == [(small, "node-1")]
    shown = {e["executor_id"]: e["node"] for e in pool.status()["executors"]}
    assert shown == {small: "node-1", factory.created[1]: None}


def small_suspected():
    """The small executor silent for 3.5 s (> 3 × 1 s), the large one
    heartbeating: the tick at 3.5 s suspects the small one alone."""
    pool, clock, factory = build()
    beat_all(pool)
    small, large = factory.created
    clock.now = 2.0
    pool.heartbeat(large, 0)
    assert pool.tick({}) == []
    clock.now = 3.5
    pool.heartbeat(large, 0)
    assert [i.executor_id for i in pool.tick({})] == [small]
    return pool, clock, factory, small, large


def test_silent_executor_is_probed_declared_dead_replaced_and_refused():
    pool, clock, factory, small, large = small_suspected()
    assert pool.tick({}) == []  # probed once
    # a member still, to finish its work, but offered nothing new
    assert [(i.executor_id, i.accepting) for i in pool.executors()] == [
        (small, False),
        (large, True),
    ]
    assert [e["suspected"] for e in pool.status()["executors"]] == [True, False]
    clock.now = 4.0
    assert pool.probed(small, answered=False, why="no answer to a ping") is True
    assert small not in [i.executor_id for i in pool.executors()]
    assert len(factory.created) == 2  # replaced at the next tick
    pool.heartbeat(large, 0)
    pool.tick({})
    assert len(factory.created) == 3 and factory.created[2].startswith("small-")
    assert pool.heartbeat(small, 1) == Heartbeat.DEAD  # a late heartbeat: it must fence itself
    assert factory.destroyed == []  # given time to exit by itself
    clock.now = 4.0 + TIMING.reap_after_s
    pool.heartbeat(large, 0)
    pool.heartbeat(factory.created[2], 0)
    pool.tick({})
    assert factory.destroyed == [small]


def test_a_suspect_that_answers_its_probe_or_heartbeats_stays_live():
    pool, clock, factory = build()
    beat_all(pool)
    small, large = factory.created
    clock.now = 3.5  # both silent: a loaded box held their heartbeats back
    assert [i.executor_id for i in pool.tick({})] == [small, large]
    clock.now = 4.0
    assert pool.probed(small, answered=True) is False  # the ping came back
    pool.heartbeat(large, 0)  # a late heartbeat arrived before the probe's answer
    assert pool.probed(large, answered=False, why="no answer to a ping") is False
    assert sorted((i.executor_id, i.accepting) for i in pool.executors()) == sorted(
        [(small, True), (large, True)]
    )
    assert [e["suspected"] for e in pool.status()["executors"]] == [False, False]
    clock.now = 6.9  # silent again, but not for 3 s since the probe's answer
    assert pool.tick({}) == []
    assert len(factory.created) == 2 and factory.destroyed == []


def test_a_suspect_whose_probe_never_comes_back_is_declared_dead():
    pool, clock, factory, small, large = small_suspected()
    clock.now = 3.5 + 3 * TIMING.heartbeat_s  # the probe's own time: not yet
    pool.heartbeat(large, 0)
    pool.tick({})
    assert small in [i.executor_id for i in pool.executors()]
    clock.now = 3.5 + 4.5 * TIMING.heartbeat_s  # the shell lost the probe: the tick decides
    pool.heartbeat(large, 0)
    pool.tick({})
    assert small not in [i.executor_id for i in pool.executors()]
    assert pool.heartbeat(small, 0) == Heartbeat.DEAD


def test_a_tier_no_node_can_host_is_reported_not_waited_on_silently():
    pool, clock, factory = build()
    small, large = factory.created
    pool.heartbeat(small, 0)
    clock.now = 11.0
    pool.heartbeat(small, 0)
    pool.tick({"large": 10})
    status = pool.status()["tiers"]["large"]
    assert "chronoray_large" in status["unplaceable"] and status["starting"] == 1
    assert len(factory.created) == 2  # no more pending executors piled on


def test_a_tier_grows_with_demand_and_shrinks_when_idle():
    pool, clock, factory = build()
    beat_all(pool)
    pool.tick({"small": 10})  # 10 tasks / 4 slots → 3, the maximum
    assert sum(i.startswith("small-") for i in factory.created) == 3
    beat_all(pool, running=1)
    told: set[str] = set()
    for step in range(1, 30):
        clock.now = float(step)
        beat_all(pool, told=told)
        pool.tick({})
    small = [e for e in pool.status()["executors"] if e["tier"] == "small"]
    assert len(small) == 1  # back to the minimum
    assert sum(d.startswith("small-") for d in factory.destroyed) == 2


def test_a_restarted_pool_adopts_its_executors():
    clock, factory = Clock(), Factory()
    pool = ExecutorPool(
        tiers=TIERS,
        factory=factory,
        timing=TIMING,
        clock=clock,
        adopted=[("small-aaaa", "h1"), ("large-bbbb", "h2"), ("gone-cccc", "h3")],
    )
    assert factory.created == [] and factory.destroyed == ["h3"]
    assert {i.executor_id for i in pool.executors()} == {"small-aaaa", "large-bbbb"}


def test_dispatcher_retries_the_attempts_of_an_executor_that_left():
    async def scenario():
        shards = FakeShardLink()
        first, second = FakeExecutor(), FakeExecutor()
        slots = dict(tier="small", tier_rank=0, slots=2)
        dispatcher = Dispatcher(
            tiers=TIERS,
            executors=[],
            shards=shards,
            max_queued=100,
            clock=ManualClock(T0),
        )
        await dispatcher.sync_members(
            [ExecutorSlots(executor_id="a", client=first, node="node-a", **slots)]
        )
        await dispatcher.submit([spec(1), spec(2)])
        assert first.received == [1, 2]
        lost = await dispatcher.sync_members(
            [ExecutorSlots(executor_id="b", client=second, **slots)]
        )
        assert [(r.task_id, r.failure, r.executor_id, r.node_id) for r in lost] == [
            (1, FailureClass.EXECUTOR_LOST, "a", "node-a"),
            (2, FailureClass.EXECUTOR_LOST, "a", "node-a"),
        ]
        await asyncio.sleep(0.05)  # outboxes flush
        assert [r.task_id for r in shards.results[0]] == [1, 2]
        # the gone executor's own result arrives late: counted, passed on (the
        # shard's attempt check ignores it)
        await dispatcher.report_results([result(spec(1))])
        assert dispatcher.late_results == 1
        # a draining executor keeps its work but gets nothing new
        await dispatcher.submit([spec(3)])
        assert second.received == [3]
        draining = ExecutorSlots(executor_id="b", client=second, accepting=False, **slots)
        await dispatcher.sync_members([draining])
        await dispatcher.submit([spec(4)])
        assert second.received == [3] and dispatcher.demand() == {"small": 2, "large": 0}

    asyncio.run(scenario())


def test_the_pool_never_mistakes_itself_for_an_executor():
    from actors.executor import EXECUTOR_PREFIX
    from actors.handles import POOL_NAME

    assert not POOL_NAME.startswith(EXECUTOR_PREFIX)


def test_a_draining_executor_is_removed_only_after_it_says_it_holds_nothing():
    pool, clock, factory = build()
    beat_all(pool)
    pool.tick({"small": 8})  # grown to two small executors
    beat_all(pool)
    extra = factory.created[2]
    clock.now = TIMING.idle_s + 1
    beat_all(pool)
    pool.tick({})  # idle for long enough: one is drained
    [drained_one] = [e for e in pool.status()["executors"] if e["state"] == "draining"]
    busy_with = 2  # attempts the dispatcher placed on it before it learned of the drain
    assert pool.heartbeat(drained_one["executor_id"], busy_with) == Heartbeat.DRAIN
    for _ in range(5):  # however long: still holding work, never removed
        clock.now += 1
        beat_all(pool)
        pool.heartbeat(drained_one["executor_id"], busy_with)
        pool.tick({})
    assert factory.destroyed == [] and extra in factory.created
    pool.heartbeat(drained_one["executor_id"], 0, drained=True)
    pool.tick({})
    assert factory.destroyed == [drained_one["executor_id"]]
    assert pool.heartbeat(drained_one["executor_id"], 0) == Heartbeat.DEAD


def test_attempts_a_draining_executor_refuses_are_placed_elsewhere():
    class Draining(FakeExecutor):
        async def run_batch(self, specs):
            raise ExecutorDraining("executor a is draining")

    async def scenario():
        retiring, other = Draining(), FakeExecutor()
        slots = dict(tier="small", tier_rank=0, slots=2)
        dispatcher = Dispatcher(
            tiers=TIERS, executors=[], shards=FakeShardLink(), max_queued=100, clock=ManualClock(T0)
        )
        await dispatcher.sync_members([ExecutorSlots(executor_id="a", client=retiring, **slots)])
        await dispatcher.submit([spec(1), spec(2)])
        assert dispatcher.stats()["executors"]["a"] == {
            "tier": "small",
            "slots": 2,
            "credits": 1,
            "running": 0,
            "accepting": False,
        }
        other_slots = ExecutorSlots(executor_id="b", client=other, **slots)
        retired = ExecutorSlots(executor_id="a", client=retiring, accepting=False, **slots)
        await dispatcher.sync_members([retired, other_slots])  # as the pool says
        assert sorted(other.received) == [1, 2]

    asyncio.run(scenario())


class Ping:
    """An executor handle's ``ping`` that answers, hangs or fails (its
    process is gone)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    def remote(self):
        async def answer():
            if self.behaviour == "hangs":
                await asyncio.sleep(60)
            if self.behaviour == "died":
                raise RuntimeError("the actor died")
            return "pong"

        return answer()


def test_the_shell_probes_a_suspect_with_a_ping_bounded_by_the_silence():
    """A ping that answers keeps the suspect; one that fails (a killed
    process) or hangs past the probe's time declares it dead."""
    from types import SimpleNamespace

    from actors.executor_pool import ExecutorPoolShell

    def probe(behaviour: str) -> bool:
        """Whether the suspect is still live after a probe that ``behaviour``s."""
        pool, clock, factory, small, large = small_suspected()
        shell = ExecutorPoolShell.__new__(ExecutorPoolShell)  # no Ray actor: its probe alone
        shell._pool = pool
        shell._settings = SimpleNamespace(pool_timing=PoolTiming(heartbeat_s=0.02, misses=3))
        suspect = SimpleNamespace(executor_id=small, handle=SimpleNamespace(ping=Ping(behaviour)))
        asyncio.run(asyncio.wait_for(shell._probe(suspect), timeout=10))
        return small in {i.executor_id for i in pool.executors()}

    assert probe("answers") is True
    assert probe("hangs") is False
    assert probe("died") is False
