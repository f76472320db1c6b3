"""Run one script in a subprocess: its own session and process group, PID
namespace and uid; a cgroup (memory, processes, CPU weight); a size-limited
tmpfs as its only writable place; the network its tier allows; variables as
environment (never through a shell); rlimits; captured output; and a timeout
that kills the whole group."""

from __future__ import annotations

import asyncio
import fcntl
import functools
import hashlib
import logging
import math
import os
import pwd
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from actors.cgroups import CgroupMode, CgroupSupport, RunLimits, pool_for
from actors.cgroups import detect as detect_cgroups
from actors.fork_server import HOLD_FD, fork_server
from actors.network import UID_RANGE_INDEX, ControlPlane, install_egress_filter
from scheduling.models import Interpreter
from scheduling.tiers import NetworkPolicy

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
MiB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """What one script may use, and as whom it runs when the executor is
    root: by default each running script gets a uid of its own, from a
    range of ``uid_count`` uids per network policy starting at ``uid_base``
    (no account needed), so the per-user process limit is per script,
    scripts cannot signal each other, and the egress filter knows them by
    uid; ``run_as`` names one shared user instead; with neither, scripts
    keep the executor's user."""

    # resident memory of the whole process tree (a cgroup); where no cgroup
    # can be made, the address space instead (an allocation beyond it fails)
    memory_mb: int = 1024
    file_size_mb: int = 256  # largest file the script may write
    # all the script may write: a tmpfs of this size is its /tmp (also its
    # /var/tmp, /dev/shm and home); needs root and the launcher, else a
    # scratch directory on disk with the per-file limit only
    scratch_mb: int = 256
    open_files: int = 256
    processes: int = 256  # per user: a fork bomb hits this, then the timeout
    output_bytes: int = 4096  # tail of stdout+stderr kept
    uid_base: int | None = 900_000_000
    uid_count: int = 4096
    run_as: str | None = "nobody"
    pid_namespace: bool = True  # off: only the process group is killed (setsid escapes survive)
    launcher: bool = True  # off: util-linux wrappers even when actors/launch.c can be built
    fork_server: bool = True  # off: each run is a Popen of the launcher (actors/fork_server.py)
    network: NetworkPolicy = NetworkPolicy.EGRESS  # what the script reaches (actors/network.py)
    cgroups: bool = True  # off: rlimits only, even where a cgroup could be made
    cgroup_v2_root: str = "/sys/fs/cgroup/chronoray"
    cpu_weight: int = 100  # the script's CPU share by tier, as a nice value (see nice_for)

    def uid_range(self) -> tuple[int, int] | None:
        """The per-run uids of this limits' network policy (first, last)."""
        if self.uid_base is None:
            return None
        first = self.uid_base + UID_RANGE_INDEX[self.network] * self.uid_count
        return first, first + self.uid_count - 1


@dataclass(frozen=True, kw_only=True)
class ScriptOutcome:
    started_at: datetime | None
    finished_at: datetime
    exit_code: int | None
    output_tail: str
    timed_out: bool = False
    launch_error: str | None = None
    oom_killed: bool = False  # by the run cgroup's own OOM count
    oom_known: bool = False  # the run had a cgroup: oom_killed is its count, not a guess


def interpreter_command(interpreter: Interpreter) -> list[str]:
    """The system's interpreters (the scripts' own PATH), not the executor's
    virtualenv: scripts neither see chronoray's packages nor need access to
    where they are installed."""
    if interpreter is Interpreter.PYTHON:
        return [shutil.which("python3", path=SAFE_PATH) or sys.executable, "-u"]
    return [shutil.which(interpreter.value, path=SAFE_PATH) or f"/bin/{interpreter.value}"]


FULL_CPU_WEIGHT = 400
# A script's session takes its tier's weight this long after its launch: it
# starts at the weight of any session, so a weak tier's start is as quick.
SESSION_WEIGHT_AFTER_S = 0.5


