"""The caps from kept counts (service/caps.py): the database is counted
once per refresh far from a cap, on every check near one."""

import pytest

from scheduling.errors import RateLimited
from service.caps import Caps


class Database:
    """The owner's true counts, and how often they were asked."""

    def __init__(self, active=0, live=0):
        self.active, self.live, self.asked = active, live, 0
        self.away = False

    def count(self, owner_id):
        if self.away:
            raise ConnectionError("database away")
        self.asked += 1
        return self.active, self.live


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def caps_over(db, clock, *, max_active_tasks=100, max_schedules=10):
    return Caps(
        db.count,
        max_active_tasks=max_active_tasks,
        max_schedules=max_schedules,
        refresh_s=2.0,
        monotonic=clock,
    )


def submit(caps, db, owner=1, *, tasks=0, schedules=0):
    """What the service does: the kept counts first, the database if they cannot say."""
    if not caps.admit_cached(owner, tasks=tasks, schedules=schedules):
        caps.check(owner, tasks=tasks, schedules=schedules)
    db.active += tasks  # stored
    db.live += schedules


def test_far_below_a_cap_the_database_is_counted_once_per_refresh():
    db, clock = Database(), Clock()
    caps = caps_over(db, clock)
    for _ in range(40):
        submit(caps, db, tasks=2)
    assert db.asked == 1 and db.active == 80
    clock.now += 2.5
    submit(caps, db, tasks=1)
    assert db.asked == 2


def test_near_a_cap_every_check_counts_and_the_cap_holds_exactly():
    db, clock = Database(active=90), Clock()
    caps = caps_over(db, clock)
    for _ in range(10):  # each past 90 % of the cap
        submit(caps, db, tasks=1)
    assert db.asked == 10 and db.active == 100
    with pytest.raises(RateLimited, match="100 active tasks; the cap is 100"):
        submit(caps, db, tasks=1)
    db.active = 60  # tasks finished elsewhere: a count sees it at once near the cap
    submit(caps, db, tasks=30)
    assert db.active == 90


def test_tasks_admitted_here_count_against_the_cap_between_reads():
    db, clock = Database(), Clock()
    caps = caps_over(db, clock)
    submit(caps, db, tasks=50)
    db.active = 0  # the database has not seen them (another view): the kept count has
    assert not caps.admit_cached(1, tasks=45)  # 95 > 90: near, so it counts again


def test_schedules_have_their_own_cap_and_owners_their_own_counts():
    db, clock = Database(live=10), Clock()
    caps = caps_over(db, clock)
    with pytest.raises(RateLimited, match="10 schedules; the cap is 10"):
        submit(caps, db, owner=1, schedules=1)
    submit(caps, db, owner=1, tasks=5)  # tasks are not schedules
    other = Database()
    caps_other = caps_over(other, clock)
    submit(caps_other, other, owner=2, schedules=1)
    assert other.live == 1


def test_one_caller_counts_again_when_stale_while_the_others_use_the_kept_counts():
    db, clock = Database(), Clock()
    caps = caps_over(db, clock)
    submit(caps, db, tasks=1)
    clock.now += 2.5
    assert not caps.admit_cached(1, tasks=1)  # this one counts again ...
    assert all(caps.admit_cached(1, tasks=1) for _ in range(10))  # ... the rest need not
    caps.check(1, tasks=1)
    assert db.asked == 2


def test_a_failed_count_lets_the_next_caller_count():
    db, clock = Database(), Clock()
    caps = caps_over(db, clock)
    submit(caps, db, tasks=1)
    clock.now += 2.5
    assert not caps.admit_cached(1, tasks=1)
    db.away = True
    with pytest.raises(ConnectionError):
        caps.check(1, tasks=1)
    assert not caps.admit_cached(1, tasks=1)  # stale, and nobody is counting
