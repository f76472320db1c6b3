"""The floor a benchmark is compared with, run in the same command: the
same work without chronoray. A plain asyncio loop spawns each task's script
at its due time, at most ``concurrency`` at once, and reads the first line
the script prints (its clock, ``$EPOCHREALTIME``).

* sandboxed: the executor's own launch path (``actors.sandbox.run_script``
  with the deployment's limits): what chronoray adds on top of it is the
  scheduler.
* bare: ``bash -c`` with no sandbox, 32 at once: the machine's spawn rate.
* at one instant: the sandboxed launch path held before the script's first
  line (what pre-spawn does), as many as there are slots, all released in
  one loop at the instant; each run that ends starts the next at once. What
  a minute's fires cost on this box's cores with no scheduler in the way.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from actors.sandbox import SandboxLimits, ScriptOutcome, ScriptRun, run_script
from scheduling.models import Interpreter

STAMP_SCRIPT = "echo $EPOCHREALTIME"  # a bash builtin: the first line costs no extra exec


def _with_stamp_script(work: Callable[[Path], Awaitable[list[float]]]) -> list[float]:
    """``work(script)`` on an event loop of its own, the stamp script
    written where the sandbox's uid can read it."""
    directory = Path(tempfile.mkdtemp(prefix="chronoray-floor-"))
    script = directory / "stamp.sh"
    script.write_text(STAMP_SCRIPT)
    script.chmod(0o755)
    directory.chmod(0o755)  # the sandbox runs the script as another uid
    try:
        return asyncio.run(work(script))
    finally:
        script.unlink()
        directory.rmdir()


def _stamp_run(script: Path, limits: SandboxLimits) -> dict[str, Any]:
    """The stamp script's run in the executor's sandbox: the arguments of
    ``ScriptRun`` and ``run_script``."""
    return {
        "script_path": script,
        "interpreter": Interpreter.BASH,
        "variables": {},
        "timeout_s": 60,
        "limits": limits,
    }


def _clock_of(outcome: ScriptOutcome) -> float:
    return float(outcome.output_tail.split()[0])  # the script's first line


def _first_lines(
    due: list[float], concurrency: int, *, limits: SandboxLimits | None
) -> list[float]:
    """Each task's first-line time, in due order."""
    return _with_stamp_script(lambda script: _run_all(due, concurrency, script, limits=limits))


async def _run_all(
    due: list[float], concurrency: int, script: Path, *, limits: SandboxLimits | None
) -> list[float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(at: float) -> float:
        await asyncio.sleep(max(0.0, at - time.time()))
        async with gate:
            if limits is None:
                proc = await asyncio.create_subprocess_exec(
                    "bash", "-c", STAMP_SCRIPT, stdout=asyncio.subprocess.PIPE
                )
                output, _ = await proc.communicate()
                return float(output.split()[0])
            return _clock_of(await run_script(**_stamp_run(script, limits)))

    return list(await asyncio.gather(*(one(at) for at in due)))


def burst(count: int, concurrency: int, *, limits: SandboxLimits | None) -> float:
    """Tasks per second from the instant to the last first line."""
    instant = time.time() + 0.5
    first_lines = _first_lines([instant] * count, concurrency, limits=limits)
    return count / (max(first_lines) - instant)


def spread(
    count: int, spread_s: float, concurrency: int, *, limits: SandboxLimits | None
) -> list[float]:
    """Due → first line in ms, tasks due uniformly over ``spread_s``."""
    start = time.time() + 1.0
    due = [start + i * spread_s / count for i in range(count)]
    first_lines = _first_lines(due, concurrency, limits=limits)
    return [(line - at) * 1000 for line, at in zip(first_lines, due, strict=True)]


def at_one_instant(count: int, concurrency: int, *, limits: SandboxLimits) -> list[float]:
    """``count`` runs due at one instant, ``concurrency`` at once: instant
    → first line in ms. The first ``concurrency`` are held ready before it
    (their sandboxes built, bash started), as pre-spawn holds them; the
    instant is set half a second after they are all ready."""
    return _with_stamp_script(
        lambda script: _release_at_one_instant(count, concurrency, script, limits)
    )


async def _release_at_one_instant(
    count: int, concurrency: int, script: Path, limits: SandboxLimits
) -> list[float]:
    held = [
        ScriptRun(**_stamp_run(script, limits)).prepare(hold=True)
        for _ in range(min(count, concurrency))
    ]
    left = count - len(held)
    instant = time.time() + 0.5
    await asyncio.sleep(max(0.0, instant - time.time()))
    for run in held:  # in one loop, as the executor's InstantReleases does
        run.release()

    def lag_ms(outcome: ScriptOutcome) -> float:
        return (_clock_of(outcome) - instant) * 1000

    async def slot(run: ScriptRun) -> list[float]:
        nonlocal left
        lags = [lag_ms(await run.finish())]
        while left:  # due already: the next starts as this slot frees
            left -= 1
            lags.append(lag_ms(await run_script(**_stamp_run(script, limits))))
        return lags

    return [lag for lags in await asyncio.gather(*(slot(run) for run in held)) for lag in lags]
