"""plan_size: how many executors a tier wants, and which idle ones go."""

import pytest

from scheduling.tiers import MemberView, PoolTiming, SizePlan, plan_size, slot_tier

TIMING = PoolTiming(heartbeat_s=1.0, idle_s=60.0)
TIER = slot_tier("small", 0, executors=1, max_executors=3, slots=4)


def busy(name: str, running: int = 1) -> MemberView:
    return MemberView(executor_id=name, placed=True, running=running, idle_for_s=0.0)


def idle(
    name: str, for_s: float = 61.0, *, draining: bool = False, drained: bool = False
) -> MemberView:
    return MemberView(
        executor_id=name,
        placed=True,
        running=0,
        idle_for_s=for_s,
        draining=draining,
        drained=drained,
    )


PENDING = MemberView(executor_id="p", placed=False, running=0, idle_for_s=0.0)


@pytest.mark.parametrize(
    ("demand", "members", "unplaceable", "plan"),
    [
        (0, [], False, SizePlan(start=1)),  # the minimum, with nothing to do
        (5, [busy("a")], False, SizePlan(start=1)),  # 5 tasks, 4 slots each: 2
        (100, [busy("a")], False, SizePlan(start=2)),  # capped at the maximum, 3
        (12, [busy("a"), busy("b"), busy("c")], False, SizePlan()),  # just enough
        (9, [PENDING], True, SizePlan()),  # no node offers the tier: do not pile up
        (9, [PENDING], False, SizePlan(start=2)),  # pending but placeable: grow
        (0, [busy("a"), idle("b")], False, SizePlan(drain=("b",))),  # idle beyond the minimum
        (0, [busy("a"), idle("b", 10.0)], False, SizePlan()),  # not idle for long enough
        (0, [busy("a"), busy("b", 0)], False, SizePlan()),  # just finished: not idle yet
        (
            0,
            [busy("a"), idle("b", 61.0, draining=True, drained=True)],
            False,
            SizePlan(remove=("b",)),
        ),
        (0, [busy("a"), idle("b", 900.0, draining=True)], False, SizePlan()),  # has not said so
    ],
)
def test_plan_size(demand, members, unplaceable, plan):
    assert plan_size(TIER, demand, members, unplaceable=unplaceable, timing=TIMING) == plan


def test_an_executor_is_removed_only_once_it_said_it_holds_nothing_and_takes_nothing_new():
    """The pool's view of an executor's work is a heartbeat old, and the
    dispatcher places on it until it learns of the drain: a bench run lost
    4 attempts to an executor removed in the turn that drained it."""
    members = [busy("a"), idle("b", 200.0)]
    assert plan_size(TIER, 0, members, unplaceable=False, timing=TIMING) == SizePlan(drain=("b",))
    draining = [busy("a"), idle("b", 200.0, draining=True)]
    assert plan_size(TIER, 0, draining, unplaceable=False, timing=TIMING) == SizePlan()
    drained = [busy("a"), idle("b", 200.0, draining=True, drained=True)]
    assert plan_size(TIER, 0, drained, unplaceable=False, timing=TIMING) == SizePlan(remove=("b",))


def test_a_busy_executor_is_never_drained_to_shrink():
    members = [busy("a"), busy("b"), busy("c")]
    assert plan_size(TIER, 0, members, unplaceable=False, timing=TIMING) == SizePlan()
