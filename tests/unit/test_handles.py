"""Looking actors up from an event loop: the lookup (a GCS call that blocks
while the GCS is down) never holds the loop, and one lookup at a time runs
however many callers wait for it."""

import asyncio
import re
import threading

import pytest
from ray.exceptions import ActorDiedError, RayActorError

import actors.handles as handles
from actors.handles import ActorLookup, DispatcherResults
from scheduling.errors import InvalidInput, Unavailable


class BlockingLookup:
    """Stands in for ray.get_actor while the GCS is down: blocks its thread
    until ``answer`` is set, then returns it (or raises it)."""

    def __init__(self) -> None:
        self.calls = 0
        self.answer: object = None
        self._go = threading.Event()

    def __call__(self):
        self.calls += 1
        self._go.wait(timeout=30)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def back(self, answer: object) -> None:
        self.answer = answer
        self._go.set()


async def ticks_while(awaitable, *, tick_s: float = 0.01) -> tuple[object, int]:
    """Await ``awaitable`` while counting ticks of a timer on the same loop."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(tick_s)
            ticks += 1

    counting = asyncio.ensure_future(ticker())
    try:
        try:
            return await awaitable, ticks
        except Exception as exc:
            return exc, ticks
    finally:
        counting.cancel()


def test_a_lookup_that_blocks_leaves_the_loop_running_and_runs_once():
    lookup = BlockingLookup()
    actor = ActorLookup(lookup, what="the dispatcher", timeout_s=0.3)

    async def scenario():
        first, ticks = await ticks_while(
            asyncio.gather(actor.get(), actor.get(), return_exceptions=True)
        )
        assert all(isinstance(e, Unavailable) for e in first), first
        assert "the dispatcher not found within 0.3 s" in str(first[0])
        assert ticks >= 10  # the loop turned while the lookup blocked
        again, _ = await ticks_while(actor.get())
        assert isinstance(again, Unavailable)
        assert lookup.calls == 1  # still the first lookup: no thread per wait
        lookup.back("handle")
        assert await actor.get() == "handle"
        assert await actor.get() == "handle"
        assert lookup.calls == 1  # kept once found
        actor.forget()
        lookup.answer = "handle after a redeploy"
        assert await actor.get() == "handle after a redeploy"
        assert lookup.calls == 2

    asyncio.run(scenario())


def test_a_failed_lookup_is_raised_and_the_next_get_looks_again():
    lookup = BlockingLookup()
    lookup.back(ValueError("Failed to look up actor with name 'chronoray-dispatcher'"))
    actor = ActorLookup(lookup, what="the dispatcher", timeout_s=1.0)

    async def scenario():
        with pytest.raises(ValueError, match="Failed to look up"):
            await actor.get()
        lookup.answer = "handle"
        assert await actor.get() == "handle"
        assert lookup.calls == 2

    asyncio.run(scenario())


def test_a_lookup_pending_on_a_loop_that_stopped_does_not_hold_the_next_loop():
    lookup = BlockingLookup()
    actor = ActorLookup(lookup, what="shard 0", timeout_s=0.1)

    async def gives_up():
        with pytest.raises(Unavailable):
            await actor.get()

    async def finds():
        return await actor.get()

    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(gives_up())  # stops with its lookup pending
        lookup.back("handle")  # the lookup's answer can never land on the stopped loop
        assert asyncio.run(finds()) == "handle"
        assert lookup.calls == 2
    finally:
        first.close()


class FakeDispatcher:
    """A dispatcher handle that answers report_results at once."""

    def __init__(self) -> None:
        self.reports: list = []

    @property
    def report_results(self):
        outer = self

        class Method:
            @staticmethod
            def remote(results, committed):
                outer.reports.append((results, committed))
                future = asyncio.get_running_loop().create_future()
                future.set_result(None)
                return future

        return Method()


def test_a_report_whose_dispatcher_lookup_blocks_fails_in_bounded_time_and_goes_through_later(
    monkeypatch,
):
    """An executor's results go out after a failed report: its loop, which
    releases held runs at their instants, must not wait on the GCS."""
    lookup = BlockingLookup()
    monkeypatch.setattr(handles, "dispatcher_handle", lambda namespace: lookup())
    sink = DispatcherResults("chronoray-test")

    async def scenario():
        failed, ticks = await ticks_while(sink.report_results([], None))
        assert isinstance(failed, Unavailable), failed  # after PROBE_TIMEOUT_S
        assert ticks >= 50
        dispatcher = FakeDispatcher()
        lookup.back(dispatcher)
        await sink.report_results([], None)
        assert dispatcher.reports == [([], None)]
        assert lookup.calls == 1

    asyncio.run(scenario())


class Handle:
    """An actor handle whose every method answers ``answer``, or raises it
    (a removed actor's handle: RayActorError)."""

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def __getattr__(self, method: str):
        answer = self.answer

        class Method:
            @staticmethod
            def remote(*args):
                future = asyncio.get_running_loop().create_future()
                if isinstance(answer, Exception):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
                return future

        return Method()


def test_a_probe_after_a_redeploy_finds_the_new_actor_at_once():
    """The kept handle died with the actor it named; the first probe after
    the actor was deployed anew answers from the new one, not 'down'."""
    handles_in_turn = iter([Handle(RayActorError()), Handle("the new incarnation")])
    lookups = []

    def lookup():
        lookups.append(1)
        return next(handles_in_turn)

    actor = ActorLookup(lookup, what="the dispatcher")

    async def scenario():
        assert await handles._ask(actor, "hello") == "the new incarnation"
        assert await handles._ask(actor, "hello") == "the new incarnation"

    asyncio.run(scenario())
    assert len(lookups) == 2  # looked up again once, then kept


def test_a_probe_of_an_actor_that_stays_dead_raises_after_one_new_lookup():
    lookups = []

    def lookup():
        lookups.append(1)
        return Handle(RayActorError())

    actor = ActorLookup(lookup, what="the dispatcher")
    with pytest.raises(RayActorError):
        asyncio.run(handles._ask(actor, "hello"))
    assert len(lookups) == 2


@pytest.fixture
def shard_lookups(monkeypatch):
    """call_shard's kept lookups, emptied for the test and after it."""
    monkeypatch.setattr(handles, "_shard_lookups", {})
    return handles._shard_lookups


def shard_answering(shard_lookups, *answers: object) -> list[int]:
    """Shard 0 of namespace "ns", looked up anew for each of ``answers``."""
    lookups: list[int] = []
    in_turn = iter(answers)

    def lookup():
        lookups.append(1)
        answer = next(in_turn)
        if type(answer) is ValueError:  # ray.get_actor: no such actor
            raise answer
        return Handle(answer)

    shard_lookups[(0, "ns")] = ActorLookup(lookup, what="shard 0")
    return lookups


@pytest.mark.parametrize(
    "answers, why",
    [
        ((RayActorError(), RayActorError()), "shard 0 is down (RayActorError): submit"),
        ((ActorDiedError(), ValueError("no actor")), "shard 0 is not registered: submit"),
        ((ValueError("no actor"),), "shard 0 is not registered: submit"),
    ],
)
def test_a_shard_dead_or_not_registered_is_unavailable_to_its_callers(shard_lookups, answers, why):
    """The API maps Unavailable to 503; a raw RayActorError or ValueError
    was an unmapped error, a 500, while a shard restarted."""
    lookups = shard_answering(shard_lookups, *answers)
    with pytest.raises(Unavailable, match=re.escape(why)):
        asyncio.run(handles.call_shard(0, "ns", "submit", []))
    assert len(lookups) == len(answers)  # a dead handle is looked up again once


def test_what_the_shard_itself_raised_reaches_its_caller_as_it_is(shard_lookups):
    """A shard's own refusal (an InvalidInput is also a ValueError) is not
    taken for a missing shard."""
    shard_answering(shard_lookups, InvalidInput("must be at most 9", "priority"))
    with pytest.raises(InvalidInput, match="must be at most 9"):
        asyncio.run(handles.call_shard(0, "ns", "submit", []))
