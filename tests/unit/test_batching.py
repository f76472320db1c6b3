"""Group commit and the outbox: one bad item never fails the others."""

import asyncio
from datetime import datetime, timezone

import pytest

from actors.batching import GroupCommitter, Outbox
from actors.handles import ShardRouter
from scheduling.errors import Unavailable
from scheduling.models import NewTask
from scheduling.timeline import Wheel


class Refused(ValueError):
    pass


def test_one_bad_item_fails_only_its_own_caller():
    writes = []

    async def write(items):
        writes.append(list(items))
        if "poison" in items:
            raise Refused("the database refused one row")
        return [item.upper() for item in items]

    async def scenario():
        committer = GroupCommitter(write)
        answers = await asyncio.gather(
            committer.submit(["a", "b"]),
            committer.submit(["poison"]),
            committer.submit(["c"]),
            return_exceptions=True,
        )
        return answers

    good, bad, other = asyncio.run(scenario())
    assert good == ["A", "B"] and other == ["C"]
    assert isinstance(bad, Refused)
    assert ["poison"] in writes  # isolated: retried on its own


def test_an_outbox_sends_what_came_within_its_linger_in_one_call_and_the_rest_after():
    sends = []

    async def scenario():
        sent = asyncio.Queue()

        async def send(items):
            sends.append(list(items))
            sent.put_nowait(None)

        outbox = Outbox(send, linger_s=0.2)
        outbox.put(["a"])
        await asyncio.sleep(0.05)  # the linger's timer is due after this one, whatever the load
        outbox.put(["b", "c"])
        assert sends == [] and outbox.pending() == ["a", "b", "c"]
        await sent.get()
        outbox.put(["d"])
        await sent.get()
        assert outbox.pending() == []

    asyncio.run(scenario())
    assert sends == [["a", "b", "c"], ["d"]]


def test_an_outage_is_not_retried_item_by_item():
    writes = []

    async def write(items):
        writes.append(list(items))
        raise Unavailable("database unavailable")

    async def scenario():
        committer = GroupCommitter(write)
        return await asyncio.gather(
            committer.submit(["a"]), committer.submit(["b"]), return_exceptions=True
        )

    answers = asyncio.run(scenario())
    assert all(isinstance(a, Unavailable) for a in answers)
    assert len(writes) <= 2  # the batches as they came, never one call per item


if __name__ == "__main__":
    pytest.main([__file__])


class CountingRouter(ShardRouter):
    """The router with its shard calls recorded instead of sent."""

    def __init__(self, fail_with=None):
        super().__init__(wheel=Wheel(num_shards=2), namespace="test")
        self.calls: list[tuple[int, int]] = []  # (shard, items)
        self.fail_with = fail_with

    async def _call(self, shard, method, *args):
        [batch] = args
        self.calls.append((shard, len(batch)))
        await asyncio.sleep(0.01)  # a call in flight: others queue behind it
        if self.fail_with is not None:
            raise self.fail_with
        return [f"stored {new.request_id}" for new in batch]


def new_task(request_id: str, at: datetime) -> NewTask:
    return NewTask(
        owner_id=1,
        script_name="s.sh",
        execute_at=at,
        request_id=request_id,
        request_hash=request_id,
    )


def test_concurrent_submissions_to_a_shard_share_its_calls_and_keep_their_answers():
    router = CountingRouter()
    at = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)  # one range: one shard

    async def scenario():
        return await asyncio.gather(
            *(router.submit([new_task(f"r{i}", at), new_task(f"s{i}", at)]) for i in range(20))
        )

    answers = asyncio.run(scenario())
    assert answers == [[f"stored r{i}", f"stored s{i}"] for i in range(20)]
    assert len(router.calls) < 20 and sum(n for _, n in router.calls) == 40
    assert {shard for shard, _ in router.calls} == {Wheel(num_shards=2).shard_of(at)}


def test_a_failed_shared_call_fails_each_of_its_submissions():
    router = CountingRouter(fail_with=Unavailable("shard 0 did not answer"))
    at = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)

    async def scenario():
        return await asyncio.gather(
            *(router.submit([new_task(f"r{i}", at)]) for i in range(5)), return_exceptions=True
        )

    answers = asyncio.run(scenario())
    assert all(isinstance(a, Unavailable) for a in answers)
    assert sum(n for _, n in router.calls) == 5  # sent once each: no item-by-item retry