def weigh_session(pid: int, cpu_weight: int) -> bool:
    """Give the session led by ``pid`` the tier's CPU weight as its
    autogroup nice (``nice_for``). Where the kernel groups each session for
    scheduling (autogroup), this, not a process's nice, is what weighs the
    script tree against everything else. False where it cannot."""
    nice = nice_for(cpu_weight)
    if nice == 0 or not AUTOGROUP_ON:
        return False
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
        return True
    except OSError:  # gone already, or not ours to change
        return False


def nice_for(cpu_weight: int) -> int:
    """The tier's CPU weight as a nice value: the strongest weight (400) runs
    at 0, beside the control plane, and each halving adds 3 (the kernel's
    weight per nice step is 1.25x, so 3 steps are about 2x), up to 19."""
    steps = 3 * math.log2(FULL_CPU_WEIGHT / max(1, cpu_weight))
    return max(0, min(19, round(steps)))


def _limits(timeout_s: float, limits: SandboxLimits, *, in_cgroup: bool) -> dict[str, int]:
    found = {
        "cpu": math.ceil(timeout_s) + 1,
        "fsize": limits.file_size_mb * MiB,
        "nofile": limits.open_files,
        "nproc": limits.processes,
        "core": 0,
    }
    # Only without a cgroup, which bounds resident memory: an address-space
    # limit refuses runtimes that reserve much and use little (JVM, Go).
    return found if in_cgroup else {**found, "as": limits.memory_mb * MiB}


@dataclass(frozen=True)
class Isolation:
    """What this host lets the executor do, found once at start-up.

    ``pid_namespace``: each script runs as PID 1 of its own namespace
    (util-linux ``unshare``; needs root or CAP_SYS_ADMIN). Ending PID 1 ends
    every process in it, so a double-forked ``setsid`` child cannot outlive
    its script. Without it only the script's process group is killed and
    such an escape survives; the executor logs this at start.
    ``uid``/``gid``: the unprivileged user scripts run as (root only)."""

    pid_namespace: bool
    uid: int | None
    gid: int | None
    launcher: str | None = None  # the compiled actors/launch.c, when a C compiler was found

    def as_user(self, uid: int | None) -> "Isolation":
        return self if uid is None else replace(self, uid=uid, gid=uid)

    def wrap(
        self,
        command: list[str],
        *,
        timeout_s: float,
        limits: SandboxLimits,
        cgroup_procs: Sequence[str] = (),
        scratch_bytes: int = 0,
        hold_fd: int | None = None,
    ) -> list[str]:
        """Limits hold from the script's first instruction: set by a wrapper
        process, not a ``preexec_fn``, which would force a full fork of the
        large executor process (154 spawns/s against 767/s measured here)."""
        flags = [
            f"--{name}={value}"
            for name, value in _limits(timeout_s, limits, in_cgroup=bool(cgroup_procs)).items()
        ]
        isolated_network = limits.network is NetworkPolicy.NONE
        nice = nice_for(limits.cpu_weight)
        if self.launcher is not None:  # one exec does it all
            user = [] if self.uid is None else [f"--uid={self.uid}", f"--gid={self.gid}"]
            namespace = ["--pidns"] if self.pid_namespace else []
            if isolated_network:
                namespace.append("--netns")
            joins = [f"--cgroup={procs}" for procs in cgroup_procs]
            if scratch_bytes:
                namespace.append(f"--scratch={scratch_bytes}")
            namespace.append(f"--nice={nice}")
            if hold_fd is not None:
                namespace.append(f"--hold={hold_fd}")
            return [self.launcher, *joins, *namespace, *user, *flags, "--", *command]
        if hold_fd is not None:
            raise ValueError("only the compiled launcher can hold a run")
        wrapped = [PRLIMIT, *flags, "--", NICE, "-n", str(nice), *command]
        if self.pid_namespace:
            # unshare drops to the user itself (groups cleared, no
            # capabilities): one exec fewer than a separate setpriv.
            user = [] if self.uid is None else [f"--setuid={self.uid}", f"--setgid={self.gid}"]
            wrapped = [UNSHARE, "--pid", "--fork", "--kill-child", *user, "--", *wrapped]
        elif self.uid is not None:
            wrapped = [
                SETPRIV,
                f"--reuid={self.uid}",
                f"--regid={self.gid}",
                "--clear-groups",
                "--",
                *wrapped,
            ]
        if isolated_network:  # util-linux leaves the new namespace's loopback down
            wrapped = [UNSHARE, "--net", "--", *wrapped]
        if cgroup_procs:  # one shell joins the run's cgroups, then becomes the chain
            joins = "; ".join(f"echo $$ > {shlex.quote(p)}" for p in cgroup_procs)
            wrapped = [SH, "-c", f'{joins} && exec "$@"', "sh", *wrapped]
        # If the executor dies (SIGKILL, node loss), its scripts die with it:
        # a dead executor must not finish an attempt that is retried elsewhere.
        return [SETPRIV, "--pdeathsig=KILL", "--", *wrapped]


