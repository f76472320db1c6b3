"""A cgroup per run, on this host's real cgroups (v1 here: the memory, pids
and cpu hierarchies; the v2 path runs where the unified tree is writable)."""

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from actors.cgroups import ROOT, CgroupMode, detect
from actors.sandbox import SandboxLimits, cgroup_support, nice_for, run_script
from scheduling.lifecycle import classify
from scheduling.models import FailureClass, Interpreter
from tests.unit.fakes import processes_with

SUPPORT = cgroup_support(SandboxLimits()) if os.geteuid() == 0 else None
needs_cgroups = pytest.mark.skipif(
    SUPPORT is None or SUPPORT.mode is CgroupMode.NONE,
    reason="no writable cgroups here (needs root and cgroup v1 or a delegated v2 subtree)",
)
V2 = (ROOT / "cgroup.controllers").exists()


def run(tmp_path: Path, body: str, limits: SandboxLimits, *, interpreter=Interpreter.BASH, **kw):
    script = tmp_path / "script"
    script.write_text(body)
    script.chmod(0o644)
    return asyncio.run(
        run_script(
            script_path=script,
            interpreter=interpreter,
            variables=kw.get("variables", {}),
            timeout_s=kw.get("timeout_s", 20.0),
            limits=limits,
        )
    )


def leftovers() -> list[Path]:
    """This process's run cgroups with a process still in them (not those
    of executors elsewhere on the host). Empty ones stay, for the next run
    (the pool), but only this many."""
    mine = f"executor-{os.getpid()}/run-*"
    runs = [p for parent in SUPPORT.parents for p in parent.glob(mine)]
    assert len(runs) <= len(SUPPORT.parents) * 64
    return [run for run in runs if (run / "cgroup.procs").read_text().split()]


READ_OWN_LIMITS_V1 = """
for controller in memory pids; do
  path=$(grep -E "^[0-9]+:([a-z,]*,)?$controller(,[a-z,]*)?:" /proc/self/cgroup | cut -d: -f3)
  case $controller in
    memory) cat /sys/fs/cgroup/memory$path/memory.limit_in_bytes ;;
    pids) cat /sys/fs/cgroup/pids$path/pids.max ;;
  esac
done
cut -d' ' -f19 /proc/self/stat
"""
READ_OWN_LIMITS_V2 = """
path=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)
cat $path/memory.max $path/pids.max
cut -d' ' -f19 /proc/self/stat
"""


@needs_cgroups
def test_each_run_is_in_a_cgroup_of_its_own_with_the_tiers_limits(tmp_path):
    limits = SandboxLimits(memory_mb=300, processes=77, cpu_weight=100)
    outcome = run(tmp_path, READ_OWN_LIMITS_V2 if V2 else READ_OWN_LIMITS_V1, limits)
    memory, pids, nice = outcome.output_tail.split()
    assert (int(memory), int(pids)) == (300 * 1024 * 1024, 77)
    assert int(nice) == nice_for(100) == 6  # the tier's CPU weight: a quarter of the strongest
    assert leftovers() == []


@needs_cgroups
def test_resident_memory_beyond_the_tier_is_killed_and_classed_memory(tmp_path):
    body = "import time\nheld = [b'x' * (1 << 20) for _ in range(2048)]\ntime.sleep(60)"
    outcome = run(tmp_path, body, SandboxLimits(memory_mb=256), interpreter=Interpreter.PYTHON)
    assert outcome.oom_killed and not outcome.timed_out
    failure = classify(
        exit_code=outcome.exit_code,
        timed_out=outcome.timed_out,
        output_tail=outcome.output_tail,
        launch_error=outcome.launch_error,
        oom_killed=outcome.oom_killed,
    )
    assert failure is FailureClass.MEMORY
    assert leftovers() == []


@needs_cgroups
def test_a_runtime_that_reserves_much_and_uses_little_is_not_refused(tmp_path):
    """Under the address-space rlimit this 4 GB reservation failed at once."""
    body = "import mmap\nm = mmap.mmap(-1, 4 << 30)\nm[0:1] = b'x'\nprint('reserved')"
    outcome = run(tmp_path, body, SandboxLimits(memory_mb=256), interpreter=Interpreter.PYTHON)
    assert outcome.exit_code == 0 and "reserved" in outcome.output_tail


@needs_cgroups
def test_the_process_limit_holds_a_fork_bomb_where_no_rlimit_applies(tmp_path):
    """As root, RLIMIT_NPROC does not apply: only the cgroup holds."""
    limits = SandboxLimits(run_as=None, uid_base=None, processes=40)
    body = (
        "import os, time\n"
        "alive = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        alive += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print(alive, flush=True)\n"
    )
    outcome = run(tmp_path, body, limits, interpreter=Interpreter.PYTHON, timeout_s=10.0)
    alive = int(outcome.output_tail.split()[-1])
    assert 0 < alive < 40
    assert leftovers() == []


