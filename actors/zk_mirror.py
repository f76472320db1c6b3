"""ZooKeeper as a liveness mirror for external tools.

Each publisher holds its own kazoo session and one ephemeral znode. Writes
run on a private thread and are coalesced (only the newest state is written),
so the actor's event loop never waits on ZooKeeper; with ZooKeeper down,
publishing is a no-op and the next write after it returns recreates the
znode (kazoo reconnects by itself, with a new session once the old expired).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

ROOT = "/chronoray"
EXECUTORS = f"{ROOT}/executors"
DISPATCHER = f"{ROOT}/dispatcher"


def executor_path(tier: str, executor_id: str) -> str:
    return f"{EXECUTORS}/{tier}/{executor_id}"


class ZnodeMirror:
    """Keeps one ephemeral znode equal to the last published state."""

    def __init__(self, hosts: str, path: str, *, session_timeout_s: float = 6.0) -> None:
        from kazoo.client import KazooClient

        self.path = path
        self._client = KazooClient(
            hosts=hosts,
            timeout=session_timeout_s,
            connection_retry={"max_tries": -1, "delay": 0.2, "max_delay": 1.0},
            command_retry={"max_tries": 0},
        )
        self._latest: bytes | None = None
        self._written: bytes | None = None
        self._wake = threading.Event()
        self._stopped = False
        # After a reconnect (a new session once the old one expired) the
        # znode may be gone: write again at once, not at the next publish.
        self._client.add_listener(lambda state: self._reconnected(state))
        self._client.start_async()
        self._thread = threading.Thread(target=self._write_forever, daemon=True, name=path)
        self._thread.start()

    def publish(self, state: Mapping[str, Any]) -> None:
        """Record the state to mirror; returns at once."""
        self._latest = json.dumps(state, sort_keys=True, default=str).encode()
        self._wake.set()

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        try:
            self._client.stop()
            self._client.close()
        except Exception:
            log.debug("closing the ZooKeeper client failed", exc_info=True)

    def _reconnected(self, state) -> None:
        from kazoo.protocol.states import KazooState

        if state == KazooState.CONNECTED:
            self._written = None
            self._wake.set()

    def _write_forever(self) -> None:
        while not self._stopped:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            latest = self._latest
            if self._stopped or latest is None or not self._client.connected:
                continue
            if latest == self._written:
                continue
            try:
                self._write(latest)
                self._written = latest
            except Exception as exc:  # ZooKeeper is a mirror: log, retry in a second
                log.info("znode %s not written: %s", self.path, exc)

    def _write(self, data: bytes) -> None:
        from kazoo.exceptions import NodeExistsError

        stat = self._client.exists(self.path)
        mine = self._client.client_id[0] if self._client.client_id else None
        if stat is not None and stat.ephemeralOwner != mine:
            # Left by our own earlier session, not yet expired: replace it.
            self._client.delete(self.path)
            stat = None
        if stat is None:
            try:
                self._client.create(self.path, data, ephemeral=True, makepath=True)
            except NodeExistsError:
                self._written = None  # lost a race with our old session's node: next round
                raise
        else:
            self._client.set(self.path, data)


def ensure_chroot(hosts: str, *, timeout_s: float = 5.0) -> None:
    """A chroot in the connection string (``host:port/prod``) keeps several
    deployments apart on one ZooKeeper; it must exist before clients use it.
    Best effort: the mirror is optional, so failures are only logged."""
    servers, _, chroot = hosts.partition("/")
    if not chroot:
        return
    from kazoo.client import KazooClient

    client = KazooClient(hosts=servers, timeout=timeout_s)
    try:
        client.start(timeout=timeout_s)
        client.ensure_path("/" + chroot)
    except Exception as exc:
        log.warning("ZooKeeper chroot /%s not created: %s", chroot, exc)
    finally:
        client.stop()
        client.close()


def read_tree(hosts: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """The mirror as external tools see it: live executors and the
    dispatcher, each with the JSON its owner wrote."""
    from kazoo.client import KazooClient
    from kazoo.exceptions import NoNodeError

    client = KazooClient(hosts=hosts, timeout=timeout_s)
    client.start(timeout=timeout_s)
    try:
        executors = []
        try:
            tiers = client.get_children(EXECUTORS)
        except NoNodeError:
            tiers = []
        for tier in sorted(tiers):
            for executor_id in sorted(client.get_children(f"{EXECUTORS}/{tier}")):
                try:
                    data, _ = client.get(executor_path(tier, executor_id))
                    state = json.loads(data or b"{}")
                except (NoNodeError, ValueError):
                    continue  # gone between the listing and the read, or not ours
                executors.append({"executor_id": executor_id, "tier": tier, **state})
        try:
            dispatcher = json.loads(client.get(DISPATCHER)[0] or b"{}")
        except NoNodeError:
            dispatcher = None
        return {"executors": executors, "dispatcher": dispatcher}
    finally:
        client.stop()
        client.close()