PRLIMIT = shutil.which("prlimit") or "/usr/bin/prlimit"
AUTOGROUP_FILE = Path("/proc/sys/kernel/sched_autogroup_enabled")
AUTOGROUP_ON = AUTOGROUP_FILE.exists() and AUTOGROUP_FILE.read_text().strip() == "1"
SH = "/bin/sh"
NICE = shutil.which("nice") or "/usr/bin/nice"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"


LAUNCH_SOURCE = Path(__file__).with_name("launch.c")


@functools.lru_cache(maxsize=1)
def compiled_launcher() -> str | None:
    """Build actors/launch.c once per source version into a directory only
    this user can write (root executes it); ``None`` without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not LAUNCH_SOURCE.exists():
        log.info("no C compiler: scripts start through util-linux wrappers")
        return None
    source = LAUNCH_SOURCE.read_bytes()
    directory = Path(tempfile.gettempdir()) / f"chronoray-bin-{os.geteuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        log.warning("%s is not private: not using a launcher built there", directory)
        return None
    target = directory / f"chronoray-launch-{hashlib.sha256(source).hexdigest()[:12]}"
    if not target.exists():
        partial = directory / f"{target.name}.{os.getpid()}.tmp"
        built = subprocess.run(
            [compiler, "-O2", "-o", str(partial), str(LAUNCH_SOURCE)],
            capture_output=True,
            timeout=120,
        )
        if built.returncode != 0:
            log.warning("launch.c did not compile: %s", built.stderr.decode()[-500:])
            return None
        os.replace(partial, target)
    return str(target)


@functools.lru_cache(maxsize=8)
def detect_isolation(
    run_as: str | None, want_namespace: bool = True, want_launcher: bool = True
) -> Isolation:
    uid = gid = None
    if run_as and os.geteuid() == 0:
        entry = pwd.getpwnam(run_as)
        uid, gid = entry.pw_uid, entry.pw_gid
    pid_namespace = False
    if want_namespace:
        try:
            probe = subprocess.run(
                [UNSHARE, "--pid", "--fork", "--kill-child", "--", "true"],
                capture_output=True,
                timeout=10,
            )
            pid_namespace = probe.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            pid_namespace = False
    if want_namespace and not pid_namespace:
        log.warning(
            "no PID namespace for scripts (unshare refused): a timeout kills the "
            "script's process group, but a setsid escape can outlive it"
        )
    launcher = compiled_launcher() if want_launcher else None
    return Isolation(pid_namespace=pid_namespace, uid=uid, gid=gid, launcher=launcher)


def cgroup_support(limits: SandboxLimits) -> CgroupSupport:
    if not limits.cgroups:
        return CgroupSupport(CgroupMode.NONE)
    return detect_cgroups(limits.cgroup_v2_root)


def prepare_network(limits: SandboxLimits, plane: ControlPlane) -> str:
    """Make the limits' network policy hold before the first run (the egress
    filter is host-wide and idempotent); returns what holds, for the logs and
    the executor's info. What cannot hold is said, not hidden."""
    isolation = detect_isolation(limits.run_as, limits.pid_namespace, limits.launcher)
    if limits.network is NetworkPolicy.HOST:
        return "host"
    if limits.network is NetworkPolicy.NONE:
        if os.geteuid() != 0:
            log.warning("network none needs root: scripts will fail to start")
            return "none (not available: not root)"
        return "none"
    uids = limits.uid_range() if isolation.uid is not None else None
    if uids is None and isolation.uid is not None:
        uids = (isolation.uid, isolation.uid)  # one shared user for every script
    if uids is None:
        log.warning("egress unfiltered: scripts run as the executor's own user")
        return "egress (unfiltered: scripts run as the executor's user)"
    if not install_egress_filter(plane, *uids):
        return "egress (unfiltered: the packet filter could not be installed)"
    return "egress"


