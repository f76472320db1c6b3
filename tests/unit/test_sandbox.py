"""Scripts in real subprocesses (no Ray): environment, output, timeouts."""

import asyncio
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from actors.cgroups import CgroupMode
from actors.sandbox import (
    SandboxLimits,
    ScriptRun,
    cgroup_support,
    detect_isolation,
    run_script,
    uid_leases,
)
from scheduling.models import Interpreter
from tests.ray_cluster import wait_for
from tests.unit.fakes import exe_of, held_runs, processes_with, uid_of


def write(tmp_path: Path, body: str, name="script") -> Path:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(0o644)
    return path


def run(
    path,
    interpreter=Interpreter.BASH,
    variables=None,
    timeout_s=10.0,
    output_limit=4096,
    limits: SandboxLimits | None = None,
):
    return asyncio.run(
        run_script(
            script_path=path,
            interpreter=interpreter,
            variables=variables or {},
            timeout_s=timeout_s,
            limits=limits or SandboxLimits(output_bytes=output_limit),
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
    if os.geteuid() == 0:  # its own tmpfs, gone with its mount namespace
        assert lines[2] == "/tmp"
    else:  # a scratch directory on disk, removed afterwards
        assert "chronoray-run-" in lines[2] and not os.path.exists(lines[2])


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
    body = "sleep 300 & sleep 300\n"
    started = time.monotonic()
    outcome = run(write(tmp_path, body), variables={"MARK": "grandchild-check"}, timeout_s=1.0)
    assert outcome.timed_out and time.monotonic() - started < 3
    assert processes_with("MARK=grandchild-check") == []


def test_a_missing_interpreter_is_a_launch_error(tmp_path, monkeypatch):
    import actors.sandbox as sandbox

    monkeypatch.setattr(sandbox, "interpreter_command", lambda _: ["/nonexistent/interpreter"])
    outcome = run(write(tmp_path, "echo"))
    assert outcome.launch_error and outcome.started_at is None


def test_rlimits_apply_to_the_script(tmp_path):
    outcome = run(write(tmp_path, "ulimit -t; ulimit -c; ulimit -f"), timeout_s=5.0)
    cpu, core, fsize = outcome.output_tail.split()
    assert (cpu, core) == ("6", "0")
    assert int(fsize) * 1024 == 256 << 20  # bash reports 1 KiB blocks


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the sandbox drops to nobody only as root"
)
CGROUPS = cgroup_support(SandboxLimits()).mode is not CgroupMode.NONE


@needs_root
def test_each_script_runs_as_its_own_unprivileged_uid_in_its_own_pid_namespace(tmp_path):
    outcome = run(write(tmp_path, "id -u; echo $$; ulimit -n; ulimit -u; ulimit -v"))
    uid, pid, nofile, nproc, vmem = outcome.output_tail.split()
    base = SandboxLimits().uid_base
    assert base <= int(uid) < base + SandboxLimits().uid_count
    assert pid == "1" and detect_isolation("nobody").pid_namespace
    assert (int(nofile), int(nproc)) == (256, 256)
    # in a cgroup, memory is bounded resident (see below), not by address space
    assert vmem == ("unlimited" if CGROUPS else str(1024 * 1024))


@needs_root
def test_concurrent_scripts_get_different_uids(tmp_path):
    script = write(tmp_path, "id -u; sleep 0.5")

    async def both():
        limits = SandboxLimits()
        return await asyncio.gather(
            *(
                run_script(
                    script_path=script,
                    interpreter=Interpreter.BASH,
                    variables={},
                    timeout_s=5,
                    limits=limits,
                )
                for _ in range(4)
            )
        )

    uids = {o.output_tail.strip() for o in asyncio.run(both())}
    assert len(uids) == 4


@needs_root
def test_without_a_namespace_a_setsid_escape_is_killed_by_its_uid(tmp_path):
    body = "(setsid sleep 600 &) ; sleep 600"
    outcome = asyncio.run(
        run_script(
            script_path=write(tmp_path, body),
            interpreter=Interpreter.BASH,
            variables={"MARK": "escape-by-uid"},
            timeout_s=1.0,
            limits=SandboxLimits(pid_namespace=False),
        )
    )
    assert outcome.timed_out
    assert_gone("MARK=escape-by-uid")


def assert_gone(marker: str, timeout_s: float = 5.0) -> None:
    """Every process carrying ``marker`` is gone within ``timeout_s``: the
    kernel tears a killed namespace down asynchronously, and a process
    killed holding gigabytes takes a while to free them on a busy box.
    Anything that was not killed is still there at the deadline."""
    wait_for(
        lambda: processes_with(marker) == [],
        timeout_s=timeout_s,
        interval_s=0.05,
        what=f"every process carrying {marker} to be gone",
    )


FORK_BOMB = "bomb() { bomb | bomb & }; while true; do bomb 2>/dev/null; done"
HOSTILE = {
    "fork bomb": (Interpreter.BASH, FORK_BOMB),
    "2 GB resident in small pieces": (
        Interpreter.PYTHON,
        "import time\nheld = [b'x' * (1 << 20) for _ in range(2048)]\ntime.sleep(60)",
    ),
    "disk filler": (
        Interpreter.BASH,
        "i=0; while true; do head -c 100000000 /dev/zero > f$i; i=$((i+1)); done",
    ),
    "infinite loop": (Interpreter.PYTHON, "while True:\n    pass"),
    "1 GB of stdout": (Interpreter.BASH, "head -c 1000000000 /dev/zero | tr '\\0' x; sleep 60"),
    "setsid escape": (
        Interpreter.BASH,
        "(setsid bash -c 'trap \"\" TERM HUP; sleep 600' &) ; (setsid sleep 600 &) ; sleep 600",
    ),
}


@needs_root
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_scripts_end_within_the_timeout_and_leave_nothing(tmp_path, name):
    interpreter, body = HOSTILE[name]
    marker = f"HOSTILE_{abs(hash(name))}"
    started = time.monotonic()
    outcome = run(write(tmp_path, body), interpreter, {marker: "1"}, timeout_s=3.0)
    elapsed = time.monotonic() - started
    assert elapsed < 3.0 + 1.0, f"{name} took {elapsed:.1f} s"
    if name == "2 GB resident in small pieces":
        assert not outcome.timed_out
        if CGROUPS:  # resident memory, the whole tree: the kernel's OOM kill in its cgroup
            assert outcome.oom_killed and outcome.exit_code == -9
        else:  # the address-space rlimit refuses the allocation
            assert "MemoryError" in outcome.output_tail
    elif name == "disk filler":
        assert outcome.timed_out or outcome.exit_code != 0
    else:
        assert outcome.timed_out or name == "fork bomb"
    assert len(outcome.output_tail) <= 4096
    assert_gone(f"{marker}=1")
    assert not list(Path("/tmp").glob("chronoray-run-*/f0"))  # scratch removed
    assert "chronoray-scratch" not in Path("/proc/self/mounts").read_text()  # no mount
    assert uid_leases(SandboxLimits().uid_base, SandboxLimits().uid_count)._held == {}
    if CGROUPS:  # and nothing is left in its cgroup (kept empty for the next run)
        support = cgroup_support(SandboxLimits())
        mine = f"executor-{os.getpid()}/run-*"  # not those of executors elsewhere on the host
        runs = [p for parent in support.parents for p in parent.glob(mine)]
        assert [r for r in runs if (r / "cgroup.procs").read_text().split()] == []


@needs_root
@pytest.mark.parametrize("name", ["setsid escape", "fork bomb"])
def test_the_util_linux_fallback_contains_them_too(tmp_path, name):
    """Without a C compiler the sandbox starts scripts through setpriv,
    unshare and prlimit instead of actors/launch.c: the same guarantees."""
    interpreter, body = HOSTILE[name]
    limits = SandboxLimits(launcher=False)
    assert detect_isolation("nobody", True, False).launcher is None
    started = time.monotonic()
    outcome = asyncio.run(
        run_script(
            script_path=write(tmp_path, body),
            interpreter=interpreter,
            variables={"MARK": f"fallback-{name}"},
            timeout_s=2.0,
            limits=limits,
        )
    )
    assert time.monotonic() - started < 3.0 and (outcome.timed_out or name == "fork bomb")
    assert_gone(f"MARK=fallback-{name}")


def test_the_launcher_reports_the_scripts_exit_status_and_signal(tmp_path):
    for body, expected in (("exit 7", 7), ("true", 0)):
        assert run(write(tmp_path, body)).exit_code == expected, body
    # As PID 1 of its namespace a script ignores signals it has no handler
    # for; without the namespace a signal ends it and shows as such.
    outcome = asyncio.run(
        run_script(
            script_path=write(tmp_path, "kill -TERM $$; sleep 5"),
            interpreter=Interpreter.BASH,
            variables={},
            timeout_s=5,
            limits=SandboxLimits(pid_namespace=False),
        )
    )
    assert outcome.exit_code == -15


async def until(condition, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return found


def held_run(
    path: Path,
    marker: str,
    hold: bool = True,
    fork_server: bool = True,
    interpreter: Interpreter = Interpreter.BASH,
) -> ScriptRun:
    return ScriptRun(
        script_path=path,
        interpreter=interpreter,
        variables={"MARK": marker},
        timeout_s=10,
        limits=SandboxLimits(fork_server=fork_server),
    ).prepare(hold=hold)


START_PATHS = {"fork server": True, "Popen of the launcher": False}


@needs_root
@pytest.mark.parametrize("start_path", START_PATHS)
def test_a_held_run_has_its_sandbox_built_and_starts_only_when_released(tmp_path, start_path):
    ran = tmp_path / "ran"
    # What a script sees of itself does not change with the hold (bash is
    # held after its start-up, reading its script from a pipe): its name,
    # its arguments, its open descriptors (ls's own directory one of them),
    # its own text through $0, a bash it starts, its exit status.
    script = write(
        tmp_path,
        f"echo $$ $(id -u) > {ran}\n"
        'echo "$# $([ "$0" = "${BASH_SOURCE[0]}" ] && echo same-name)"\n'
        "ls /proc/self/fd | wc -l\n"
        'head -c 9 "$0"; echo\n'
        "bash -c 'echo child $#' && exit 3\n"
        "echo not reached\n",
    )
    tmp_path.chmod(0o777)
    limits = SandboxLimits(fork_server=START_PATHS[start_path])
    unheld = run(script, variables={"MARK": "unheld"}, limits=limits)
    assert unheld.exit_code == 3
    assert unheld.output_tail.splitlines()[:2] == ["0 same-name", "5"]
    ran.unlink()

    async def scenario():
        run = held_run(script, "MARK=held-released", fork_server=START_PATHS[start_path])
        assert run.held
        # bash itself is up as the run's uid, waiting for its script
        first, last = SandboxLimits().uid_range()
        held = await until(held_runs, "the held bash to drop to the run's uid")
        assert len(held) == 1 and first <= uid_of(held[0]) <= last
        assert os.path.basename(exe_of(held[0])) == "bash"
        assert not ran.exists()
        released_at = datetime.now(timezone.utc)
        run.release()
        outcome = await run.finish()
        assert (outcome.exit_code, outcome.output_tail) == (3, unheld.output_tail)
        assert outcome.started_at >= released_at and run.closed
        pid, uid = ran.read_text().split()
        assert pid == "1" and first <= int(uid) <= last  # its own namespace, its own uid

    asyncio.run(scenario())


@needs_root
def test_a_bash_run_with_its_own_bash_env_is_held_in_the_launcher(tmp_path):
    """bash sources BASH_ENV at its start-up: held after its start-up, a
    task's BASH_ENV would run before the start gate. Such a run waits in the
    launcher, and its BASH_ENV runs on the release, before the script."""
    ran = tmp_path / "ran"
    startup = write(tmp_path, f"echo startup >> {ran}", name="startup")
    script = write(tmp_path, f"echo script >> {ran}")
    tmp_path.chmod(0o777)

    async def scenario():
        run = ScriptRun(
            script_path=script,
            interpreter=Interpreter.BASH,
            variables={"MARK": "held-bash-env", "BASH_ENV": str(startup)},
            timeout_s=10,
            limits=SandboxLimits(),
        ).prepare(hold=True)
        [held] = await until(held_runs, "the held launcher")
        assert exe_of(held) == detect_isolation("nobody").launcher
        await asyncio.sleep(0.2)
        assert not ran.exists()
        run.release()
        outcome = await run.finish()
        assert (outcome.exit_code, ran.read_text()) == (0, "startup\nscript\n")

    asyncio.run(scenario())


@needs_root
def test_a_held_python_run_waits_in_the_launcher(tmp_path):
    """Only bash is held after its start-up; another interpreter waits in
    the launcher, before its exec."""
    ran = tmp_path / "ran"
    script = write(tmp_path, f"open({str(ran)!r}, 'w').write('ran')\nprint('py')\n")
    tmp_path.chmod(0o777)

    async def scenario():
        run = held_run(script, "MARK=held-python", interpreter=Interpreter.PYTHON)
        [held] = await until(held_runs, "the held launcher")
        assert exe_of(held) == detect_isolation("nobody").launcher
        assert not ran.exists()
        run.release()
        outcome = await run.finish()
        assert (outcome.exit_code, outcome.output_tail, ran.read_text()) == (0, "py\n", "ran")

    asyncio.run(scenario())


@needs_root
@pytest.mark.parametrize("start_path", START_PATHS)
def test_a_discarded_held_run_runs_nothing_and_leaves_nothing(tmp_path, start_path):
    ran = tmp_path / "ran"
    script = write(tmp_path, f"touch {ran}")
    tmp_path.chmod(0o777)

    async def scenario():
        run = held_run(script, "MARK=held-discarded", fork_server=START_PATHS[start_path])
        await until(held_runs, "the held bash")
        run.discard()
        await until(lambda: not held_runs(), "the held bash's end")
        assert run.closed and not ran.exists()

    asyncio.run(scenario())


@needs_root
@pytest.mark.parametrize("interpreter", [Interpreter.BASH, Interpreter.PYTHON])
def test_a_held_run_whose_go_pipe_closes_unwritten_runs_nothing(tmp_path, interpreter):
    """What an executor that dies before the instant leaves: the pipe's end
    of file, nothing killed. A held bash reads an empty script, a held
    launcher exits unexec'd; neither runs a line."""
    ran = tmp_path / "ran"
    body = f"touch {ran}" if interpreter is Interpreter.BASH else f"open({str(ran)!r}, 'w')"
    script = write(tmp_path, body)
    tmp_path.chmod(0o777)

    async def scenario():
        run = held_run(script, "MARK=held-orphaned", interpreter=interpreter)
        await until(held_runs, "the held run")
        run._close_go()
        await until(lambda: not held_runs(), "the held run's own end")
        assert not ran.exists()
        run.discard()

    asyncio.run(scenario())


def test_a_run_that_cannot_start_reports_a_launch_error_held_or_not(tmp_path, monkeypatch):
    script = write(tmp_path, "true")
    monkeypatch.setattr("actors.sandbox.interpreter_command", lambda _: ["/nonexistent/bash"])

    async def scenario(hold):
        run = held_run(script, "MARK=never", hold=hold)
        run.release()
        return await run.finish()

    for hold in (True, False):
        outcome = asyncio.run(scenario(hold))
        assert outcome.started_at is None and "not found" in outcome.launch_error
