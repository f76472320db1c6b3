"""A cgroup per run: resident memory of the script's whole process tree,
and its number of processes. The launcher moves
itself into the run's cgroups before it starts the script (so everything
the script starts is inside); the executor reads the cgroup's own OOM
count afterwards, kills whatever is left in it, and removes it.

cgroup v1 (separate ``memory`` and ``pids`` hierarchies, writable by root)
nests run cgroups under the executor's own cgroup in each hierarchy. cgroup
v2 (one unified tree) needs a subtree where the memory and pids controllers
are delegated: ``/sys/fs/cgroup/chronoray`` by
default (``CHRONORAY_CGROUP_V2_ROOT``). Where neither can be written, runs
keep the rlimits alone (``detect`` says which, once, at executor start).

No cpu cgroup; the tier's CPU weight is its scripts' session autogroup
nice, set half a second after launch (``actors.sandbox.weigh_session``).
Three cpu-cgroup layouts were measured and dropped: a cgroup
per run under one parent of default weight made the launch → first line
p50 248 ms and p99 4.3 s under chaos scenario 2's load (memory and pids
alone: 43 ms and 374 ms); a group per tier under a parent of 2048, p50
226 ms and p99 1.8 s (in v1 that parent weighs every script together as
two processes against each control-plane process); a group per executor
beside the control plane weighing one process per slot, p50 19 ms and p99
196 ms (nice: 22 ms and 329 ms), but a fork bomb in it held its executor
off the CPU: the 3 s timeout's kill landed after 3.75-5.2 s instead of
3.05-3.10 s, and executors were declared lost in the hostile test."""

from __future__ import annotations

import enum
import functools
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids")
RUNS = "chronoray-runs"


class CgroupMode(str, enum.Enum):
    V1 = "v1"
    V2 = "v2"
    NONE = "none"


@dataclass(frozen=True)
class CgroupSupport:
    mode: CgroupMode
    parents: tuple[Path, ...] = ()  # where run cgroups are made: one per v1 hierarchy, or one

    def describe(self) -> str:
        if self.mode is CgroupMode.NONE:
            return "no writable cgroups: memory by address-space rlimit only"
        return f"cgroup {self.mode.value} under " + ", ".join(str(p) for p in self.parents)


