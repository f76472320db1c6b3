"""The executor: runs scripts in its slots, each only after its start gate
committed, commits their results itself and keeps them until the dispatcher
and shards took them in, and fences itself on positive evidence of its
death. ExecutorShell is its Ray actor."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import ray

from actors.batching import Outbox
from actors.handles import DispatcherResults
from actors.heap import settle_after_start
from actors.network import RAY_FIXED_PORTS, ControlPlane, control_plane
from actors.results import CommitThenReport, ResultRecorder
from actors.sandbox import (
    SandboxLimits,
    ScriptRun,
    cgroup_support,
    detect_isolation,
    kill_group,
    prepare_network,
)
from scheduling.clock import Clock, SystemClock, to_epoch
from scheduling.errors import Unavailable
from scheduling.lifecycle import classify
from scheduling.models import FailureClass, Interpreter, RunResult, TaskSpec
from scheduling.tiers import Tier

log = logging.getLogger(__name__)

FENCED = "the executor lost contact with its pool and killed the script"
NOT_STARTED = "not started here: {why}; offered again"


class ExecutorFenced(RuntimeError):
    """Refused work: this executor lost contact with its pool."""


class ExecutorDraining(RuntimeError):
    """Refused work: the pool is retiring this executor (the dispatcher
    places the attempts elsewhere)."""


class Heartbeat(str, Enum):
    """The pool's answer to a heartbeat."""

    LIVE = "live"
    DRAIN = "drain"  # take nothing new; say when nothing is held, then go
    DEAD = "dead"  # declared dead: fence, and exit


class ScriptSource(Protocol):
    def get_script_body(self, script_id: int) -> bytes: ...


class ResultSink(Protocol):
    async def report_results(self, results: list[RunResult]) -> None:
        """Returns once these results are committed and the dispatcher and
        shards took them in; raises to have them sent again."""


class StartGate(Protocol):
    async def start(self, spec: TaskSpec) -> bool:
        """Commit queued → running for exactly this attempt; False when the
        attempt belongs to someone else (its script must not start).
        Raises Unavailable when the database cannot say."""


class ScriptCache:
    """Script files on local disk named by content hash, written once."""

    def __init__(self, source: ScriptSource, directory: Path) -> None:
        self._source = source
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)  # scripts run as an unprivileged user

    async def path_for(self, spec: TaskSpec) -> Path:
        path = self._directory / spec.script_sha256
        if not path.exists():
            body = await asyncio.to_thread(self._source.get_script_body, spec.script_id)
            partial = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            partial.write_bytes(body)
            partial.chmod(0o555)
            os.replace(partial, path)
        return path


class InstantReleases:
    """Runs due at one instant are released together: one timer per instant
    starts them all in one loop, before the event loop handles anything
    else. Released by each attempt's own coroutine, the releases of one
    instant interleaved with the ends and results of the scripts released
    first (a minute's 300 fires: p50 / p99 39.8 / 101.6 ms against 33.1 /
    79.9 ms, see the README)."""

    def __init__(
        self, sleep_until: Callable[[float], Awaitable[None]], fenced: Callable[[], bool]
    ) -> None:
        self._sleep_until = sleep_until
        self._fenced = fenced
        self._due: dict[float, list[tuple[ScriptRun, Callable[[int], None], asyncio.Future]]] = {}
        self._timers: set[asyncio.Task] = set()

    async def release(self, run: ScriptRun, *, at: float, on_start: Callable[[int], None]) -> bool:
        """Release ``run`` at ``at`` (epoch seconds, never before) with every
        run due then; False, and not released, if the executor was fenced
        by then."""
        waiting = self._due.get(at)
        if waiting is None:
            waiting = self._due[at] = []
            timer = asyncio.ensure_future(self._release_all(at))
            self._timers.add(timer)  # the loop keeps only a weak reference
            timer.add_done_callback(self._timers.discard)
        released: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiting.append((run, on_start, released))
        return await released

    async def _release_all(self, at: float) -> None:
        try:
            await self._sleep_until(at)
        except BaseException:
            for _, _, released in self._due.pop(at, []):
                released.cancel()
            raise
        fenced = self._fenced()
        due = self._due.pop(at)
        for run, on_start, released in due:
            if released.done():  # its attempt was cancelled meanwhile
                continue
            try:
                if not fenced:
                    run.release(on_start=on_start)
            except Exception as exc:
                released.set_exception(exc)
            else:
                released.set_result(not fenced)


