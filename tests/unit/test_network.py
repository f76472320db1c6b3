"""Network policy per tier: the control plane as the executor sees it, and
real scripts under `none`, `egress` and `host` (root: namespaces, uids and
iptables are real; the filter here is a chain of the test's own)."""

import asyncio
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.network import (
    ControlPlane,
    chain_rules,
    control_plane,
    install_egress_filter,
    remove_egress_filter,
)
from actors.sandbox import SandboxLimits, prepare_network, run_script
from chronoray.settings import Settings, with_networks
from scheduling.models import Interpreter
from scheduling.tiers import NetworkPolicy, local_tiers


def test_the_control_plane_is_every_service_the_settings_name_and_the_node():
    plane = control_plane(
        database_urls=[
            "postgresql+psycopg://u:secret@10.0.0.5:6432/db",
            "postgresql+psycopg://replica.invalid/db",  # unresolvable: nothing to block
            "sqlite:///tmp/x.db",
        ],
        zookeeper_hosts="10.0.0.6:2182,10.0.0.7",
        api_port=8000,
        node_ip="192.0.2.2",
        gcs_address="192.0.2.2:6380",
        redis_address="127.0.0.1:6379",
        extra_ports=(8265,),
    )
    assert plane.addresses == {
        "127.0.0.1",
        "::1",
        "10.0.0.5",
        "10.0.0.6",
        "10.0.0.7",
        "192.0.2.2",
    }
    assert plane.ports == {8000, 6432, 5432, 2182, 2181, 6380, 6379, 8265}
    rules = chain_rules(plane, ipv6=False, chain="T")
    assert "-A T -d 10.0.0.5 -j REJECT" in rules and "::1" not in rules
    assert "--dports 2181,2182,5432,6379,6380,6432,8000,8265" in rules
    assert "-A T -d ::1 -j REJECT" in chain_rules(plane, ipv6=True, chain="T")


def test_the_network_setting_takes_one_policy_or_one_per_tier():
    every = with_networks(local_tiers(), "none")
    assert {t.network for t in every} == {NetworkPolicy.NONE}
    mixed = with_networks(local_tiers(), "small=none, large=host")
    assert [t.network.value for t in mixed] == ["none", "egress", "host"]
    with pytest.raises(ValueError, match="'open' is not one of"):
        with_networks(local_tiers(), "open")
    with pytest.raises(ValueError, match="no tier named 'huge'"):
        with_networks(local_tiers(), "huge=none")
    settings = Settings.from_env({"CHRONORAY_SCRIPT_NETWORK": "host"}, data_dir=Path("/tmp"))
    assert {t.network for t in settings.tiers} == {NetworkPolicy.HOST}


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iptables") is None,
    reason="network namespaces, uids and iptables need root (make test runs as root)",
)

# A uid range no deployment uses, and a chain of the test's own: the
# session's executors keep their filter whatever this test does.
TEST_LIMITS = SandboxLimits(uid_base=800_000_000, uid_count=64)
TEST_CHAIN = "CHRONORAY-TEST"


class Listener:
    """A TCP server that accepts and says hello, on a thread."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.sendall(b"hello\n")
            conn.close()


@pytest.fixture
def listeners() -> Iterator[dict[str, Listener]]:
    made = {
        "control": Listener("127.0.0.1"),  # stands for PostgreSQL, the API, ...
        "any_address": Listener("0.0.0.0"),  # a control-plane port bound everywhere
        "outside": Listener("127.0.0.2"),  # a service outside the control plane
    }
    yield made
    for listener in made.values():
        listener.sock.close()


def probe_script_body(targets: dict[str, tuple[str, int]]) -> str:
    """A bash script that prints name=reached or name=refused per target."""
    return "".join(
        f"if exec 3<>/dev/tcp/{host}/{port}; then echo {name}=reached; exec 3>&-; "
        f"else echo {name}=refused; fi 2>/dev/null\n"
        for name, (host, port) in targets.items()
    )


def probe_script(tmp_path: Path, targets: dict[str, tuple[str, int]]) -> Path:
    path = tmp_path / "probe.sh"
    path.write_text(probe_script_body(targets))
    path.chmod(0o644)
    return path


def reached(tmp_path: Path, limits: SandboxLimits, targets: dict[str, tuple[str, int]]) -> dict:
    outcome = asyncio.run(
        run_script(
            script_path=probe_script(tmp_path, targets),
            interpreter=Interpreter.BASH,
            variables={},
            timeout_s=20,
            limits=limits,
        )
    )
    return dict(
        line.split("=") for line in outcome.output_tail.splitlines() if line.count("=") == 1
    )


@needs_root
def test_egress_reaches_outside_but_not_the_control_plane(tmp_path, listeners):
    plane = ControlPlane(
        addresses=frozenset({"127.0.0.1"}), ports=frozenset({listeners["any_address"].port})
    )
    limits = TEST_LIMITS
    first, last = limits.uid_range()
    assert install_egress_filter(plane, first, last, chain=TEST_CHAIN)
    try:
        targets = {
            "control": ("127.0.0.1", listeners["control"].port),
            "any_address": ("127.0.0.3", listeners["any_address"].port),
            "outside": ("127.0.0.2", listeners["outside"].port),
        }
        assert reached(tmp_path, limits, targets) == {
            "control": "refused",
            "any_address": "refused",
            "outside": "reached",
        }
        host = reached(
            tmp_path, SandboxLimits(**{**vars(limits), "network": NetworkPolicy.HOST}), targets
        )
        assert host == {"control": "reached", "any_address": "reached", "outside": "reached"}
    finally:
        remove_egress_filter(first, last, chain=TEST_CHAIN)


@needs_root
def test_none_reaches_only_its_own_loopback(tmp_path, listeners):
    limits = SandboxLimits(**{**vars(TEST_LIMITS), "network": NetworkPolicy.NONE})
    assert prepare_network(limits, ControlPlane(addresses=frozenset(), ports=frozenset())) == "none"
    targets = {
        "control": ("127.0.0.1", listeners["control"].port),
        "outside": ("127.0.0.2", listeners["outside"].port),
    }
    assert reached(tmp_path, limits, targets) == {"control": "refused", "outside": "refused"}
    own = tmp_path / "own.py"
    own.write_text(
        "import socket\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "client = socket.create_connection(server.getsockname())\n"
        "print('own loopback works')\n"
    )
    own.chmod(0o644)
    outcome = asyncio.run(
        run_script(
            script_path=own,
            interpreter=Interpreter.PYTHON,
            variables={},
            timeout_s=20,
            limits=limits,
        )
    )
    assert outcome.exit_code == 0 and "own loopback works" in outcome.output_tail