def _own_v1_path(controller: str) -> str:
    """This process's cgroup in a v1 hierarchy (``/proc/self/cgroup``)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return "/"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(exist_ok=True)
        probe = path / f"probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=4)
def detect(v2_root: str = str(ROOT / "chronoray")) -> CgroupSupport:
    if os.geteuid() != 0:
        return CgroupSupport(CgroupMode.NONE)
    if (ROOT / "cgroup.controllers").exists():  # the unified tree
        parent = Path(v2_root)
        if _writable_dir(parent) and _delegate_v2(parent):
            return CgroupSupport(CgroupMode.V2, (parent,))
        return CgroupSupport(CgroupMode.NONE)
    parents = []
    for controller in V1_CONTROLLERS:
        hierarchy = ROOT / controller
        if not (hierarchy / "cgroup.procs").exists():
            return CgroupSupport(CgroupMode.NONE)
        parent = hierarchy / _own_v1_path(controller).lstrip("/") / RUNS
        if not _writable_dir(parent):
            return CgroupSupport(CgroupMode.NONE)
        parents.append(parent)
    return CgroupSupport(CgroupMode.V1, tuple(parents))


def _delegate_v2(parent: Path) -> bool:
    """Enable memory and pids for the children of ``parent`` (and of its
    parent, which must offer them)."""
    try:
        for node in (parent.parent, parent):
            wanted = {"memory", "pids"}
            offered = set((node / "cgroup.controllers").read_text().split())
            if not wanted <= offered:
                return False
            (node / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class RunLimits:
    memory_bytes: int
    processes: int


class RunCgroup:
    """One run's cgroups (one per v1 hierarchy, or one v2 directory), used
    again by later runs once empty (see ``CgroupPool``)."""

    def __init__(self, parents: tuple[Path, ...], mode: CgroupMode, limits: RunLimits) -> None:
        self.mode = mode
        name = f"run-{uuid.uuid4().hex[:12]}"
        self.paths = tuple(parent / name for parent in parents)
        self.limits: RunLimits | None = None
        made: list[Path] = []
        try:
            for path in self.paths:
                path.mkdir()
                made.append(path)
            # where the kernel counts OOM kills: looked up once, read twice a run
            self._oom_files = tuple(
                path / events
                for path in self.paths
                for events in ("memory.events", "memory.oom_control")
                if (path / events).exists()
            )
            self.prepare(limits)
        except OSError:
            for path in made:
                _remove(path)
            raise

    def prepare(self, limits: RunLimits) -> None:
        """Set the limits (when they changed) and note the OOM count so far."""
        if limits != self.limits:
            for path in self.paths:
                self._limit(path, limits)
            self.limits = limits
        self._ooms_before = self._oom_count()

    def _limit(self, path: Path, limits: RunLimits) -> None:
        if self.mode is CgroupMode.V2:
            (path / "memory.max").write_text(str(limits.memory_bytes))
            _try_write(path / "memory.swap.max", "0")
            (path / "pids.max").write_text(str(limits.processes))
            return
        if (path / "memory.limit_in_bytes").exists():
            # memsw (memory + swap) may never be below the memory limit: when
            # raising both it goes first, when lowering second; try both turns
            memsw = path / "memory.memsw.limit_in_bytes"
            _try_write(memsw, str(limits.memory_bytes))
            (path / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            _try_write(memsw, str(limits.memory_bytes))
            _try_write(path / "memory.swappiness", "0")
        elif (path / "pids.max").exists():
            (path / "pids.max").write_text(str(limits.processes))
        else:
            raise OSError(f"{path}: not a memory or pids cgroup")

    def procs_files(self) -> list[str]:
        """What the launcher writes its pid to (``--cgroup=``)."""
        return [str(path / "cgroup.procs") for path in self.paths]

    def _oom_count(self) -> int:
        for events in self._oom_files:
            for line in _read(events).splitlines():
                key, _, value = line.partition(b" ")
                if key == b"oom_kill":
                    return int(value or 0)
        return 0

    def oom_killed(self) -> bool:
        """The kernel's OOM killer ended a process of this run, by the
        cgroup's own count (not by reading the script's output)."""
        return self._oom_count() > self._ooms_before

    def empty(self) -> bool:
        return not any(_pids(path) for path in self.paths)

    def kill_all(self) -> None:
        for path in self.paths:
            _kill_all(path, self.mode)

    def remove(self) -> None:
        for path in self.paths:
            _remove(path)


class CgroupPool:
    """Run cgroups made once per executor and used again: making and
    removing a memory cgroup for every run cost more than the rest of a
    start (bench/sandbox_start.py). Each executor process has a directory
    of its own under the runs' parent; directories of executors that are
    gone are removed when the next one starts."""

    def __init__(self, support: CgroupSupport, keep: int = 64) -> None:
        self.support = support
        self._keep = keep
        self._free: list[RunCgroup] = []
        own = f"executor-{os.getpid()}"
        for parent in support.parents:
            _remove_abandoned(parent)
        self._parents = tuple(parent / own for parent in support.parents)
        for parent in self._parents:
            parent.mkdir(exist_ok=True)

    def acquire(self, limits: RunLimits) -> RunCgroup:
        while self._free:
            cgroup = self._free.pop()
            try:
                cgroup.prepare(limits)
                return cgroup
            except OSError:
                log.warning("run cgroup %s refused new limits: removed", cgroup.paths[0])
                cgroup.remove()
        return RunCgroup(self._parents, self.support.mode, limits)

    def release(self, cgroup: RunCgroup) -> bool:
        """Take it back if the run left nothing in it (the common case: its
        PID namespace is gone); False: ``settle`` it (it may block)."""
        if not cgroup.empty():
            return False
        self._put_back(cgroup)
        return True

    def settle(self, cgroup: RunCgroup) -> None:
        """Kill what the run left (no escape by setsid or double fork), then
        take it back, or remove it if something still will not leave."""
        cgroup.kill_all()
        if cgroup.empty():
            self._put_back(cgroup)
        else:
            cgroup.remove()

    def _put_back(self, cgroup: RunCgroup) -> None:
        if len(self._free) < self._keep:
            self._free.append(cgroup)
        else:
            cgroup.remove()

    def idle(self) -> int:
        return len(self._free)


@functools.lru_cache(maxsize=4)
def pool_for(support: CgroupSupport) -> CgroupPool:
    return CgroupPool(support)


def _remove_abandoned(parent: Path) -> None:
    """Executor directories whose process is gone, with their run cgroups
    (empty: the runs died with their executor's PID namespaces)."""
    for directory in parent.glob("executor-*"):
        pid = directory.name.removeprefix("executor-")
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue
        for run in directory.glob("run-*"):
            _kill_all(run, CgroupMode.V1)
            _remove(run)
        _remove(directory)


def _try_write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError:
        pass  # absent without swap accounting: nothing to limit


def _read(path: Path) -> bytes:
    """A kernel file's bytes through ``os.read``: pathlib's text I/O took
    81 µs for a cgroup file against 7 here, and a run reads three or four."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _pids(path: Path) -> list[int]:
    try:
        return [int(p) for p in _read(path / "cgroup.procs").split()]
    except OSError:
        return []


def _kill_all(path: Path, mode: CgroupMode) -> None:
    if mode is CgroupMode.V2 and (path / "cgroup.kill").exists():
        _try_write(path / "cgroup.kill", "1")
        return
    for _ in range(100):  # a fork racing the kill joins the cgroup: go again
        pids = _pids(path)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)


def _remove(path: Path) -> None:
    for _ in range(200):  # the last processes may still be exiting
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.005)
    log.warning("cgroup %s not removed: processes still in it", path)