class Executor:
    """Runs handed-over attempts, each at its due instant, at most ``slots``
    at once. An attempt's script starts only after its start gate committed
    (so no attempt starts twice, whoever else was handed it), and its
    result is kept and resent until its sink took it (committed, and the
    dispatcher and shards told)."""

    def __init__(
        self,
        *,
        executor_id: str,
        tier: str,
        slots: int,
        scripts: ScriptCache,
        sink: ResultSink,
        gate: StartGate,
        clock: Clock | None = None,
        node_id: str = "",
        limits: SandboxLimits = SandboxLimits(),
        gate_lead_s: float = 0.05,
        prespawn: bool = False,
        patience_s: float = 60.0,
        retry_s: float = 0.5,
        results_linger_s: float = 0.0,
    ) -> None:
        self.executor_id = executor_id
        self.tier = tier
        self.slots = slots
        self._scripts = scripts
        self._gate = gate
        self._clock = clock or SystemClock()
        self._limits = limits
        # The gate commits this long before the due instant, so its write is
        # not in the fire lag; a loss before the gate never uses an attempt.
        self._gate_lead_s = gate_lead_s
        # Build each run's sandbox and start its launcher when the attempt is
        # handed over, held before the script's exec until the instant.
        self._prespawn = prespawn
        self.discarded_held = 0  # held runs ended unreleased: nothing of theirs ran
        self._patience_s = patience_s  # how long to wait out a database outage
        self._retry_s = retry_s
        self._node_id = node_id or socket.gethostname()
        self._slots = asyncio.Semaphore(slots)
        self._running: dict[tuple[int, int], tuple[TaskSpec, asyncio.Task]] = {}
        self.fenced = False  # lost contact with the pool: take no new work
        self.draining = False  # the pool retires it: take no new work, finish the rest
        self._pids: dict[tuple[int, int], int] = {}  # running scripts' process groups
        self._fenced_keys: set[tuple[int, int]] = set()
        self.refused_at_gate = 0  # attempts someone else owned: never started here
        self._outbox: Outbox[RunResult] = Outbox(
            sink.report_results,
            name=f"executor {executor_id}",
            retry_s=retry_s,
            linger_s=results_linger_s,
        )
        self._releases = InstantReleases(self._sleep_until, lambda: self.fenced)

    async def run_batch(self, specs: Sequence[TaskSpec]) -> int:
        """Take each attempt in the background; a replayed call is a no-op
        for attempts already here."""
        if self.fenced:
            raise ExecutorFenced(f"executor {self.executor_id} lost contact with its pool")
        if self.draining:
            raise ExecutorDraining(f"executor {self.executor_id} is draining")
        taken = 0
        for spec in specs:
            if spec.key in self._running:
                continue
            self._running[spec.key] = (spec, asyncio.ensure_future(self._run(spec)))
            taken += 1
        return taken

    async def running(self) -> list[TaskSpec]:
        return [spec for spec, _ in self._running.values()]

    async def holding(self) -> list[tuple[int, int]]:
        """Attempts this executor answers for: taken and not yet finished, or
        finished with a result its sink has not taken yet."""
        return [*self._running, *(r.key for r in self._outbox.pending())]

    @property
    def busy(self) -> int:
        return len(self._running)

    @property
    def drained(self) -> bool:
        """Draining, and holding nothing: no attempt taken, no result not
        yet acknowledged. Nothing can be added, so the pool may remove it."""
        return self.draining and not self._running and not self._outbox.pending()

    async def cancel(self, keys: Sequence[tuple[int, int]]) -> int:
        """Kill these attempts' scripts; no result is reported for them."""
        cancelled = 0
        for key in keys:
            entry = self._running.get(tuple(key))
            if entry is not None:
                entry[1].cancel()
                cancelled += 1
        return cancelled

    def lose_contact(self, reason: str) -> int:
        """Fence this executor: take no new work and kill every running
        script, so that an executor the pool gave up on cannot finish an
        attempt that now runs elsewhere. Each killed attempt still reports
        (as ``executor_lost``), as does one that had finished: a shard keeps
        whichever result still matches the task and ignores the rest."""
        if not self.fenced:
            log.warning("executor %s fenced: %s", self.executor_id, reason)
        self.fenced = True
        for key, pid in list(self._pids.items()):
            self._fenced_keys.add(key)
            kill_group(pid)
        return len(self._fenced_keys)

    def regain_contact(self) -> None:
        self.fenced = False

    async def _run(self, spec: TaskSpec) -> None:
        try:
            async with self._slots:
                try:
                    result = await self._attempt(spec)
                except Exception as exc:
                    # A fault of ours, not the script's (its sandbox could not
                    # be built, say): reported as a loss, never silently (a
                    # queued task waited for its lease; a running one for the
                    # orphan recovery, which reports the same loss). Free while
                    # the task is queued, and bounded by the free losses.
                    log.exception("attempt %s failed in the executor", spec.key)
                    result = self._result(
                        spec,
                        None,
                        self._clock.now(),
                        None,
                        f"executor error: {type(exc).__name__}: {exc}",
                        FailureClass.EXECUTOR_LOST,
                    )
            if result is not None:
                self._outbox.put([result])
        except asyncio.CancelledError:
            log.info("attempt %s cancelled", spec.key)
        finally:
            self._running.pop(spec.key, None)
            self._pids.pop(spec.key, None)
            self._fenced_keys.discard(spec.key)

    async def _patiently(self, step, spec: TaskSpec, what: str):
        """``step()`` retried through database outages for ``patience_s``;
        None if the database stayed away."""
        deadline = max(self._clock.now(), spec.due_at).timestamp() + self._patience_s
        while True:
            try:
                return await step()
            except Unavailable as exc:
                if self._clock.now().timestamp() > deadline:
                    log.warning("attempt %s: %s failed for good: %s", spec.key, what, exc)
                    return None
                await asyncio.sleep(self._retry_s)

    async def _attempt(self, spec: TaskSpec) -> RunResult | None:
        try:
            path = await self._patiently(lambda: self._scripts.path_for(spec), spec, "fetch")
        except Exception as exc:  # the script itself is gone: the task's own failure
            log.exception("could not load script %s", spec.script_id)
            return self._result(
                spec,
                None,
                self._clock.now(),
                None,
                f"script unavailable: {exc}",
                FailureClass.LAUNCH_ERROR,
            )
        if path is None:
            return self._not_started(spec, "the database did not answer for its script")
        # Handed over early (prefire): its sandbox is built now, its script
        # held before its first line until the instant.
        run = ScriptRun(
            script_path=path,
            interpreter=spec.interpreter,
            variables={
                **spec.variables,
                "CHRONORAY_TASK_ID": str(spec.task_id),
                "CHRONORAY_ATTEMPT": str(spec.attempt),
                "CHRONORAY_FIRE_TIME": spec.fire_time.isoformat(),
            },
            timeout_s=spec.timeout_s,
            limits=self._limits,
        ).prepare(hold=self._prespawn)
        try:
            await self._sleep_until(to_epoch(spec.due_at) - self._gate_lead_s)
            if self.fenced:
                return self._not_started(spec, "the executor lost contact with its pool")
            started = await self._patiently(lambda: self._gate.start(spec), spec, "start gate")
            if started is None:
                return self._not_started(spec, "the database did not answer at its start gate")
            if not started:
                self.refused_at_gate += 1
                log.info("attempt %s not started: it is not ours to run", spec.key)
                return None  # someone else's: nothing to say about it
            released = await self._releases.release(
                run,
                at=to_epoch(spec.due_at),
                on_start=lambda pid: self._pids.__setitem__(spec.key, pid),
            )
            if not released:  # fenced by its instant
                return self._result(
                    spec, None, self._clock.now(), None, FENCED, FailureClass.EXECUTOR_LOST
                )
            outcome = await run.finish()
        finally:
            if not run.closed:  # refused, fenced or cancelled before its release
                if run.held:
                    self.discarded_held += 1
                run.discard()
        failure = classify(
            exit_code=outcome.exit_code,
            timed_out=outcome.timed_out,
            output_tail=outcome.output_tail,
            launch_error=outcome.launch_error,
            oom_killed=outcome.oom_killed,
            oom_known=outcome.oom_known,
        )
        text = outcome.launch_error or outcome.output_tail
        if spec.key in self._fenced_keys and outcome.exit_code == -9:
            failure, text = FailureClass.EXECUTOR_LOST, FENCED + "\n" + text
        return self._result(
            spec, outcome.started_at, outcome.finished_at, outcome.exit_code, text, failure
        )

    async def _sleep_until(self, epoch_s: float) -> None:
        """Until the wall clock reads ``epoch_s``, never before: asyncio
        sleeps on the monotonic clock, and the wall clock can fall behind
        it (a clean-clone run started a script 0.188 ms before its instant,
        by the wall clock the fire lag is read from), so it sleeps again
        for what is left."""
        for _ in range(100):  # each round sleeps what the clock says is left
            delay = epoch_s - to_epoch(self._clock.now())
            if delay <= 0:
                return
            await asyncio.sleep(delay)

    def _not_started(self, spec: TaskSpec, why: str) -> RunResult:
        """An attempt given up before its start: reported as lost, which
        costs the task no attempt while its row is still queued, and puts it
        back on its shard's timer at once, rather than leaving it queued
        until its lease runs out (the gate fences this attempt off for good
        once the loss is committed)."""
        log.warning("attempt %s %s", spec.key, NOT_STARTED.format(why=why))
        return self._result(
            spec,
            None,
            self._clock.now(),
            None,
            NOT_STARTED.format(why=why),
            FailureClass.EXECUTOR_LOST,
        )

    def _result(self, spec, started_at, finished_at, exit_code, text, failure) -> RunResult:
        return RunResult.of(
            spec,
            executor_id=self.executor_id,
            tier=self.tier,
            node_id=self._node_id,
            started_at=started_at,
            finished_at=finished_at,
            exit_code=exit_code,
            output_tail=text,
            failure=failure,
        )


