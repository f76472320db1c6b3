"""The fork server (actors/fork_server.py, launch.c's --serve) against the
Popen of the launcher it replaces: real processes, no Ray."""

import asyncio
import os
import signal
from pathlib import Path

import pytest

from actors.fork_server import fork_server
from actors.sandbox import SandboxLimits, ScriptRun, detect_isolation
from scheduling.models import Interpreter
from tests.unit.fakes import processes_with

LAUNCHER = detect_isolation("nobody").launcher
pytestmark = pytest.mark.skipif(LAUNCHER is None, reason="no C compiler for actors/launch.c")


def script(tmp_path: Path, body: str, name: str = "script") -> Path:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(0o644)
    return path


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append((int(entry.name), fields[0]))
    return found


def started(path: Path, marker: str, fork_server: bool = True, timeout_s: float = 10) -> ScriptRun:
    run = ScriptRun(
        script_path=path,
        interpreter=Interpreter.BASH,
        variables={"MARK": marker},
        timeout_s=timeout_s,
        limits=SandboxLimits(fork_server=fork_server),
    ).prepare(hold=False)
    pids = []
    run.release(on_start=pids.append)
    run.pid = pids[0]
    return run


def test_runs_are_the_servers_children_and_each_is_reaped_with_its_exit_status(tmp_path):
    bodies = {"exit 0": 0, "exit 7": 7, "echo out; echo err >&2; exit 3": 3}
    if os.geteuid() != 0:  # without a PID namespace a signal ends the script itself
        bodies["kill -KILL $$"] = -signal.SIGKILL

    async def scenario():
        server = fork_server(LAUNCHER)
        assert server is not None
        runs = [
            (body, started(script(tmp_path, body, f"s{k}"), f"reaped-{k}"))
            for k, body in enumerate(list(bodies) * 10)
        ]
        for body, run in runs:
            outcome = await run.finish()
            assert outcome.exit_code == bodies[body], body
            if body.startswith("echo"):
                assert outcome.output_tail == "out\nerr\n"
        assert children_of(server.pid) == []  # every one reaped: no zombie left behind
        return server

    first = asyncio.run(scenario())
    second = asyncio.run(scenario())  # a new loop starts its own server, ending the last
    assert second is not first and not first.alive and children_of(first.pid) == []


def test_a_run_leads_its_own_group_as_soon_as_its_start_returns(tmp_path):
    """The executor fences, cancels and times out a run by killing its
    process group, possibly at once: the server answers only after the
    child has its own session (a clean-clone run killed one whose setsid
    had not happened yet, and missed it)."""

    async def scenario():
        server = fork_server(LAUNCHER)
        for k in range(30):
            run = started(script(tmp_path, "sleep 30", f"s{k}"), f"grouped-{k}")
            os.killpg(run.pid, signal.SIGKILL)  # raises if the group does not exist yet
            outcome = await asyncio.wait_for(run.finish(), 5)
            assert outcome.exit_code == -signal.SIGKILL
        run = started(script(tmp_path, "sleep 30"), "parented")
        assert parent_of(run.pid) == server.pid
        os.killpg(run.pid, signal.SIGKILL)
        assert (await asyncio.wait_for(run.finish(), 5)).exit_code == -signal.SIGKILL
        assert processes_with("MARK=grouped-") == processes_with("MARK=parented") == []

    asyncio.run(scenario())


def test_runs_die_with_their_server_and_are_reported_killed_then_a_new_server_starts(tmp_path):
    async def scenario():
        run = started(script(tmp_path, "sleep 600"), "orphaned")
        server = fork_server(LAUNCHER)
        deadline = asyncio.get_running_loop().time() + 10
        while not processes_with("MARK=orphaned"):  # the script's exec, not only its fork
            assert asyncio.get_running_loop().time() < deadline, "the script never started"
            await asyncio.sleep(0.01)
        os.kill(server.pid, signal.SIGKILL)
        outcome = await asyncio.wait_for(run.finish(), 5)
        assert outcome.exit_code == -signal.SIGKILL and not server.alive
        while processes_with("MARK=orphaned"):  # PR_SET_PDEATHSIG, then the namespace's end
            assert asyncio.get_running_loop().time() < deadline, "the script outlived its server"
            await asyncio.sleep(0.01)
        again = started(script(tmp_path, "echo again", "again"), "after")
        assert (await again.finish()).output_tail == "again\n"
        assert fork_server(LAUNCHER).pid != server.pid

    asyncio.run(scenario())


def test_a_start_too_large_to_send_goes_through_popen_and_the_others_keep_running(tmp_path):
    """Variables may reach 64 × 4 KiB, more than one datagram to the server
    holds: that run starts through Popen, and the server, with the runs it
    started, stays up (closing it would have killed them)."""

    async def scenario():
        server = fork_server(LAUNCHER)
        running = started(script(tmp_path, "sleep 30", "long"), "survivor")
        big = ScriptRun(
            script_path=script(tmp_path, 'echo "${#V0} ${#V63}"', "big"),
            interpreter=Interpreter.BASH,
            variables={f"V{k}": "x" * 4096 for k in range(64)},
            timeout_s=10,
            limits=SandboxLimits(),
        ).prepare(hold=False)
        big.release()
        assert (await big.finish()).output_tail == "4096 4096\n"
        assert server.alive and fork_server(LAUNCHER) is server
        assert parent_of(running.pid) == server.pid  # still running, still the server's
        os.killpg(running.pid, signal.SIGKILL)
        assert (await asyncio.wait_for(running.finish(), 5)).exit_code == -signal.SIGKILL

    asyncio.run(scenario())


@pytest.mark.parametrize("fork_server_on", [True, False], ids=["fork server", "Popen"])
def test_both_start_paths_give_the_same_environment_and_directory(tmp_path, fork_server_on):
    async def scenario():
        run = started(
            script(tmp_path, 'echo "$MARK|$PATH|$LANG|$(pwd)|$(id -u)"'),
            "same",
            fork_server=fork_server_on,
        )
        return await run.finish()

    outcome = asyncio.run(scenario())
    mark, path, lang, cwd, uid = outcome.output_tail.strip().split("|")
    assert (mark, path, lang) == ("same", "/usr/local/bin:/usr/bin:/bin", "C.UTF-8")
    if os.geteuid() == 0:  # its own tmpfs and its own uid
        assert cwd == "/tmp" and uid != "0"