class _Child:
    """A started run, watched from the event loop: its exit (a future of its
    exit code) and its non-blocking output pipe. Started by the fork server
    (actors/fork_server.py), which reports its end, or by ``Popen`` (vfork +
    exec: cheap even from a large process; the event loop's own spawn forks
    the whole executor, which measured as its main cost), watched through a
    pidfd and reaped here."""

    def __init__(
        self, pid: int, output_fd: int, exited: asyncio.Future[int], output_limit: int
    ) -> None:
        self.pid = pid
        self._limit = output_limit
        self._kept = bytearray()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.output_done = loop.create_future()
        self.exited = exited
        self._out = output_fd
        os.set_blocking(self._out, False)
        loop.add_reader(self._out, self._on_output)

    @classmethod
    def popen(cls, proc: subprocess.Popen, output_fd: int, output_limit: int) -> "_Child":
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[int] = loop.create_future()
        pidfd = os.pidfd_open(proc.pid)

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            exited.set_result(proc.wait())  # reaps at once: the pidfd said it exited

        loop.add_reader(pidfd, on_exit)
        return cls(proc.pid, output_fd, exited, output_limit)

    def _on_output(self) -> None:
        try:
            chunk = os.read(self._out, 65536)
        except BlockingIOError:
            return
        if chunk:
            self._kept += chunk
            if len(self._kept) > 2 * self._limit:
                del self._kept[: -self._limit]
            return
        self._stop_reading()

    def _stop_reading(self) -> None:
        if not self.output_done.done():
            self._loop.remove_reader(self._out)
            os.close(self._out)
            self.output_done.set_result(None)

    def output(self) -> bytes:
        return bytes(self._kept[-self._limit :])

    def abandon_output(self) -> None:
        self._stop_reading()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own group
    except ProcessLookupError:
        pass


def kill_user(uid: int) -> int:
    """SIGKILL every process of this (per-run) uid; returns how many."""
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        uid_line = next((line for line in status.splitlines() if line.startswith("Uid:")), "")
        if uid_line.split()[1:2] == [str(uid)]:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


