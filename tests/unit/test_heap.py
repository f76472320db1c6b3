"""settle_after_start (and ``chronoray.settle_heap``, a driver's opt-in):
what start-up built is left out of the collector's walks; what start-up
threw away is collected first, not kept for ever."""

import gc
import weakref

import pytest

import chronoray
from actors.heap import YOUNG_THRESHOLD, settle_after_start


class Node:
    pass


@pytest.fixture
def collector_restored():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


SETTLERS = pytest.mark.parametrize("settle", [settle_after_start, chronoray.settle_heap])


@SETTLERS
@pytest.mark.usefixtures("collector_restored")
def test_what_start_up_built_is_frozen_and_its_garbage_is_collected(settle):
    kept = [[n] for n in range(100)]
    garbage = Node()
    garbage.itself = garbage  # a cycle: only the collector frees it
    freed = weakref.ref(garbage)
    del garbage

    settle()

    assert freed() is None
    walked = {id(o) for o in gc.get_objects()}
    assert walked.isdisjoint(id(k) for k in kept)
    assert gc.get_freeze_count() >= len(kept)


@SETTLERS
@pytest.mark.usefixtures("collector_restored")
def test_the_young_generation_is_collected_less_often_the_others_as_before(settle):
    _, middle, old = gc.get_threshold()

    settle()

    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, old)
