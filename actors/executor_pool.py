"""Executors run scripts; the pool creates them per tier with the Ray
resources their tier names, so Ray places each only where it fits."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray

from actors.batching import Outbox
from actors.sandbox import run_script
from scheduling.clock import Clock, SystemClock, to_epoch
from scheduling.models import FailureClass, RunResult, TaskSpec
from scheduling.tiers import Tier, TierTable

log = logging.getLogger(__name__)


class ScriptSource(Protocol):
    def get_script_body(self, script_id: int) -> bytes: ...


class ResultSink(Protocol):
    async def report_results(self, results: list[RunResult]) -> None: ...


class ScriptCache:
    """Script files on local disk named by content hash, written once."""

    def __init__(self, source: ScriptSource, directory: Path) -> None:
        self._source = source
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    async def path_for(self, spec: TaskSpec) -> Path:
        path = self._directory / spec.script_sha256
        if not path.exists():
            body = await asyncio.to_thread(self._source.get_script_body, spec.script_id)
            partial = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            partial.write_bytes(body)
            partial.chmod(0o555)
            os.replace(partial, path)
        return path


class Executor:
    """Runs handed-over attempts, each at its due instant, at most ``slots``
    at once, and reports results in batches."""

    def __init__(
        self,
        *,
        executor_id: str,
        tier: str,
        slots: int,
        scripts: ScriptCache,
        sink: ResultSink,
        clock: Clock | None = None,
        node_id: str = "",
    ) -> None:
        self.executor_id = executor_id
        self.tier = tier
        self.slots = slots
        self._scripts = scripts
        self._clock = clock or SystemClock()
        self._node_id = node_id or socket.gethostname()
        self._slots = asyncio.Semaphore(slots)
        self._running: dict[tuple[int, int], asyncio.Task] = {}
        self._outbox: Outbox[RunResult] = Outbox(
            sink.report_results, name=f"executor {executor_id}"
        )

    async def run_batch(self, specs: Sequence[TaskSpec]) -> int:
        """Start each attempt in the background; a replayed call is a no-op
        for attempts already here."""
        started = 0
        for spec in specs:
            if spec.key in self._running:
                continue
            self._running[spec.key] = asyncio.ensure_future(self._run(spec))
            started += 1
        return started

    async def running_keys(self) -> list[tuple[int, int]]:
        return list(self._running)

    async def cancel(self, keys: Sequence[tuple[int, int]]) -> int:
        """Kill these attempts' scripts; no result is reported for them."""
        cancelled = 0
        for key in keys:
            task = self._running.get(tuple(key))
            if task is not None:
                task.cancel()
                cancelled += 1
        return cancelled

    async def _run(self, spec: TaskSpec) -> None:
        try:
            async with self._slots:
                result = await self._attempt(spec)
            self._outbox.put([result])
        except asyncio.CancelledError:
            log.info("attempt %s cancelled", spec.key)
        finally:
            self._running.pop(spec.key, None)

    async def _attempt(self, spec: TaskSpec) -> RunResult:
        try:
            path = await self._scripts.path_for(spec)
        except Exception as exc:
            log.exception("could not load script %s", spec.script_id)
            return self._result(
                spec,
                None,
                self._clock.now(),
                None,
                f"script unavailable: {exc}",
                FailureClass.LAUNCH_ERROR,
            )
        # Handed over early (prefire): hold the task until its instant.
        delay = to_epoch(spec.due_at) - to_epoch(self._clock.now())
        if delay > 0:
            await asyncio.sleep(delay)
        outcome = await run_script(
            script_path=path,
            interpreter=spec.interpreter,
            variables={
                **spec.variables,
                "CHRONORAY_TASK_ID": str(spec.task_id),
                "CHRONORAY_ATTEMPT": str(spec.attempt),
                "CHRONORAY_FIRE_TIME": spec.fire_time.isoformat(),
            },
            timeout_s=spec.timeout_s,
        )
        if outcome.launch_error:
            failure, text = FailureClass.LAUNCH_ERROR, outcome.launch_error
        elif outcome.timed_out:
            failure, text = FailureClass.TIMEOUT, outcome.output_tail
        elif outcome.exit_code != 0:
            failure, text = FailureClass.EXIT_CODE, outcome.output_tail
        else:
            failure, text = None, outcome.output_tail
        return self._result(
            spec, outcome.started_at, outcome.finished_at, outcome.exit_code, text, failure
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


# -- Ray shells ------------------------------------------------------------


class _DispatcherSink:
    """Results go back to the dispatcher, looked up by name so a restarted
    dispatcher is found again."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._handle = None

    async def report_results(self, results: list[RunResult]) -> None:
        from actors.handles import DISPATCHER_NAME

        if self._handle is None:
            self._handle = ray.get_actor(DISPATCHER_NAME, namespace=self._namespace)
        await self._handle.report_results.remote(results)


class _RepositoryScripts:
    def __init__(self, database_url: str) -> None:
        from storage.engines import make_engine
        from storage.sql import SqlTaskRepository

        self._repo = SqlTaskRepository(make_engine(database_url, pool_size=2))

    def get_script_body(self, script_id: int) -> bytes:
        return self._repo.get_script_body(script_id)


class ExecutorShell(Executor):
    def __init__(
        self, *, executor_id: str, tier: str, slots: int, database_url: str, namespace: str
    ):
        cache_dir = Path(tempfile.gettempdir()) / "chronoray-scripts" / executor_id
        super().__init__(
            executor_id=executor_id,
            tier=tier,
            slots=slots,
            scripts=ScriptCache(_RepositoryScripts(database_url), cache_dir),
            sink=_DispatcherSink(namespace),
            node_id=ray.get_runtime_context().get_node_id(),
        )

    async def ping(self) -> str:
        return self.executor_id


ExecutorActor = ray.remote(max_restarts=-1, max_task_retries=-1)(ExecutorShell)


@dataclass(frozen=True, kw_only=True)
class ExecutorInfo:
    executor_id: str
    tier: str
    tier_rank: int  # position in the tier table: a task may use ranks >= its own
    slots: int
    handle: Any


class ExecutorPool:
    """Creates the executors a tier table asks for, and lists them."""

    def __init__(self, *, tiers: TierTable, database_url: str, namespace: str) -> None:
        self._tiers = tiers
        self._database_url = database_url
        self._namespace = namespace
        self._executors: list[ExecutorInfo] = []
        for rank, tier in enumerate(tiers):
            for i in range(tier.executors):
                self._executors.append(self._create(tier, rank, i))

    def _create(self, tier: Tier, rank: int, index: int) -> ExecutorInfo:
        executor_id = f"{tier.name}-{index}"
        handle = ExecutorActor.options(
            name=f"chronoray-executor-{executor_id}",
            namespace=self._namespace,
            lifetime="detached",
            get_if_exists=True,
            max_concurrency=max(100, tier.slots * 4),
            **tier.actor_options(),
        ).remote(
            executor_id=executor_id,
            tier=tier.name,
            slots=tier.slots,
            database_url=self._database_url,
            namespace=self._namespace,
        )
        return ExecutorInfo(
            executor_id=executor_id, tier=tier.name, tier_rank=rank, slots=tier.slots, handle=handle
        )

    def executors(self) -> list[ExecutorInfo]:
        return list(self._executors)


ExecutorPoolActor = ray.remote(max_restarts=-1, max_task_retries=-1)(ExecutorPool)
