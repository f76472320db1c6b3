"""The garbage collector in chronoray's long-lived processes (the actors and
the Serve replicas).

A Ray worker with chronoray imported holds about 136,000 objects that live
as long as it does (modules, classes, Ray's and SQLAlchemy's state), and
each full collection walked them all: 110-140 ms with the process's one
event loop stopped, measured in an actor on this 2-core box. Frozen, they
are never walked again. The young generation is collected after 10,000
more allocations than deallocations instead of 700, so that a batch's
objects (a 1,000-task submission makes about 12 per task) are mostly freed
before a collection, rather than moved into the older generations that a
full collection walks."""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def settle_after_start() -> None:
    """Call once start-up has built what lives as long as the process:
    collect what start-up left, then freeze the rest. Also public as
    ``chronoray.settle_heap()`` for a driver that submits in bulk: a library
    must not retune its host's collector unasked, so a driver opts in (an
    object frozen here that later becomes cyclic garbage is never freed)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
