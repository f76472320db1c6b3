"""Throwaway PostgreSQL servers of a test's own: a primary that can be
stopped and started again, and streaming replicas made with pg_basebackup."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from chronoray.deploy import free_port

PG_BIN = Path(os.environ.get("CHRONORAY_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _as_postgres(*command: str) -> list[str]:
    """initdb and postgres refuse to run as root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


def _run(*command: str) -> None:
    done = subprocess.run(_as_postgres(*command), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")


@dataclass
class PgServer:
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def _workdir(cls) -> Path:
        root = Path(tempfile.mkdtemp(prefix="crpg-", dir="/tmp"))
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        root.chmod(0o700)
        return root

    @classmethod
    def primary(cls) -> PgServer:
        server = cls(data=cls._workdir() / "data", port=free_port())
        _run(
            str(PG_BIN / "initdb"), "-D", str(server.data), "-U", "postgres", "-A", "trust",
            "--no-sync",
        )  # fmt: skip
        server.start()
        return server

    def replica(self) -> PgServer:
        """A hot standby streaming from this server (pg_basebackup -R)."""
        standby = PgServer(data=self._workdir() / "data", port=free_port())
        _run(
            str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.port),
            "-U", "postgres", "-D", str(standby.data), "-R", "-X", "stream", "--no-sync",
        )  # fmt: skip
        standby.start()
        return standby

    def start(self) -> None:
        _run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.data.parent / "log"),
            "-w", "-t", "60", "start",
            "-o", f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c hot_standby_feedback=on",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        _run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-m", mode, "stop")

    def remove(self) -> None:
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"),
            capture_output=True,
        )
        shutil.rmtree(self.data.parent, ignore_errors=True)


def wait_until(condition, *, timeout_s: float, what: str) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.1)
    return time.monotonic() - started
