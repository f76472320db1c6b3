"""Scripts in real subprocesses (no Ray): environment, output, timeouts."""

import asyncio
import os
import time
from pathlib import Path

import pytest

from actors.sandbox import run_script
from scheduling.models import Interpreter


def write(tmp_path: Path, body: str, name="script") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def run(path, interpreter=Interpreter.BASH, variables=None, timeout_s=10.0, output_limit=4096):
    return asyncio.run(
        run_script(
            script_path=path,
            interpreter=interpreter,
            variables=variables or {},
            timeout_s=timeout_s,
            output_limit=output_limit,
        )
    )


def test_variables_arrive_as_environment_and_nothing_else_leaks(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_OF_THE_EXECUTOR", "leak")
    outcome = run(
        write(tmp_path, 'echo "hello $NAME"; echo "[$SECRET_OF_THE_EXECUTOR]"; pwd'),
        variables={"NAME": "$(id) world"},
    )
    assert outcome.exit_code == 0
    lines = outcome.output_tail.splitlines()
    assert lines[0] == "hello $(id) world"  # never through a shell
    assert lines[1] == "[]"
    assert "chronoray-run-" in lines[2] and not os.path.exists(lines[2])  # scratch removed


def test_python_scripts_and_exit_codes(tmp_path):
    outcome = run(write(tmp_path, "import sys\nprint('py')\nsys.exit(3)\n"), Interpreter.PYTHON)
    assert (outcome.exit_code, outcome.output_tail, outcome.timed_out) == (3, "py\n", False)


def test_output_keeps_only_the_tail(tmp_path):
    outcome = run(
        write(tmp_path, "for i in $(seq 1 20000); do echo line$i; done"), output_limit=100
    )
    assert len(outcome.output_tail) <= 100
    assert outcome.output_tail.endswith("line20000\n")


def test_timeout_kills_the_whole_group_including_grandchildren(tmp_path):
    marker = tmp_path / "pid"
    body = f"sleep 300 & echo $! > {marker}; sleep 300\n"
    started = time.monotonic()
    outcome = run(write(tmp_path, body), timeout_s=1.0)
    assert outcome.timed_out and time.monotonic() - started < 3
    grandchild = int(marker.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {grandchild} survived the timeout")


def test_a_missing_interpreter_is_a_launch_error(tmp_path, monkeypatch):
    import actors.sandbox as sandbox

    monkeypatch.setattr(sandbox, "interpreter_command", lambda _: ["/nonexistent/interpreter"])
    outcome = run(write(tmp_path, "echo"))
    assert outcome.launch_error and outcome.started_at is None


def test_rlimits_apply_to_the_script(tmp_path):
    outcome = run(write(tmp_path, "ulimit -t; ulimit -c; ulimit -f"), timeout_s=5.0)
    cpu, core, fsize = outcome.output_tail.split()
    assert (cpu, core) == ("6", "0")
    assert int(fsize) * 1024 == 1 << 30  # bash reports 1 KiB blocks
