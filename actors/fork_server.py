"""The executor's fork server: the compiled launcher (actors/launch.c) run
once as ``--serve``, so that a script's start is a fork of that small
process instead of a ``Popen`` from the large executor plus an exec of the
launcher. The child it forks does exactly what the launcher's exec does
(session, cgroups, namespaces, uid, rlimits, the held start), so a run
started here is reaped and fenced like one started by ``Popen``: the server
reaps it and reports its wait status; killing its process group ends it;
closing its go pipe ends a held run unstarted; and if the server dies, its
runs die with it (``PR_SET_PDEATHSIG``) and are reported killed.

One server per event loop (the loop watches its reports), started from
the loop's thread: the server dies with the thread that started it."""

from __future__ import annotations

import array
import asyncio
import errno
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

HOLD_FD = 3  # where a run's child finds its go pipe (launch.c)
# A start request is one datagram: it must fit the socket's send buffer
# (about 208 KiB here) and launch.c's MAX_REQUEST. Variables may reach 64 ×
# 4 KiB; a run that large starts through Popen instead.
MAX_REQUEST_BYTES = 128 * 1024
REPLY_TIMEOUT_S = 5.0  # a fork of the small server; far longer means it is wedged
KILLED = -signal.SIGKILL


class ForkServer:
    def __init__(self, launcher: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._requests, their_requests = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._events, their_events = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [launcher, f"--serve={their_requests.fileno()},{their_events.fileno()}"],
                pass_fds=(their_requests.fileno(), their_events.fileno()),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a signal to the executor's group is not its runs'
            )
        except BaseException:
            self._requests.close()
            self._events.close()
            raise
        finally:
            their_requests.close()
            their_events.close()
        self._requests.settimeout(REPLY_TIMEOUT_S)
        self._events.setblocking(False)
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: dict[int, int] = {}  # reported before their spawn returned
        self.alive = True
        self._loop.add_reader(self._events.fileno(), self._on_events)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        output_fd: int,
        hold_fd: int | None,
    ) -> tuple[int, asyncio.Future[int]]:
        """Start ``argv`` (the launcher's command line, its ``--hold`` at
        ``HOLD_FD``); returns its pid, which leads its own process group,
        and a future of its exit code (negative: the signal that ended it)."""
        entries = [f"{key}={value}" for key, value in env.items()]
        fields = [cwd, str(len(entries)), *entries, *argv]
        if any("\0" in field for field in fields):
            raise ValueError("embedded null byte")  # as Popen says
        payload = b"".join(field.encode() + b"\0" for field in fields)
        if len(payload) > MAX_REQUEST_BYTES:
            # not the server's fault: it keeps serving (closing it would end its runs)
            raise OSError(errno.EMSGSIZE, f"a start of {len(payload)} bytes is too large to send")
        fds = array.array("i", [output_fd] if hold_fd is None else [output_fd, hold_fd])
        try:
            self._requests.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                self.close()  # a dead server: the next run starts a new one
            raise
        try:
            reply = self._requests.recv(4)
        except OSError:
            self.close()  # a wedged or dead server: the next run starts a new one
            raise
        if len(reply) != 4:
            self.close()
            raise ConnectionError("the fork server is gone")
        pid = int.from_bytes(reply, "little", signed=True)
        if pid < 0:
            raise OSError(-pid, f"fork server: {os.strerror(-pid)}")
        exited = self._loop.create_future()
        if pid in self._unclaimed:
            exited.set_result(self._unclaimed.pop(pid))
        else:
            self._exits[pid] = exited
        return pid, exited

    def _on_events(self) -> None:
        while True:
            try:
                report = self._events.recv(8)
            except BlockingIOError:
                return
            except OSError:
                report = b""
            if len(report) != 8:  # end of file: the server died, and its runs with it
                self.close()
                return
            pid = int.from_bytes(report[:4], "little", signed=True)
            status = int.from_bytes(report[4:], "little", signed=True)
            code = os.waitstatus_to_exitcode(status)
            exited = self._exits.pop(pid, None)
            if exited is None:
                self._unclaimed[pid] = code
            elif not exited.done():
                exited.set_result(code)

    def close(self) -> None:
        """Stop serving: the server reads end of file and exits (its runs
        die with it); every run not yet reported counts as killed."""
        if not self.alive:
            return
        self.alive = False
        if not self._loop.is_closed():
            self._loop.remove_reader(self._events.fileno())
        self._requests.close()
        self._events.close()
        if not self._loop.is_closed():
            for exited in self._exits.values():
                if not exited.done():
                    exited.set_result(KILLED)
        self._exits.clear()
        try:
            self._proc.wait(timeout=REPLY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


_servers: dict[asyncio.AbstractEventLoop, ForkServer] = {}


def fork_server(launcher: str) -> ForkServer | None:
    """This event loop's fork server, started on first use; ``None`` where
    it cannot start (the caller then starts runs with ``Popen``)."""
    loop = asyncio.get_running_loop()
    for other, server in list(_servers.items()):
        if other.is_closed() or not server.alive:  # asyncio.run per call, or a dead server
            server.close()
            del _servers[other]
    if loop not in _servers:
        try:
            _servers[loop] = ForkServer(launcher)
        except OSError:
            log.exception("no fork server: scripts start through Popen of the launcher")
            return None
    return _servers[loop]
