"""Group commit and the outbox: one bad item never fails the others."""

import asyncio

import pytest

from actors.batching import GroupCommitter
from scheduling.errors import Unavailable


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
