"""CPU seconds by process class, read from /proc before and after a run.

Each process's own user+system time (field 14 and 15 of /proc/PID/stat),
never its reaped children's: the scripts an executor runs are not counted
as the executor's work. A process that exits during the run loses what it
used (executors stay up in a benchmark, so little is lost)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

TICKS = os.sysconf("SC_CLK_TCK")

# Ray sets a worker's title to "ray::ClassName.method" (or "ray::ClassName"
# while idle); the class names the role.
RAY_CLASSES = {
    "ShardShell": "shards",
    "DispatcherShell": "dispatcher",
    "ExecutorPoolShell": "pool",
    "ExecutorShell": "executors",
    "ServeReplica": "serve replica",
    "ProxyActor": "serve proxy",
    "ServeController": "serve controller",
    "DashboardAgent": "ray system",
    "RuntimeEnvAgent": "ray system",
    "IDLE": "ray system",  # pre-started workers waiting for a task
}
CONTROL_PLANE = (
    "shards",
    "dispatcher",
    "pool",
    "executors",
    "postgresql",
    "serve replica",
    "serve proxy",
    "serve controller",
    "serve haproxy",
    "ray system",
)


# The postmaster of the cluster a benchmark uses (``count_postgres_of``):
# other PostgreSQL clusters on the box (a developer's throwaway ones, the
# system's) are not the benchmark's. None: every PostgreSQL process counts.
_postmaster: int | None = None


def count_postgres_of(engine) -> None:
    """Count only the PostgreSQL cluster ``engine`` connects to: its
    postmaster (the parent of this connection's backend) and its children."""
    global _postmaster
    from sqlalchemy import text

    with engine.connect() as conn:
        backend = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    _postmaster = _parent_of(int(backend))


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return _ppid(f.read())


def _ppid(stat: str) -> int:
    """The parent pid in a /proc/PID/stat line (the field after the state)."""
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _counted(role: str, pid: int, stat: str) -> bool:
    if role != "postgresql" or _postmaster is None or pid == _postmaster:
        return True
    return _ppid(stat) == _postmaster


def process_class(cmdline: str, comm: str) -> str | None:
    """The class a process is counted under; None: not ours to count."""
    if cmdline.startswith("ray::"):
        name = cmdline[5:].split(".", 1)[0].split()[0]
        # a named actor's title is "ray::<actor name>:<Class>"; a Serve
        # replica's "ray::ServeReplica:<app>:<deployment>"
        candidates = (name, name.rsplit(":", 1)[-1])
        for prefix, role in RAY_CLASSES.items():
            if any(candidate.startswith(prefix) for candidate in candidates):
                return role
        return f"ray::{name}"
    if comm == "haproxy" or cmdline.split(" ", 1)[0].endswith("/haproxy"):
        return "serve haproxy"
    if comm == "postgres" or "postgres" in cmdline.split(" ", 1)[0]:
        return "postgresql"
    if any(
        part in cmdline for part in ("raylet", "gcs_server", "dashboard", "log_monitor", "ray/")
    ):
        return "ray system"
    return None


def cpu_seconds(stat: str) -> float:
    """A process's own user + system time from its /proc/PID/stat line."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return cpu_seconds(f.read())


@dataclass(frozen=True)
class Snapshot:
    cpu_s: dict[int, tuple[str, float]]  # pid: (class, cpu seconds so far)


def snapshot() -> Snapshot:
    found: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        role = process_class(cmdline, comm)
        if role is None or not _counted(role, pid, stat):
            continue
        found[pid] = (role, cpu_seconds(stat))
    return Snapshot(found)


def cpu_by_class(before: Snapshot, after: Snapshot) -> Counter[str]:
    used: Counter[str] = Counter()
    for pid, (role, cpu) in after.cpu_s.items():
        earlier = before.cpu_s.get(pid)
        used[role] += cpu - (earlier[1] if earlier and earlier[0] == role else 0.0)
    return used


def report(used: Counter[str], tasks: int, label: str) -> float:
    """Prints CPU ms per task by class; returns the control plane's."""
    print(f"{label}: CPU per task by process class (own time, scripts excluded)")
    for role, seconds in used.most_common():
        print(f"  {role:<18} {seconds:7.2f} s  {seconds * 1000 / tasks:6.2f} ms/task")
    control = sum(used[role] for role in CONTROL_PLANE)
    print(f"  control plane      {control:7.2f} s  {control * 1000 / tasks:6.2f} ms/task")
    return control * 1000 / tasks


def resident_mb(exclude: tuple[str, ...] = ()) -> float:
    """Memory of every counted process (Ray, Serve, chronoray's actors,
    PostgreSQL) but the classes in ``exclude``, in MB, as proportional set
    size: a page shared by n processes counts 1/n in each, so shared
    libraries are not summed n times as resident sizes would be."""
    return sum(mb for mb, _ in resident_by_class(exclude).values())


def resident_by_class(exclude: tuple[str, ...] = ()) -> dict[str, tuple[float, int]]:
    """``resident_mb`` by process class: {class: (MB of PSS, processes)}."""
    found: dict[str, tuple[float, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            role = process_class(cmdline, comm)
            if role is None or role in exclude or not _counted(role, int(entry), stat):
                continue
            with open(f"/proc/{entry}/smaps_rollup") as f:
                pss_kb = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
        mb, count = found.get(role, (0.0, 0))
        found[role] = (mb + pss_kb / 1024, count + 1)
    return found


class PeakMemory:
    """Samples ``resident_by_class`` every ``every_s`` on a thread; ``peak``
    (MB) and what it was made of, ``peak_by_class``, after ``stop``."""

    def __init__(self, every_s: float = 0.5, exclude: tuple[str, ...] = ()) -> None:
        import threading

        self._exclude = exclude
        self.peak_by_class = resident_by_class(exclude)
        self.peak = sum(mb for mb, _ in self.peak_by_class.values())
        self._stop = threading.Event()
        self._every_s = every_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            found = resident_by_class(self._exclude)
            total = sum(mb for mb, _ in found.values())
            if total > self.peak:
                self.peak, self.peak_by_class = total, found

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak
