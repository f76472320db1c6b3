"""The floor a benchmark is compared with, run in the same command: the
same work without chronoray. A plain asyncio loop spawns each task's script
at its due time, at most ``concurrency`` at once, and reads the first line
the script prints (its clock, ``$EPOCHREALTIME``).

* sandboxed: the executor's own launch path (``actors.sandbox.run_script``
  with the deployment's limits): what chronoray adds on top of it is the
  scheduler.
* bare: ``bash -c`` with no sandbox, 32 at once: the machine's spawn rate.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from actors.sandbox import SandboxLimits, run_script
from scheduling.models import Interpreter

STAMP_SCRIPT = "echo $EPOCHREALTIME"  # a bash builtin: the first line costs no extra exec


def _first_lines(
    due: list[float], concurrency: int, *, limits: SandboxLimits | None
) -> list[float]:
    """Each task's first-line time, in due order."""
    directory = Path(tempfile.mkdtemp(prefix="chronoray-floor-"))
    script = directory / "stamp.sh"
    script.write_text(STAMP_SCRIPT)
    script.chmod(0o755)
    directory.chmod(0o755)  # the sandbox runs the script as another uid
    try:
        return asyncio.run(_run_all(due, concurrency, script, limits=limits))
    finally:
        script.unlink()
        directory.rmdir()


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
            outcome = await run_script(
                script_path=script,
                interpreter=Interpreter.BASH,
                variables={},
                timeout_s=60,
                limits=limits,
            )
            return float(outcome.output_tail.split()[0])

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