# -- the Ray shell ------------------------------------------------------------

EXECUTOR_PREFIX = "chronoray-exec-"  # not a prefix of POOL_NAME
# A result waits this long for others to share its commit and report. The
# wait used to come by itself: the report answered only after the task's
# shard was told; without that call, results went in a quarter more
# transactions (PostgreSQL's commits in a 10,000-task burst: 3,578-3,725
# before, 4,599-4,618 after, 4,345-4,375 with 5 ms). 25 ms against 5 took
# the control plane's CPU per task from 15.4-16.0 to 14.8-15.4 ms in a
# spread and from 4.8-5.6 to 4.5-4.9 in a burst (README, Dec 6). It is off
# the fire lag's path (each run is released by its own timer); the
# dispatcher hears of a free slot this much later, which the burst's drain
# did not show (200, 235 -> 229, 246 tasks/s).
RESULTS_LINGER_S = 0.025
STORE_CONNECTIONS = 2  # a run's start gate, result and script fetch overlap
WARM_UP_TIMEOUT_S = 2.0


class _RepositoryStore:
    """The executor's own database work: script bodies, and the start gate
    (group-committed: every attempt due together shares one transaction)."""

    def __init__(self, settings, executor_id: str) -> None:
        from actors.batching import GroupCommitter
        from storage.sql import SqlTaskRepository

        self._repo = SqlTaskRepository.connect(settings.database_url, pool_size=STORE_CONNECTIONS)
        self._lease_grace_s = settings.lease_grace_s
        self._gate: GroupCommitter[TaskSpec, bool] = GroupCommitter(self._start_many)
        self.results = ResultRecorder(self._repo, settings, name=f"executor {executor_id}")

    def get_script_body(self, script_id: int) -> bytes:
        return self._repo.get_script_body(script_id)

    def warm_up(self) -> None:
        self._repo.warm_up(connections=STORE_CONNECTIONS, now=datetime.now(timezone.utc))

    async def start(self, spec: TaskSpec) -> bool:
        [started] = await self._gate.submit([spec])
        return started

    async def _start_many(self, specs: list[TaskSpec]) -> list[bool]:
        started = set(
            await asyncio.to_thread(
                self._repo.mark_running,
                specs,
                lease_grace_s=self._lease_grace_s,
                now=datetime.now(timezone.utc),
            )
        )
        return [spec.key in started for spec in specs]


