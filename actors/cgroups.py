"""A cgroup per run: resident memory of the script's whole process tree,
and its number of processes; and a CPU-weight cgroup per tier, shared by
that tier's runs. The launcher moves itself into the run's cgroups before
it starts the script (so everything the script starts is inside); the
executor reads the cgroup's own OOM count afterwards, kills whatever is
left in it, and removes it.

cgroup v1 (separate ``memory``, ``pids`` and ``cpu`` hierarchies, writable
by root) nests run cgroups under the executor's own cgroup in each
hierarchy; in ``cpu`` a run joins its tier's weight group instead of a
cgroup of its own. cgroup v2 (one unified tree) needs a subtree where the
memory and pids controllers (and cpu, for the weight) are delegated:
``/sys/fs/cgroup/chronoray`` by default (``CHRONORAY_CGROUP_V2_ROOT``);
there a run's cgroup sits under its tier's weight group, since a process
is in one cgroup only. Where neither can be written, runs keep the rlimits
alone, and a tier's weight becomes the script's nice value (``detect``
says which, once, at executor start).

How much the scripts weigh together: under one parent of default weight
(1024, one busy process's, in v1 where the control plane's processes sit
in the root cgroup each at 1024) the launch → first line went to p50
248 ms and p99 4.3 s under chaos scenario 2's load with a cgroup per run,
and to 226 ms and 1.8 s with a parent of 2048 and a group per tier
(memory and pids alone: 43 ms and 374 ms). So each executor's group sits
at the top of the cpu hierarchy and weighs as one process per slot at the
tier's weight: as much as its scripts would weigh without a cgroup, but no
more however many processes they fork (launch → first line p50 19 ms, p99
196 ms there; with the weight as a nice value 22 ms and 329 ms)."""

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
DEFAULT_CPU_WEIGHT = 100  # a tier's weight that equals a nice-0 process's (v2's own scale)
V1_SHARES_PER_WEIGHT = 1024 / DEFAULT_CPU_WEIGHT  # v1's cpu.shares scale: 1024 is nice 0
V1_MAX_SHARES = 262144
V2_MAX_WEIGHT = 10000


class CgroupMode(str, enum.Enum):
    V1 = "v1"
    V2 = "v2"
    NONE = "none"


@dataclass(frozen=True)
class CgroupSupport:
    mode: CgroupMode
    parents: tuple[Path, ...] = ()  # where run cgroups are made: one per v1 hierarchy, or one
    cpu_parent: Path | None = None  # where executors' cpu groups are made; None: weight by nice
    cpu_prefix: str = "executor-"  # their names: this and the executor's pid

    def describe(self) -> str:
        if self.mode is CgroupMode.NONE:
            return "no writable cgroups: memory by address-space rlimit only"
        cpu = (
            f"; CPU weight by cgroup under {self.cpu_parent}"
            if self.cpu_parent
            else "; CPU weight by nice value (no writable cpu controller)"
        )
        return f"cgroup {self.mode.value} under " + ", ".join(map(str, self.parents)) + cpu


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
        if not (_writable_dir(parent) and _delegate_v2(parent, {"memory", "pids"})):
            return CgroupSupport(CgroupMode.NONE)
        # chronoray's subtree keeps its default weight against its siblings
        # (slices of processes, not processes, in v2)
        weighed = _delegate_v2(parent, {"memory", "pids", "cpu"})
        return CgroupSupport(CgroupMode.V2, (parent,), parent if weighed else None)
    parents = []
    for controller in V1_CONTROLLERS:
        parent = _v1_runs_parent(controller)
        if parent is None:
            return CgroupSupport(CgroupMode.NONE)
        parents.append(parent)
    # Executors' cpu groups beside the control plane's processes, not under
    # a parent that would weigh all scripts as one process (module doc)
    cpu = ROOT / "cpu"
    cpu_parent = cpu / _own_v1_path("cpu").lstrip("/")
    if not ((cpu / "cgroup.procs").exists() and _writable_dir(cpu_parent)):
        return CgroupSupport(CgroupMode.V1, tuple(parents))
    return CgroupSupport(CgroupMode.V1, tuple(parents), cpu_parent, f"{RUNS}-executor-")


def _v1_runs_parent(controller: str) -> Path | None:
    hierarchy = ROOT / controller
    if not (hierarchy / "cgroup.procs").exists():
        return None
    parent = hierarchy / _own_v1_path(controller).lstrip("/") / RUNS
    return parent if _writable_dir(parent) else None


def _delegate_v2(parent: Path, wanted: set[str]) -> bool:
    """Enable ``wanted`` for the children of ``parent`` (and of its parent,
    which must offer them)."""
    return all(_enable_v2(node, wanted) for node in (parent.parent, parent))


