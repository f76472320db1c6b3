"""The plain Executor: holds an early hand-over until the due instant,
caches scripts by hash, reports results in batches."""

import asyncio
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from actors.executor import Executor, ExecutorFenced, InstantReleases, ScriptCache
from scheduling.models import FailureClass
from tests.unit.fakes import held_runs, processes_with
from tests.unit.test_pure_scheduling import spec


class Scripts:
    def __init__(self):
        self.fetched = []

    def get_script_body(self, script_id):
        self.fetched.append(script_id)
        return {1: b"echo hello $NAME", 2: b"exit 4"}[script_id]


class Sink:
    """The dispatcher's side: acknowledges (returns) once "committed"."""

    def __init__(self):
        self.results = []
        self.refuse = 0  # refuse this many sends first (a restarting dispatcher)

    async def report_results(self, results):
        if self.refuse:
            self.refuse -= 1
            raise ConnectionError("dispatcher restarting")
        self.results.extend(results)


def new_executor(tmp_path, scripts, sink, gate, *, slots=1, **options):
    return Executor(
        executor_id="e",
        tier="small",
        slots=slots,
        scripts=ScriptCache(scripts, tmp_path / "cache"),
        sink=sink,
        gate=gate,
        **options,
    )


class Gate:
    """The start gate over a set of attempts someone else already owns."""

    def __init__(self, owned_elsewhere=()):
        self.owned_elsewhere = set(owned_elsewhere)
        self.asked = []

    async def start(self, spec):
        self.asked.append(spec.key)
        return spec.key not in self.owned_elsewhere


def test_runs_at_the_due_instant_and_reports(tmp_path):
    scripts, sink = Scripts(), Sink()

    async def scenario():
        executor = Executor(
            executor_id="small-0",
            tier="small",
            slots=2,
            scripts=ScriptCache(scripts, tmp_path),
            sink=sink,
            gate=Gate(),
            node_id="node",
        )
        due = datetime.now(timezone.utc) + timedelta(seconds=0.3)
        ok = replace(spec(1, due=due), variables={"NAME": "world"}, script_sha256="a" * 64)
        bad = replace(spec(2, due=due), script_id=2, script_sha256="b" * 64)
        again = replace(spec(3, due=due), variables={"NAME": "again"}, script_sha256="a" * 64)
        assert await executor.run_batch([ok, bad, again]) == 3
        assert await executor.run_batch([ok]) == 0  # replayed call
        for _ in range(100):
            if len(sink.results) == 3:
                break
            await asyncio.sleep(0.05)
        by_id = {r.task_id: r for r in sink.results}
        assert by_id[1].output_tail == "hello world\n" and by_id[1].failure is None
        assert by_id[3].output_tail == "hello again\n"
        assert by_id[2].failure is FailureClass.EXIT_CODE and by_id[2].exit_code == 4
        for r in sink.results:
            assert r.started_at >= due  # held until the instant
            assert (r.executor_id, r.tier, r.node_id) == ("small-0", "small", "node")
        assert sorted(scripts.fetched) == [1, 2]  # cached by content hash
        assert await executor.running() == []

    asyncio.run(scenario())


