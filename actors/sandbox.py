"""Run one script in a subprocess: its own session and process group, a
scratch directory, variables as environment (never through a shell), rlimits,
captured output, and a timeout that kills the whole group."""

from __future__ import annotations

import asyncio
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from scheduling.models import Interpreter

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
FILE_SIZE_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True, kw_only=True)
class ScriptOutcome:
    started_at: datetime | None
    finished_at: datetime
    exit_code: int | None
    output_tail: str
    timed_out: bool = False
    launch_error: str | None = None


def interpreter_command(interpreter: Interpreter) -> list[str]:
    if interpreter is Interpreter.PYTHON:
        return [shutil.which("python3") or sys.executable, "-u"]
    return [shutil.which(interpreter.value) or f"/bin/{interpreter.value}"]


def _limits(timeout_s: float):
    cpu_s = math.ceil(timeout_s) + 1

    def apply() -> None:  # runs in the child, between fork and exec
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


async def _read_tail(stream: asyncio.StreamReader, limit: int) -> bytes:
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk
        if len(kept) > 2 * limit:
            del kept[:-limit]
    return bytes(kept[-limit:])


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own group
    except ProcessLookupError:
        pass


async def run_script(
    *,
    script_path: Path,
    interpreter: Interpreter,
    variables: Mapping[str, str],
    timeout_s: float,
    output_limit: int = 4096,
) -> ScriptOutcome:
    scratch = tempfile.mkdtemp(prefix="chronoray-run-")
    env = {"PATH": SAFE_PATH, "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8", **variables}
    started_at = datetime.now(timezone.utc)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *interpreter_command(interpreter),
                str(script_path),
                cwd=scratch,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_limits(timeout_s),
            )
        except OSError as exc:
            return ScriptOutcome(
                started_at=None,
                finished_at=datetime.now(timezone.utc),
                exit_code=None,
                output_tail="",
                launch_error=f"{type(exc).__name__}: {exc}",
            )
        reader = asyncio.ensure_future(_read_tail(proc.stdout, output_limit))
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            timed_out = True
        # Grandchildren may still hold the pipe open: end the whole group.
        _kill_group(proc.pid)
        if timed_out:
            await proc.wait()
        try:
            output = await asyncio.wait_for(reader, timeout=1.0)
        except asyncio.TimeoutError:
            reader.cancel()
            output = b""
        return ScriptOutcome(
            started_at=started_at,
            finished_at=datetime.now(timezone.utc),
            exit_code=proc.returncode,
            output_tail=output.decode("utf-8", errors="replace"),
            timed_out=timed_out,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