def _enable_v2(node: Path, wanted: set[str]) -> bool:
    try:
        offered = set((node / "cgroup.controllers").read_text().split())
        if not wanted <= offered:
            return False
        (node / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class RunLimits:
    memory_bytes: int
    processes: int
    cpu_weight: int = DEFAULT_CPU_WEIGHT  # the tier's: which weight group the run joins
    slots: int = 1  # the executor's: its group weighs one process per slot


class RunCgroup:
    """One run's cgroups (one per v1 hierarchy, or one v2 directory), used
    again by later runs once empty (see ``CgroupPool``)."""

    def __init__(
        self,
        parents: tuple[Path, ...],
        mode: CgroupMode,
        limits: RunLimits,
        weight_group: Path | None = None,
    ) -> None:
        self.mode = mode
        name = f"run-{uuid.uuid4().hex[:12]}"
        self.paths = tuple(parent / name for parent in parents)
        self.weight_group = weight_group  # v1: the tier's cpu group, joined beside these
        self.limits: RunLimits | None = None
        made: list[Path] = []
        try:
            for path in self.paths:
                path.mkdir()
                made.append(path)
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
        joined = [*self.paths, self.weight_group] if self.weight_group else self.paths
        return [str(path / "cgroup.procs") for path in joined]

    def _oom_count(self) -> int:
        for path in self.paths:
            for name in ("memory.events", "memory.oom_control"):
                events = path / name
                if events.exists():
                    for line in events.read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if key == "oom_kill":
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
    of its own under the runs' parent, with a weight group per tier weight
    in use; directories of executors that are gone are removed when the
    next one starts."""

    def __init__(self, support: CgroupSupport, keep: int = 64) -> None:
        self.support = support
        self._keep = keep
        self._free: dict[int, list[RunCgroup]] = {}
        own = f"executor-{os.getpid()}"
        for parent in support.parents:
            _remove_abandoned(parent, "executor-")
        self._parents = tuple(parent / own for parent in support.parents)
        for parent in self._parents:
            parent.mkdir(exist_ok=True)
        self._cpu_dir = None
        self._cpu_weighed = 0  # the executor group's weight so far, in v2 units
        if support.cpu_parent is not None:
            _remove_abandoned(support.cpu_parent, support.cpu_prefix)
            self._cpu_dir = support.cpu_parent / f"{support.cpu_prefix}{os.getpid()}"
            self._cpu_dir.mkdir(exist_ok=True)
        if support.mode is CgroupMode.V2:  # the run (or weight) cgroups below get controllers
            controllers = {"memory", "pids", *(["cpu"] if self._cpu_dir else [])}
            if not _enable_v2(self._parents[0], controllers):
                raise OSError(f"{self._parents[0]}: controllers not delegated")

    @property
    def weighs_cpu(self) -> bool:
        """Runs get their tier's CPU weight from a cgroup (else by nice)."""
        return self._cpu_dir is not None

    def acquire(self, limits: RunLimits) -> RunCgroup:
        free = self._free.get(self._key(limits), [])
        while free:
            cgroup = free.pop()
            try:
                cgroup.prepare(limits)
                return cgroup
            except OSError:
                log.warning("run cgroup %s refused new limits: removed", cgroup.paths[0])
                cgroup.remove()
        if self._cpu_dir is None:
            return RunCgroup(self._parents, self.support.mode, limits)
        self._weigh(limits)
        group = self._weight_group(limits.cpu_weight)
        if self.support.mode is CgroupMode.V2:  # one cgroup per process: the run's is inside
            return RunCgroup((group,), self.support.mode, limits)
        return RunCgroup(self._parents, self.support.mode, limits, weight_group=group)

    def _key(self, limits: RunLimits) -> int:
        return limits.cpu_weight if self._cpu_dir is not None else DEFAULT_CPU_WEIGHT

    def _weigh(self, limits: RunLimits) -> None:
        """The executor's group: one process per slot at the strongest
        weight it runs (one tier per executor: that tier's)."""
        assert self._cpu_dir is not None
        weight = limits.slots * limits.cpu_weight
        if weight <= self._cpu_weighed:
            return
        if self.support.mode is CgroupMode.V2:
            (self._cpu_dir / "cpu.weight").write_text(str(min(V2_MAX_WEIGHT, weight)))
        else:
            shares = min(V1_MAX_SHARES, round(weight * V1_SHARES_PER_WEIGHT))
            (self._cpu_dir / "cpu.shares").write_text(str(shares))
        self._cpu_weighed = weight

    def _weight_group(self, weight: int) -> Path:
        """The tier's shared cpu cgroup, made the first time a run needs it."""
        assert self._cpu_dir is not None
        group = self._cpu_dir / f"weight-{weight}"
        if not group.exists():
            group.mkdir(exist_ok=True)
            if self.support.mode is CgroupMode.V2:
                (group / "cpu.weight").write_text(str(max(1, min(V2_MAX_WEIGHT, weight))))
                if not _enable_v2(group, {"memory", "pids"}):
                    raise OSError(f"{group}: memory and pids not delegated")
            else:
                shares = max(2, round(weight * V1_SHARES_PER_WEIGHT))
                (group / "cpu.shares").write_text(str(shares))
        return group

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
        if self.idle() < self._keep and cgroup.limits is not None:
            self._free.setdefault(self._key(cgroup.limits), []).append(cgroup)
        else:
            cgroup.remove()

    def idle(self) -> int:
        return sum(len(free) for free in self._free.values())


@functools.lru_cache(maxsize=4)
def pool_for(support: CgroupSupport) -> CgroupPool:
    return CgroupPool(support)


def _remove_abandoned(parent: Path, prefix: str) -> None:
    """Executor directories whose process is gone, with their weight groups
    and run cgroups (empty: the runs died with their executor's PID
    namespaces)."""
    for directory in parent.glob(f"{prefix}*"):
        pid = directory.name.removeprefix(prefix)
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue
        _remove_tree(directory)


def _remove_tree(directory: Path) -> None:
    """Children first: a cgroup with children cannot be removed."""
    for child in directory.iterdir():
        if child.is_dir():
            _remove_tree(child)
    _kill_all(directory, CgroupMode.V1)
    _remove(directory)


def _try_write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError:
        pass  # absent without swap accounting: nothing to limit


def _pids(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
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
