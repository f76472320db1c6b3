"""In-memory stand-ins for our own interfaces (never for libraries)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from scheduling.errors import ChronorayError
from scheduling.models import CommittedResults, NewTask, RunResult, SubmitResult, TaskSpec


class FakeDispatcher:
    def __init__(self, room: int = 1000) -> None:
        self.received: list[TaskSpec] = []
        self.incarnation = "first"
        self.capacity = room
        self.cancelled: list[tuple[int, int]] = []

    async def hello(self) -> str:
        return self.incarnation

    async def room(self) -> int:
        return max(0, self.capacity - len(self.received))

    async def submit(self, specs: list[TaskSpec]) -> int:
        known = {s.key for s in self.received}
        self.received.extend(s for s in specs if s.key not in known)
        return await self.room()

    async def cancel(self, keys: list[tuple[int, int]]) -> None:
        self.cancelled.extend(keys)


class FakePeers:
    def __init__(self) -> None:
        self.tracked: dict[int, list[tuple[int, datetime]]] = {}

    async def track(self, shard: int, entries: list[tuple[int, datetime]]) -> None:
        self.tracked.setdefault(shard, []).extend(entries)


class RepoRouter:
    """Stores straight into a repository (the shard hop, without Ray)."""

    def __init__(self, repo, now) -> None:
        self.repo = repo
        self.now = now
        self.tracked: list = []
        self.track_fails_with: Exception | None = None  # a shard down for hints
        self.probes = {"dispatcher": "ok"}

    async def submit(self, new_tasks: Sequence[NewTask]) -> list[SubmitResult | ChronorayError]:
        return self.repo.add_tasks(list(new_tasks), now=self.now())

    async def track(self, entries) -> None:
        if self.track_fails_with is not None:
            raise self.track_fails_with
        self.tracked.extend(entries)

    async def probe(self) -> dict[str, str]:
        return dict(self.probes)

    async def executors(self) -> dict:
        return {
            "tiers": {"small": {"live": 1, "starting": 0, "min": 1, "max": 2, "unplaceable": None}},
            "executors": [
                {
                    "executor_id": "small-1",
                    "tier": "small",
                    "slots": 2,
                    "running": 0,
                    "state": "live",
                    "node": "n1",
                    "heartbeat_age_s": 0.5,
                }
            ],
        }

    async def mirror(self) -> dict | None:
        return None

    async def metrics(self) -> dict:
        from chronoray.metrics import ShardMetrics, pool_families

        return {"shard-0": ShardMetrics().families(), "pool": pool_families(await self.executors())}


class FakeExecutor:
    def __init__(self) -> None:
        self.batches: list[list[TaskSpec]] = []
        self.cancelled: list[tuple[int, int]] = []
        self.holds: list[tuple[int, int]] = []
        self.fail = False

    async def run_batch(self, specs: list[TaskSpec]) -> int:
        if self.fail:
            raise ConnectionError("executor is gone")
        self.batches.append(list(specs))
        return len(specs)

    async def running(self) -> list[TaskSpec]:
        return []

    async def holding(self) -> list[tuple[int, int]]:
        if self.fail:
            raise ConnectionError("executor is gone")
        return list(self.holds)

    async def cancel(self, keys: list[tuple[int, int]]) -> int:
        self.cancelled.extend(keys)
        return len(keys)

    @property
    def received(self) -> list[int]:
        return [s.task_id for batch in self.batches for s in batch]


class FakeShardLink:
    def __init__(self) -> None:
        self.results: dict[int, list[RunResult]] = {}
        self.committed: dict[int, list[CommittedResults]] = {}
        self.fail = False

    async def record_results(self, shard: int, results: list[RunResult]) -> None:
        if self.fail:
            raise ConnectionError("shard is restarting")
        self.results.setdefault(shard, []).extend(results)

    async def results_committed(self, shard: int, committed: CommittedResults) -> None:
        if self.fail:
            raise ConnectionError("shard is restarting")
        self.committed.setdefault(shard, []).append(committed)


def processes_with(marker: str) -> list[int]:
    """PIDs (host view) whose environment holds ``marker``: the way to find
    a script's descendants once they have left its group, session and PID
    namespace view."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def user_api(repo, settings, router=None, *, name: str = "local"):
    """A TestClient of the API that speaks as a user of ``repo`` (made if
    missing) through a real token; ``.owner_id`` is that user."""
    from datetime import timezone

    from fastapi.testclient import TestClient

    from serve_app.app import create_api
    from service.auth import issue_token
    from service.core import Service

    now = datetime.now(timezone.utc)
    owner = repo.ensure_user(first_name=name, last_name="user", now=now)
    _, token = issue_token(repo, user_id=owner, label="test", now=now)
    router = router or RepoRouter(repo, lambda: datetime.now(timezone.utc))
    api = TestClient(
        create_api(Service(repo=repo, router=router, settings=settings)),
        headers={"Authorization": f"Bearer {token}"},
    )
    api.owner_id = owner
    return api


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def exe_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")


def held_runs() -> list[int]:
    """Processes of this process's held runs: a launcher waiting in a pipe
    read to exec the interpreter, or bash started and waiting to read its
    script from that pipe (``bash /dev/fd/N SCRIPT``, see ``HELD_BASH_GO``);
    as root, those dropped to a run's uid. Forked by the fork server, a launcher
    still shows the server's environment (only an exec sets /proc's), so
    they are not found by a variable."""
    from actors import fork_server
    from actors.sandbox import SandboxLimits, detect_isolation, interpreter_command
    from scheduling.models import Interpreter

    launcher = detect_isolation("nobody").launcher
    bash = os.path.realpath(interpreter_command(Interpreter.BASH)[0])
    first, last = SandboxLimits().uid_range()
    servers = {server.pid for server in fork_server._servers.values()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in servers:
            continue
        try:
            exe = os.readlink(entry / "exe")
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if exe != launcher and not (
                exe == bash and argv[1:2] and argv[1].startswith(b"/dev/fd/")
            ):
                continue
            uid = uid_of(int(entry.name))
        except (OSError, ValueError):
            continue
        if (os.geteuid() != 0 or first <= uid <= last) and _descends_from_us(int(entry.name)):
            found.append(int(entry.name))
    return found


def _descends_from_us(pid: int) -> bool:
    """Started by this process (through its fork server or Popen), not by
    another test run or deployment on the same host."""
    for _ in range(8):
        if pid == os.getpid():
            return True
        if pid <= 1:
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
    return False