class UidLeases:
    """Hands out uids from a range, one per running script, host-wide: an
    ``flock`` on a file per uid (released by the kernel if the holder dies),
    so executors on one machine never share a uid."""

    def __init__(self, base: int, count: int, directory: Path) -> None:
        self._base, self._count, self._directory = base, count, directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._held: dict[int, int] = {}  # uid -> open, locked fd

    def acquire(self) -> int:
        start = random.randrange(self._count)
        for i in range(self._count):
            uid = self._base + (start + i) % self._count
            if uid in self._held:
                continue
            fd = os.open(self._directory / str(uid), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._held[uid] = fd
            return uid
        raise OSError(f"all {self._count} sandbox uids are in use")

    def release(self, uid: int) -> None:
        fd = self._held.pop(uid, None)
        if fd is not None:
            os.close(fd)  # closing drops the lock


@functools.lru_cache(maxsize=4)
def uid_leases(base: int, count: int) -> UidLeases:
    return UidLeases(base, count, Path(tempfile.gettempdir()) / "chronoray-uids")


# A held bash run is bash itself, started before the instant with its script
# argument a pipe the executor keeps (/dev/fd/FD) and the real script after
# it: bash's start-up (exec, loading, initialisation: most of a short run's
# cost) is paid during the lead and it waits in its first read. On the go the
# executor writes this line and closes the pipe: bash closes the pipe, takes
# the script's name as $0 and sources the script, whose first line follows
# within microseconds. A discard or a dead executor closes the pipe with
# nothing written: an empty script, and bash exits having run nothing. The
# script is sourced, not executed: a top-level `return` ends it instead of
# failing, and BASH_SOURCE and FUNCNAME have one entry more.
HELD_BASH_GO = 'exec {fd}<&-; BASH_ARGV0=$1; shift; . "$0"\n'


class ScriptRun:
    """One run of a script in its sandbox, in steps, so that its start-up
    can be paid before its due instant. ``prepare`` takes the run's uid,
    cgroup and scratch and, where the compiled launcher is in use, starts
    it held: every wall is up and only the interpreter's exec is left, which
    waits on a pipe. ``release`` lets it go (or starts it there, where
    nothing could be held); ``finish`` waits for its end and frees what it
    took; ``discard`` ends a run that must not run: a held launcher reads
    end of file and exits without exec'ing anything."""

    def __init__(
        self,
        *,
        script_path: Path,
        interpreter: Interpreter,
        variables: Mapping[str, str],
        timeout_s: float,
        limits: SandboxLimits,
    ) -> None:
        self._timeout_s = timeout_s
        self._limits = limits
        self._isolation = detect_isolation(limits.run_as, limits.pid_namespace, limits.launcher)
        self._leases: UidLeases | None = None
        self._pool = None
        self._cgroup = None
        self._scratch: str | None = None
        self._quota = 0
        self._command = [*interpreter_command(interpreter), str(script_path)]
        # bash can be held after its own start-up (HELD_BASH_GO), unless the
        # task names a BASH_ENV: bash would source that during the hold,
        # before the start gate, so such a run waits in the launcher
        self._hold_in_shell = interpreter is Interpreter.BASH and "BASH_ENV" not in variables
        self._variables = dict(variables)
        self._child: _Child | None = None
        self._go: int | None = None  # the write end of a held run's pipe
        self._go_message = b"g"  # what releases it
        self.started_at: datetime | None = None
        self.launch_error: str | None = None
        self.closed = False

    @property
    def held(self) -> bool:
        return self._go is not None

    def prepare(self, *, hold: bool = True) -> "ScriptRun":
        """Take the run's sandbox; with ``hold``, start the launcher up to
        the script's exec (only with the compiled launcher)."""
        try:
            self._take_sandbox()
        except BaseException:
            self._close()  # give back what was taken before the failure
            raise
        if hold and self._isolation.launcher is not None:
            self._spawn(hold=True)
        return self

    def _take_sandbox(self) -> None:
        limits, isolation = self._limits, self._isolation
        uid_range = limits.uid_range()
        if isolation.uid is not None and uid_range is not None:
            self._leases = uid_leases(uid_range[0], limits.uid_count)
            isolation = self._isolation = isolation.as_user(self._leases.acquire())
        support = cgroup_support(limits)
        self._pool = pool_for(support) if support.mode is not CgroupMode.NONE else None
        if self._pool is not None:
            try:
                self._cgroup = self._pool.acquire(
                    RunLimits(memory_bytes=limits.memory_mb * MiB, processes=limits.processes)
                )
            except OSError:
                log.exception("no cgroup for this run: its rlimits alone hold it")
        # A tmpfs of the tier's size where the launcher can mount one (root);
        # else a directory on disk, removed afterwards.
        self._quota = limits.scratch_mb * MiB if isolation.launcher and os.geteuid() == 0 else 0
        if not self._quota:
            self._scratch = tempfile.mkdtemp(prefix="chronoray-run-")
            if isolation.uid is not None:
                os.chown(self._scratch, isolation.uid, isolation.gid)

    def _spawn(self, *, hold: bool) -> None:
        if not os.access(self._command[0], os.X_OK):
            self.launch_error = f"FileNotFoundError: interpreter {self._command[0]} not found"
            return
        home = self._scratch or "/tmp"
        env = {"PATH": SAFE_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        env.update(self._variables)
        cwd = self._scratch or "/"
        wait_on = None
        if hold:
            wait_on, self._go = os.pipe()
            if self._hold_in_shell:  # bash opens it again, as /dev/fd/N, as the run's uid
                os.fchmod(wait_on, 0o444)
        output, output_end = os.pipe()
        try:
            launched = self._through_server(env, cwd, output_end, wait_on)
            if launched is None:
                # vfork + exec returns in microseconds; see _Child for why not asyncio's spawn
                proc = subprocess.Popen(
                    self._wrap(hold_fd=wait_on),
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output_end,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=() if wait_on is None else (wait_on,),
                )
                self._child = _Child.popen(proc, output, self._limits.output_bytes)
            else:
                pid, exited = launched
                self._child = _Child(pid, output, exited, self._limits.output_bytes)
        except OSError as exc:
            self.launch_error = f"{type(exc).__name__}: {exc}"
            self._close_go()
            os.close(output)
            return
        finally:
            os.close(output_end)
            if wait_on is not None:
                os.close(wait_on)

    def _wrap(self, *, hold_fd: int | None) -> list[str]:
        """The launcher's command line; a held run waits on ``hold_fd``:
        bash after its own start-up (``HELD_BASH_GO``), any other
        interpreter in the launcher, before its exec."""
        command = self._command
        if hold_fd is not None and self._hold_in_shell:
            command = [command[0], f"/dev/fd/{hold_fd}", *command[1:]]
            self._go_message = HELD_BASH_GO.format(fd=hold_fd).encode()
            hold_fd = None  # the launcher execs bash at once
        return self._isolation.wrap(
            command,
            timeout_s=self._timeout_s,
            limits=self._limits,
            cgroup_procs=self._cgroup.procs_files() if self._cgroup else (),
            scratch_bytes=self._quota,
            hold_fd=hold_fd,
        )

    def _through_server(
        self, env: Mapping[str, str], cwd: str, output_end: int, wait_on: int | None
    ) -> tuple[int, asyncio.Future[int]] | None:
        """Start the run through this executor's fork server; ``None`` where
        there is none (then ``Popen`` starts it)."""
        launcher = self._isolation.launcher
        if launcher is None or not self._limits.fork_server:
            return None
        server = fork_server(launcher)
        if server is None:
            return None
        hold_fd = None if wait_on is None else HOLD_FD
        try:
            return server.spawn(
                self._wrap(hold_fd=hold_fd), env=env, cwd=cwd, output_fd=output_end, hold_fd=wait_on
            )
        except OSError as exc:
            log.warning("the fork server did not start a run (%s): starting it through Popen", exc)
            return None

    def release(self, on_start: Callable[[int], None] | None = None) -> None:
        """Let the script run now; ``on_start`` gets its process group."""
        self.started_at = datetime.now(timezone.utc)
        if self._go is not None:
            try:
                os.write(self._go, self._go_message)  # shorter than PIPE_BUF: never blocks
            except BrokenPipeError:
                pass  # the launcher died before its release: finish reports how
            self._close_go()
        elif self._child is None and self.launch_error is None:
            self._spawn(hold=False)
        if self._child is not None and on_start is not None:
            on_start(self._child.pid)

    def _close_go(self) -> None:
        if self._go is not None:
            os.close(self._go)
            self._go = None

    def discard(self) -> None:
        """End this run before or instead of its release: a held launcher
        sees end of file and runs nothing; whatever started is killed."""
        self._close_go()
        if self._child is not None:
            kill_group(self._child.pid)
        if self._child is not None:
            self._child.abandon_output()  # its pidfd reader still reaps it
        self._close()

    async def finish(self) -> ScriptOutcome:
        """Wait for the released script's end (or its timeout) and free its
        sandbox. Cancelled: the script is killed."""
        try:
            if self._child is None or self.started_at is None:
                return ScriptOutcome(
                    started_at=None,
                    finished_at=datetime.now(timezone.utc),
                    exit_code=None,
                    output_tail="",
                    launch_error=self.launch_error or "the run was never released",
                )
            return await self._wait(self._child)
        finally:
            self._close()

    async def _wait(self, child: _Child) -> ScriptOutcome:
        limits, isolation = self._limits, self._isolation
        weighed = asyncio.get_running_loop().call_later(
            SESSION_WEIGHT_AFTER_S, weigh_session, child.pid, limits.cpu_weight
        )
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(child.exited), timeout=self._timeout_s)
        except asyncio.TimeoutError:
            timed_out = True
        except asyncio.CancelledError:  # the attempt was cancelled: stop the script
            kill_group(child.pid)
            child.abandon_output()
            raise
        finally:
            weighed.cancel()
        # Grandchildren may still run: end the group (and with it the PID
        # namespace, whose PID 1 is in the group).
        kill_group(child.pid)
        if self._leases is not None and not isolation.pid_namespace:
            kill_user(isolation.uid)  # without a namespace: setsid escapes, by their uid
        exit_code = await child.exited
        try:
            await asyncio.wait_for(asyncio.shield(child.output_done), timeout=1.0)
        except asyncio.TimeoutError:
            child.abandon_output()
        oom_killed = oom_known = False
        if self._pool is not None and self._cgroup is not None:
            oom_killed, oom_known = self._cgroup.oom_killed(), True
            held, self._cgroup = self._cgroup, None
            if not self._pool.release(held):  # something escaped the group: it dies here
                await asyncio.to_thread(self._pool.settle, held)
        return ScriptOutcome(
            started_at=self.started_at,
            finished_at=datetime.now(timezone.utc),
            exit_code=exit_code,
            output_tail=child.output().decode("utf-8", errors="replace"),
            timed_out=timed_out,
            oom_killed=oom_killed,
            oom_known=oom_known,
        )

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._close_go()
        if self._pool is not None and self._cgroup is not None:  # not ended through _wait
            self._pool.settle(self._cgroup)
            self._cgroup = None
        if self._scratch is not None:
            try:
                os.rmdir(self._scratch)  # the common case: the script left nothing
            except OSError:
                shutil.rmtree(self._scratch, ignore_errors=True)
        if self._leases is not None:
            self._leases.release(self._isolation.uid)  # its processes are gone with the namespace


async def run_script(
    *,
    script_path: Path,
    interpreter: Interpreter,
    variables: Mapping[str, str],
    timeout_s: float,
    limits: SandboxLimits = SandboxLimits(),
    on_start: Callable[[int], None] | None = None,
) -> ScriptOutcome:
    """Run the script now, to its end or its timeout. ``on_start`` gets the
    process group id, for a caller that may have to kill it early."""
    run = ScriptRun(
        script_path=script_path,
        interpreter=interpreter,
        variables=variables,
        timeout_s=timeout_s,
        limits=limits,
    ).prepare(hold=False)
    run.release(on_start)
    return await run.finish()