def test_cancel_kills_the_running_script_and_reports_nothing(tmp_path):
    class Slow(Scripts):
        def get_script_body(self, script_id):
            return f"echo started > {tmp_path}/started; sleep 60".encode()

    sink = Sink()

    async def scenario():
        executor = Executor(
            executor_id="e",
            tier="small",
            slots=1,
            scripts=ScriptCache(Slow(), tmp_path / "cache"),
            sink=sink,
            gate=Gate(),
        )
        job = replace(spec(7), script_sha256="c" * 64, variables={"MARK": "cancel-check"})
        await executor.run_batch([job])
        for _ in range(100):
            if (tmp_path / "started").exists():
                break
            await asyncio.sleep(0.05)
        assert processes_with("MARK=cancel-check")
        assert await executor.cancel([(7, 1)]) == 1
        for _ in range(100):
            if not processes_with("MARK=cancel-check"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the cancelled script still runs")
        await asyncio.sleep(0.1)
        assert sink.results == [] and await executor.running() == []

    asyncio.run(scenario())


def test_losing_contact_fences_the_executor_and_kills_its_scripts(tmp_path):
    class Slow(Scripts):
        def get_script_body(self, script_id):
            return b"sleep 60"

    sink = Sink()

    async def scenario():
        executor = Executor(
            executor_id="e",
            tier="small",
            slots=2,
            scripts=ScriptCache(Slow(), tmp_path / "cache"),
            sink=sink,
            gate=Gate(),
        )
        jobs = [
            replace(spec(i), script_sha256="d" * 64, variables={"MARK": "fence"}) for i in (1, 2)
        ]
        await executor.run_batch(jobs)
        for _ in range(100):
            if len(processes_with("MARK=fence")) >= 2:
                break
            await asyncio.sleep(0.05)
        assert executor.lose_contact("test") == 2
        with pytest.raises(ExecutorFenced):
            await executor.run_batch([replace(jobs[0], task_id=3)])
        for _ in range(100):
            if len(sink.results) == 2:
                break
            await asyncio.sleep(0.05)
        assert not processes_with("MARK=fence")
        # reported as lost: the shard retries them unless already retried
        assert {(r.task_id, r.failure) for r in sink.results} == {
            (1, FailureClass.EXECUTOR_LOST),
            (2, FailureClass.EXECUTOR_LOST),
        }
        executor.regain_contact()
        assert await executor.run_batch([replace(jobs[0], task_id=4, script_sha256="e" * 64)]) == 1

    asyncio.run(scenario())


def test_an_attempt_refused_at_the_start_gate_never_starts(tmp_path):
    """Defect 4: a spec handed over twice (a requeue after a send timeout,
    a restarted dispatcher) starts only where its start gate committed."""
    ledger = tmp_path / "ledger"
    ledger.touch()
    ledger.chmod(0o666)

    class Ledger(Scripts):
        def get_script_body(self, script_id):
            return f"echo $CHRONORAY_TASK_ID >> {ledger}".encode()

    sink, gate = Sink(), Gate(owned_elsewhere={(2, 1)})

    async def scenario():
        executor = Executor(
            executor_id="e",
            tier="small",
            slots=2,
            scripts=ScriptCache(Ledger(), tmp_path / "cache"),
            sink=sink,
            gate=gate,
            prespawn=True,  # the refused one's sandbox is built before its gate
        )
        mine, theirs = (replace(spec(i), script_sha256="f" * 64) for i in (1, 2))
        await executor.run_batch([mine, theirs])
        for _ in range(100):
            if sink.results and not await executor.running():
                break
            await asyncio.sleep(0.05)
        assert sorted(gate.asked) == [(1, 1), (2, 1)]
        assert ledger.read_text().split() == ["1"]
        assert [r.task_id for r in sink.results] == [1]  # nothing to say about the other
        assert executor.refused_at_gate == 1
        assert executor.discarded_held == 1  # its sandbox was built, and ended unrun

    asyncio.run(scenario())


def test_a_result_is_held_and_resent_until_acknowledged(tmp_path):
    """Defect 2: a result is forgotten only after the shard committed it."""
    sink = Sink()
    sink.refuse = 2

    async def scenario():
        executor = new_executor(tmp_path, Scripts(), sink, Gate(), slots=1, retry_s=0.05)
        job = replace(spec(1), script_sha256="a" * 64)
        await executor.run_batch([job])
        for _ in range(100):
            if not await executor.running():
                break
            await asyncio.sleep(0.02)
        if not sink.results:
            assert await executor.holding() == [job.key]  # finished, not yet acknowledged
        for _ in range(100):
            if sink.results:
                break
            await asyncio.sleep(0.02)
        assert [r.key for r in sink.results] == [job.key]
        assert await executor.holding() == []

    asyncio.run(scenario())


def test_a_database_outage_at_the_gate_is_waited_out_not_charged(tmp_path):
    """Defect 6: an outage before the start is no failure of the task."""
    from scheduling.errors import Unavailable

    class FlakyGate(Gate):
        def __init__(self):
            super().__init__()
            self.outage = 3

        async def start(self, spec):
            if self.outage:
                self.outage -= 1
                raise Unavailable("database unavailable")
            return await super().start(spec)

    sink, gate = Sink(), FlakyGate()

    async def scenario():
        executor = new_executor(tmp_path, Scripts(), sink, gate, slots=1, retry_s=0.05)
        await executor.run_batch([replace(spec(1), script_sha256="a" * 64)])
        for _ in range(100):
            if sink.results:
                break
            await asyncio.sleep(0.05)
        [result] = sink.results
        assert result.failure is None and gate.outage == 0

    asyncio.run(scenario())


def test_attempts_beyond_its_slots_wait_and_start_as_slots_free(tmp_path):
    """The credit window's executor side: four attempts held, two slots; the
    third and fourth start only when a run ends, each after its own gate."""

    class Stamps(Scripts):
        def get_script_body(self, script_id):
            return b"date +%s.%N; sleep 0.3; date +%s.%N"

    class Counted(Sink):
        async def report_results(self, results):
            await super().report_results(results)
            if len(self.results) == 4:
                self.all_in.set()

    sink, gate = Counted(), Gate()

    async def scenario():
        sink.all_in = asyncio.Event()
        executor = new_executor(tmp_path, Stamps(), sink, gate, slots=2)
        due = datetime.now(timezone.utc)
        specs = [replace(spec(i, due=due), script_sha256="c" * 64) for i in range(1, 5)]
        assert await executor.run_batch(specs) == 4
        assert executor.busy == 4  # all held, two of them waiting for a slot
        await sink.all_in.wait()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    spans = sorted(tuple(map(float, r.output_tail.split())) for r in sink.results)
    for moment in (start for start, _ in spans):  # never more than 2 scripts at once
        assert sum(1 for start, end in spans if start <= moment < end) <= 2
    assert spans[2][0] >= min(end for _, end in spans[:2])  # the third waited for a slot
    assert sorted(task_id for task_id, _ in gate.asked) == [1, 2, 3, 4]


@pytest.mark.parametrize("ending", ["cancel", "fence"])
def test_a_held_run_ended_before_its_instant_is_killed_without_running(tmp_path, ending):
    """Pre-spawn: an attempt handed over early has its launcher started and
    held at once; cancelled or fenced before its instant, that launcher
    ends and the script never runs."""
    ledger = tmp_path / "ledger"

    class Ledger(Scripts):
        def get_script_body(self, script_id):
            return f"echo $CHRONORAY_TASK_ID >> {ledger}".encode()

    sink, gate = Sink(), Gate()
    marker = f"MARK=held-{ending}"

    async def scenario():
        executor = new_executor(tmp_path, Ledger(), sink, gate, prespawn=True)
        lead_s = 30 if ending == "cancel" else 1.5  # fenced: ends at its gate's time
        due = datetime.now(timezone.utc) + timedelta(seconds=lead_s)
        job = replace(spec(5, due=due), script_sha256="9" * 64, variables={"MARK": marker[5:]})
        await executor.run_batch([job])
        for _ in range(200):  # the launcher is up long before the instant
            if held_runs():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no held launcher")
        if ending == "cancel":
            assert await executor.cancel([job.key]) == 1
        else:  # its gate is never asked: it is reported lost before its start
            executor.lose_contact("test")
        for _ in range(200):
            if (
                not held_runs()
                and not processes_with(marker)
                and not await executor.running()
                and not await executor.holding()
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the held launcher outlived its attempt")
        assert not ledger.exists() and gate.asked == []
        assert executor.discarded_held == 1
        if ending == "cancel":
            assert sink.results == []
        else:
            [lost] = sink.results
            assert (lost.failure, lost.started_at) == (FailureClass.EXECUTOR_LOST, None)

    asyncio.run(scenario())


def test_the_wait_for_the_instant_ends_by_the_wall_clock_never_before(tmp_path):
    """asyncio sleeps on the monotonic clock; a wall clock running behind
    it (here at 80 % of its pace) must not see a script start early: the
    executor sleeps again for what its clock says is left."""

    class SlowWallClock:
        def __init__(self):
            self.began = datetime.now(timezone.utc)
            self.monotonic = asyncio.get_running_loop().time()

        def now(self):
            elapsed = asyncio.get_running_loop().time() - self.monotonic
            return self.began + timedelta(seconds=0.8 * elapsed)

    async def scenario():
        clock = SlowWallClock()
        executor = new_executor(tmp_path, Scripts(), Sink(), Gate(), clock=clock)
        instant = clock.now() + timedelta(seconds=0.5)
        await executor._sleep_until(instant.timestamp())
        return clock.now() - instant

    assert asyncio.run(scenario()) >= timedelta(0)


class Report(Sink):
    """A sink that says when the first result arrived."""

    def __init__(self):
        super().__init__()
        self.arrived = asyncio.Event()

    async def report_results(self, results):
        await super().report_results(results)
        self.arrived.set()


def never_started(tmp_path, sink, gate, *, due_in_s=0.0, fence=False, **options):
    """Run one attempt of a script that appends to a ledger; returns the
    ledger's path once its result arrived (or raises after 20 s)."""
    ledger = tmp_path / "ledger"

    class Ledger(Scripts):
        def get_script_body(self, script_id):
            return f"echo $CHRONORAY_TASK_ID >> {ledger}".encode()

    async def scenario():
        executor = new_executor(tmp_path, Ledger(), sink, gate, **options)
        due = datetime.now(timezone.utc) + timedelta(seconds=due_in_s)
        await executor.run_batch([replace(spec(8, due=due), script_sha256="8" * 64)])
        if fence:
            executor.lose_contact("test")
        await sink.arrived.wait()
        assert await executor.running() == []

    asyncio.run(asyncio.wait_for(scenario(), timeout=20))
    return ledger


def test_an_attempt_fenced_before_its_gate_is_reported_lost_not_left_queued(tmp_path):
    """Given up before its start, an attempt is reported lost at once (a
    loss before the start costs no attempt), so its task is offered again
    now rather than when its queue lease runs out ten minutes later."""
    sink, gate = Report(), Gate()
    ledger = never_started(tmp_path, sink, gate, due_in_s=1.0, fence=True)
    [lost] = sink.results
    assert (lost.failure, lost.started_at, lost.key) == (FailureClass.EXECUTOR_LOST, None, (8, 1))
    assert "lost contact with its pool" in lost.output_tail
    assert gate.asked == [] and not ledger.exists()


def test_a_database_outage_past_patience_at_the_gate_reports_the_attempt_lost(tmp_path):
    from scheduling.errors import Unavailable

    class DownGate(Gate):
        async def start(self, spec):
            self.asked.append(spec.key)
            raise Unavailable("database unavailable")

    sink, gate = Report(), DownGate()
    ledger = never_started(tmp_path, sink, gate, patience_s=0.2, retry_s=0.05)
    [lost] = sink.results
    assert (lost.failure, lost.started_at) == (FailureClass.EXECUTOR_LOST, None)
    assert "start gate" in lost.output_tail
    assert len(gate.asked) > 1 and not ledger.exists()  # retried, then given up


def test_a_fault_of_the_executor_reports_the_attempt_lost(tmp_path, monkeypatch):
    """An exception out of the executor's own steps (here: its sandbox could
    not be built) ends the attempt with a result naming it, never silently:
    a loss, as the orphan recovery would report it, not the script's failure."""
    from actors import executor as executor_module

    def no_sandbox(self, *, hold=True):
        raise OSError("all 4096 sandbox uids are in use")

    monkeypatch.setattr(executor_module.ScriptRun, "prepare", no_sandbox)
    sink, gate = Report(), Gate()
    ledger = never_started(tmp_path, sink, gate)
    [failed] = sink.results
    assert failed.failure is FailureClass.EXECUTOR_LOST and failed.started_at is None
    assert "sandbox uids are in use" in failed.output_tail
    assert not ledger.exists()


def test_a_draining_executor_takes_nothing_new_and_is_drained_once_it_holds_nothing(tmp_path):
    """The pool removes an executor only once it said it is drained: while
    it holds an attempt (running, or its result unacknowledged) it is not."""
    from actors.executor import ExecutorDraining

    sink = Report()

    async def scenario():
        executor = new_executor(tmp_path, Scripts(), sink, Gate(), slots=1)
        job = replace(spec(1), script_sha256="a" * 64)
        await executor.run_batch([job])
        executor.draining = True  # the pool's heartbeat answer said DRAIN
        assert not executor.drained  # its attempt is still here
        with pytest.raises(ExecutorDraining):
            await executor.run_batch([replace(job, task_id=2)])
        await sink.arrived.wait()
        for _ in range(100):  # the outbox forgets the result once acknowledged
            if executor.drained:
                break
            await asyncio.sleep(0.02)
        assert executor.drained and [r.task_id for r in sink.results] == [1]

    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


def test_the_executor_follows_the_pools_answers_to_its_heartbeats(tmp_path):
    """DRAIN: it takes nothing new and says it is drained once it holds
    nothing; LIVE again (a restarted pool knows of no drain): it takes work."""
    from actors.executor import ExecutorShell, Heartbeat
    from scheduling.tiers import PoolTiming

    class Pool:
        """The pool actor's handle, as the shell calls it."""

        def __init__(self, replies):
            self.replies = list(replies)
            self.beats = []  # (draining when answered, drained as sent)
            self.done = asyncio.Event()

        @property
        def heartbeat(self):
            return self

        def remote(self, executor_id, running, node, drained):
            answered = asyncio.get_running_loop().create_future()
            reply = self.replies.pop(0)
            self.beats.append((shell._executor.draining, drained))
            answered.set_result(reply)
            if not self.replies:
                self.done.set()
            return answered

    shell = ExecutorShell.__new__(ExecutorShell)  # no Ray actor: its heartbeat loop alone

    async def scenario():
        shell._executor = new_executor(tmp_path, Scripts(), Sink(), Gate())
        shell._pool = Pool([Heartbeat.LIVE, Heartbeat.DRAIN, Heartbeat.DRAIN, Heartbeat.LIVE])
        shell._timing = PoolTiming(heartbeat_s=0.01)
        shell._node_id, shell._mirror = "node", None
        beating = asyncio.ensure_future(shell._heartbeat_forever())
        await shell._pool.done.wait()
        await asyncio.sleep(0.03)  # the last answer is taken in
        beating.cancel()
        return shell._executor.draining

    assert asyncio.run(asyncio.wait_for(scenario(), timeout=10)) is False
    # not draining, not draining, then drained (nothing held), then drained again
    assert shell._pool.beats == [(False, False), (False, False), (True, True), (True, True)]


class FakeRun:
    """A run that records who released it, and when."""

    def __init__(self, log, name, fails=False):
        self.log, self.name, self.fails = log, name, fails

    def release(self, on_start=None):
        if self.fails:
            raise OSError("no fork")
        self.log.append((self.name, asyncio.current_task(), time.time()))
        on_start(len(self.log))


async def sleep_until(at):
    await asyncio.sleep(max(0.0, at - time.time()) + 0.002)  # a margin for the monotonic clock


def test_runs_due_at_one_instant_are_released_together_and_never_early():
    """One timer releases every run of an instant in one loop (not one
    coroutine each, interleaved with the ends of scripts already started);
    a cancelled attempt's run is skipped, a failed release is its own
    attempt's error, a fenced executor releases nothing."""

    async def scenario(fenced):
        log, started = [], []
        releases = InstantReleases(sleep_until, lambda: fenced)
        at = time.time() + 0.2
        runs = [FakeRun(log, n, fails=n == "bad") for n in ("a", "b", "bad", "cancelled", "c")]
        waiters = [
            asyncio.ensure_future(releases.release(run, at=at, on_start=started.append))
            for run in runs
        ]
        later = asyncio.ensure_future(
            releases.release(FakeRun(log, "later"), at=at + 0.1, on_start=started.append)
        )
        await asyncio.sleep(0.05)
        waiters[3].cancel()
        outcomes = await asyncio.gather(*waiters, later, return_exceptions=True)
        return log, started, outcomes, at

    log, started, outcomes, at = asyncio.run(scenario(fenced=False))
    assert [name for name, _, _ in log] == ["a", "b", "c", "later"]
    together = {task for name, task, _ in log if name != "later"}
    assert len(together) == 1 and log[-1][1] not in together  # one timer per instant
    assert started == [1, 2, 3, 4]
    assert outcomes[:2] == [True, True] and outcomes[4:] == [True, True]
    assert isinstance(outcomes[2], OSError) and isinstance(outcomes[3], asyncio.CancelledError)
    assert all(when >= at for _, _, when in log) and log[-1][2] >= at + 0.1

    log, started, outcomes, _ = asyncio.run(scenario(fenced=True))
    assert log == [] and started == []
    assert outcomes[:3] == [False, False, False] and outcomes[4:] == [False, False]