class ExecutorShell:
    """An executor actor: builds the sandbox launcher before it says it is
    alive, heartbeats to the pool, fences itself only when the pool says it
    was declared dead (or after a long silence: a restarting pool must not
    kill healthy work), and mirrors itself in ZooKeeper when configured."""

    def __init__(self, *, executor_id: str, tier: Tier, settings) -> None:
        from actors.handles import pool_handle

        store = self._store = _RepositoryStore(settings, executor_id)
        cache_dir = Path(tempfile.gettempdir()) / "chronoray-scripts" / executor_id
        self._node_id = ray.get_runtime_context().get_node_id()
        self._limits = replace(
            settings.sandbox,
            memory_mb=tier.script_memory,
            network=tier.network,
            cpu_weight=tier.cpu_weight,
            scratch_mb=tier.scratch_mb,
        )
        self._settings = settings
        self._results = DispatcherResults(settings.namespace)
        self.network = "not ready"  # what prepare_network says holds
        self.cgroups = "not ready"  # which cgroups hold each run's memory and processes
        self._executor = Executor(
            executor_id=executor_id,
            tier=tier.name,
            slots=tier.slots,
            scripts=ScriptCache(store, cache_dir),
            sink=CommitThenReport(store.results, self._results),
            gate=store,
            node_id=self._node_id,
            limits=self._limits,
            prespawn=settings.prespawn,
            results_linger_s=RESULTS_LINGER_S,
        )
        self._timing = settings.pool_timing
        self._pool = pool_handle(settings.namespace)
        self._tier = tier
        self._mirror = None
        if settings.zookeeper_hosts:
            from actors.zk_mirror import ZnodeMirror, executor_path

            self._mirror = ZnodeMirror(
                settings.zookeeper_hosts,
                executor_path(tier.name, executor_id),
                session_timeout_s=settings.zookeeper_session_timeout_s,
            )
        self._beating = asyncio.ensure_future(self._live())
        settle_after_start()

    async def run_batch(self, specs: list[TaskSpec]) -> int:
        return await self._executor.run_batch(specs)

    async def running(self) -> list[TaskSpec]:
        return await self._executor.running()

    async def holding(self) -> list[tuple[int, int]]:
        return await self._executor.holding()

    async def cancel(self, keys: list[tuple[int, int]]) -> int:
        return await self._executor.cancel(keys)

    async def ping(self) -> str:
        return self._executor.executor_id

    async def info(self) -> dict[str, Any]:
        return self.describe(time.time())

    def describe(self, heartbeat_at: float) -> dict[str, Any]:
        executor = self._executor
        return {
            "executor_id": executor.executor_id,
            "tier": executor.tier,
            "node": self._node_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "resources": self._tier.actor_options(),
            "slots": executor.slots,
            "running": executor.busy,
            "fenced": executor.fenced,
            "draining": executor.draining,
            "refused_at_gate": executor.refused_at_gate,
            "discarded_held": executor.discarded_held,
            # the sandbox probe (and the launcher build) ran: no run pays for it
            "sandbox_ready": detect_isolation.cache_info().currsize > 0,
            "network": self.network,
            "cgroups": self.cgroups,
            "last_heartbeat": heartbeat_at,
        }

    async def _live(self) -> None:
        # The first run would otherwise compile launch.c on the event loop
        # and stall heartbeats past the death threshold (defect 11).
        limits = self._limits
        await asyncio.to_thread(
            detect_isolation, limits.run_as, limits.pid_namespace, limits.launcher
        )
        self.network = await asyncio.to_thread(prepare_network, limits, self._control_plane())
        self.cgroups = (await asyncio.to_thread(cgroup_support, limits)).describe()
        await self._warm_up()
        log.info(
            "executor %s: scripts' network: %s; %s",
            self._executor.executor_id,
            self.network,
            self.cgroups,
        )
        await self._heartbeat_forever()

    async def _warm_up(self) -> None:
        """Pay before the first heartbeat (only then does the pool offer
        this executor) what its first runs would pay: the database's
        connections and statements, a sandbox and the fork server; then
        reach the dispatcher (Ray connects on a first call, and the first
        report looked it up on the event loop). Paid by the runs, a new
        executor's first ten started up to 150 ms late, their first steps
        taking longer than their lead. Best effort: what fails here, a run
        pays for."""
        try:  # a database that is down must not hold back the heartbeats
            await asyncio.wait_for(asyncio.to_thread(self._store.warm_up), WARM_UP_TIMEOUT_S)
        except Exception as exc:
            log.warning("executor warm-up: the database: %r", exc)
        try:  # held, and ended unreleased: nothing runs
            ScriptRun(
                script_path=Path(os.devnull),
                interpreter=Interpreter.BASH,
                variables={},
                timeout_s=1.0,
                limits=self._limits,
            ).prepare(hold=True).discard()
        except Exception as exc:
            log.warning("executor warm-up: a sandbox: %r", exc)
        self._reaching = asyncio.ensure_future(self._reach_dispatcher())

    async def _reach_dispatcher(self) -> None:
        """Until it answers: the dispatcher may be deployed after the pool
        starts its executors."""
        while True:
            try:
                await self._results.hello()
                return
            except Exception:
                await asyncio.sleep(self._timing.heartbeat_s)

    def _control_plane(self) -> ControlPlane:
        settings = self._settings
        return control_plane(
            database_urls=[settings.database_url, *settings.database_replica_urls],
            zookeeper_hosts=settings.zookeeper_hosts,
            api_port=settings.http_port,
            node_ip=ray.util.get_node_ip_address(),
            gcs_address=ray.get_runtime_context().gcs_address,
            redis_address=os.environ.get("RAY_REDIS_ADDRESS"),
            extra_ports=[
                *RAY_FIXED_PORTS,
                *([settings.dashboard_port] if settings.dashboard_port else []),
            ],
        )

    async def _heartbeat_forever(self) -> None:
        period = self._timing.heartbeat_s
        executor = self._executor
        acknowledged = time.monotonic()
        while True:
            try:
                reply = await asyncio.wait_for(
                    self._pool.heartbeat.remote(
                        executor.executor_id, executor.busy, self._node_id, executor.drained
                    ),
                    timeout=period,
                )
            except Exception:
                reply = None  # no answer: the pool may be restarting
            if reply in (Heartbeat.LIVE, Heartbeat.DRAIN):
                acknowledged = time.monotonic()
                executor.regain_contact()
                # a restarted pool knows nothing of a drain: it answers LIVE
                executor.draining = reply == Heartbeat.DRAIN
            elif reply == Heartbeat.DEAD:
                executor.lose_contact("the pool declared this executor dead")
                await self._outbox_flushed()
                self._exit()
                return
            elif time.monotonic() - acknowledged > self._timing.fence_after_s:
                executor.lose_contact(
                    f"no heartbeat acknowledged for {self._timing.fence_after_s} s"
                )
            if self._mirror is not None:
                self._mirror.publish(self.describe(time.time()))
            await asyncio.sleep(period)

    async def _outbox_flushed(self) -> None:
        await asyncio.sleep(self._timing.heartbeat_s)  # let late results go out

    def _exit(self) -> None:
        if self._mirror is not None:
            self._mirror.close()
        ray.actor.exit_actor()


ExecutorActor = ray.remote(max_restarts=0)(ExecutorShell)