@needs_cgroups
def test_ending_a_run_kills_its_cgroup_so_no_setsid_escape_survives(tmp_path):
    """No PID namespace and no per-run uid: the cgroup alone ends the escape."""
    limits = SandboxLimits(run_as=None, uid_base=None, pid_namespace=False)
    body = "(setsid sleep 600 &) ; (setsid bash -c 'trap \"\" TERM HUP; sleep 600' &) ; true"
    run(tmp_path, body, limits, variables={"MARK": "cgroup-escape"})
    time.sleep(0.2)
    assert processes_with("MARK=cgroup-escape") == []
    assert leftovers() == []


@pytest.mark.skipif(
    not V2 or os.geteuid() != 0, reason="cgroup v2 is not this host's hierarchy (it has v1)"
)
def test_the_v2_subtree_is_delegated_with_memory_pids_and_cpu(tmp_path):
    support = detect(str(ROOT / "chronoray-test"))
    assert support.mode is CgroupMode.V2
    limits = replace(SandboxLimits(), cgroup_v2_root=str(ROOT / "chronoray-test"))
    outcome = run(tmp_path, READ_OWN_LIMITS_V2, limits)
    assert outcome.output_tail.split()[:2] == [str(1024 * 1024 * 1024), "256"]


DISK_FILLER = """
for place in /tmp /var/tmp /dev/shm "$HOME"; do
  head -c 100000000 /dev/zero > "$place/fill" 2>/dev/null || echo "$place full"
  rm -f "$place/fill"
done
echo pwd=$(pwd)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or SUPPORT is None, reason="the scratch tmpfs needs root and the launcher"
)
def test_writing_past_the_scratch_quota_fails_with_enospc_everywhere_the_script_may_write(
    tmp_path,
):
    outcome = run(tmp_path, DISK_FILLER, SandboxLimits(scratch_mb=32))
    assert outcome.exit_code == 0, outcome.output_tail
    assert outcome.output_tail.split() == [
        "/tmp",
        "full",
        "/var/tmp",
        "full",
        "/dev/shm",
        "full",
        "/tmp",
        "full",
        "pwd=/tmp",
    ]
    # the host's /tmp saw none of it
    assert not list(Path("/tmp").glob("fill")) and not Path("/var/tmp/fill").exists()


@needs_cgroups
def test_run_cgroups_are_used_again_and_those_of_gone_executors_removed(tmp_path):
    from actors.cgroups import CgroupPool, RunLimits

    pool = CgroupPool(SUPPORT, keep=2)
    limits = RunLimits(memory_bytes=64 << 20, processes=10)
    first = pool.acquire(limits)
    assert pool.release(first) and pool.acquire(limits) is first  # the same cgroup again
    pool.release(first)
    gone = SUPPORT.parents[0] / "executor-999999999"  # no such process
    (gone / "run-x").mkdir(parents=True)
    CgroupPool(SUPPORT)
    assert not gone.exists()


BUSY_ON_CPU_0 = """
taskset -c 0 python3 -c '
import os, time
end = time.time() + 4
while time.time() < end:
    pass
times = os.times()
print(f"{times.user + times.system:.3f}")
'
"""
AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


needs_autogroup = pytest.mark.skipif(
    not AUTOGROUP.exists() or AUTOGROUP.read_text().strip() != "1",
    reason="the tier's weight is its scripts' session autogroup nice: needs autogroup",
)


@needs_autogroup
def test_a_script_session_takes_its_tiers_weight_after_its_start(tmp_path):
    body = "cat /proc/self/autogroup; sleep 1; cat /proc/self/autogroup"
    outcome = run(tmp_path, body, SandboxLimits(cpu_weight=100))
    first, later = outcome.output_tail.splitlines()
    assert first.endswith("nice 0") and later.endswith(f"nice {nice_for(100)}"), outcome
    assert first.split()[0] == later.split()[0]  # one session's autogroup, weighed


@needs_autogroup
def test_tier_cpu_weights_hold_between_busy_scripts(tmp_path):
    """Two scripts busy on one CPU at once for 4 s, of weight 100 and 400:
    the stronger gets about four times the CPU once both have started
    (each runs in a session of its own, so the weight is its session's, not
    its process's nice; the first 0.5 s both weigh as any session)."""

    async def both():
        async def busy(weight: int, name: str):
            script = tmp_path / name
            script.write_text(BUSY_ON_CPU_0)
            script.chmod(0o644)
            return await run_script(
                script_path=script,
                interpreter=Interpreter.BASH,
                variables={},
                timeout_s=20,
                limits=SandboxLimits(cpu_weight=weight),
            )

        return await asyncio.gather(busy(100, "weak"), busy(400, "strong"))

    weak, strong = asyncio.run(both())
    weak_s, strong_s = float(weak.output_tail), float(strong.output_tail)
    print(f"CPU seconds in 4 s on one CPU: weight 100 {weak_s}, weight 400 {strong_s}")
    assert strong_s > 2.5 * weak_s, (weak_s, strong_s)
