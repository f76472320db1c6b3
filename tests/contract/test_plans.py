"""Writes that find their tasks by key probe the primary key, whatever the
planner's statistics believe. A burst moves thousands of tasks between
statuses faster than statistics follow; a status index chosen from a stale
estimate of "hardly any queued" scanned every queued task for each 5-row
start gate or result write."""

from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import event, text

from scheduling.models import FailureClass
from tests.conftest import T0
from tests.contract.test_repository import POLICY, new, owner_in, result, submit

pytestmark = pytest.mark.postgres

LEASE = T0 + timedelta(seconds=30)


@pytest.fixture
def owner(postgres_repo):
    return owner_in(postgres_repo)


@contextmanager
def updates_of_tasks(engine):
    """The UPDATE statements on tasks sent meanwhile (alone or in a WITH),
    with their parameters."""
    sent = []

    def capture(_conn, _cursor, statement, parameters, _context, _executemany):
        head = statement.lstrip().upper()
        if head.startswith("UPDATE TASKS") or (head.startswith("WITH") and "UPDATE TASKS" in head):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", capture)


def plan_of(engine, statement, parameters):
    with engine.connect() as conn:
        return "\n".join(conn.exec_driver_sql("EXPLAIN " + statement, parameters).scalars())


def analyze(engine):
    with engine.begin() as conn:
        conn.execute(text("ANALYZE tasks"))


def assert_keyed(engine, sent):
    assert sent, "no UPDATE of tasks was sent"
    for statement, parameters in sent:
        plan = plan_of(engine, statement, parameters)
        assert "tasks_pkey" in plan, plan
        assert "ix_tasks_status" not in plan, plan


def test_claim_gate_and_result_probe_the_primary_key_under_stale_statistics(postgres_repo, owner):
    repo, engine = postgres_repo, postgres_repo.engine
    first = submit(repo, *[new(owner) for _ in range(2000)])
    analyze(engine)  # the statistics: every task scheduled, none queued or running
    epoch = repo.start_shard(0, now=T0)
    specs = repo.claim(
        [t.task_id for t in first], shard=0, epoch=epoch, lease_until=LEASE, now=T0
    ).specs
    assert len(specs) == 2000

    with updates_of_tasks(engine) as gate:
        assert len(repo.mark_running(specs[:10], lease_grace_s=5, now=T0)) == 10
    assert_keyed(engine, gate)

    with updates_of_tasks(engine) as results:
        successes = [result(s) for s in specs[:5]]
        failures = [result(s, failure=FailureClass.EXIT_CODE) for s in specs[5:10]]
        retried = repo.record_results(successes + failures, policy=POLICY, now=T0)
    assert sorted(task_id for task_id, _ in retried) == sorted(s.task_id for s in specs[5:10])
    assert len(results) == 2  # the successes' write and the failures'
    assert_keyed(engine, results)

    analyze(engine)  # now: none scheduled
    second = submit(repo, *[new(owner) for _ in range(2000)])
    with updates_of_tasks(engine) as claim:
        claimed = repo.claim(
            [t.task_id for t in second[:5]], shard=0, epoch=epoch, lease_until=LEASE, now=T0
        ).specs
    assert len(claimed) == 5
    assert_keyed(engine, claim)
