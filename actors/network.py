"""What network a script reaches, set per tier:

- ``none``: a network namespace of its own with only loopback (the
  launcher's ``--netns``): nothing outside the script's own processes.
- ``egress``: the host's network, except chronoray's control plane — the
  database, Redis, ZooKeeper, Ray and the API. A packet filter keyed by the
  scripts' uids (each running script has one of its own, from a range per
  policy) rejects their connections to those addresses, and to those ports
  on any local address (a service bound to 0.0.0.0 answers on every one).
- ``host``: the host's network as it is.

The filter is one iptables chain, written whole in one transaction
(``iptables-restore --noflush``), so an executor rebuilding it never leaves
a moment without it; the jump to it from OUTPUT is added once per host."""

from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from scheduling.tiers import NetworkPolicy

log = logging.getLogger(__name__)

CHAIN = "CHRONORAY-SCRIPTS"
# Ray's ports that do not move: the dashboard and the Ray client server
# (the GCS's comes from the address; the rest bind to the node's IP).
RAY_FIXED_PORTS = (8265, 10001)


# Scripts of each policy draw uids from a range of their own, so the filter
# can tell an ``egress`` script from a ``host`` one by its uid.
UID_RANGE_INDEX = {NetworkPolicy.EGRESS: 0, NetworkPolicy.HOST: 1, NetworkPolicy.NONE: 2}


@dataclass(frozen=True)
class ControlPlane:
    """Where chronoray's own services listen: every port of ``addresses``,
    and ``ports`` on any local address, are closed to ``egress`` scripts."""

    addresses: frozenset[str]
    ports: frozenset[int]


def _host_port(netloc: str, default_port: int | None) -> tuple[str | None, int | None]:
    parts = urlsplit(f"//{netloc}")
    try:
        port = parts.port or default_port
    except ValueError:
        port = default_port
    return parts.hostname, port


def _addresses_of(host: str | None) -> set[str]:
    """The host's IP addresses (a name is resolved; an unresolvable one is
    left out: nothing can connect to it either)."""
    if not host:
        return set()
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


def control_plane(
    *,
    database_urls: Iterable[str],
    zookeeper_hosts: str | None,
    api_port: int,
    node_ip: str | None,
    gcs_address: str | None,
    redis_address: str | None = None,
    extra_ports: Iterable[int] = (),
) -> ControlPlane:
    """The control plane as the executor sees it from its settings and its
    Ray node. Loopback is always in it (the embedded defaults listen there)."""
    addresses = {"127.0.0.1", "::1"}
    ports = {api_port, *extra_ports}
    endpoints: list[tuple[str | None, int | None]] = []
    for url in database_urls:
        parts = urlsplit(url)
        if parts.scheme.startswith("sqlite"):
            continue
        endpoints.append(_host_port(parts.netloc.rpartition("@")[2], 5432))
    for host in (zookeeper_hosts or "").split(","):
        if host.strip():
            endpoints.append(_host_port(host.strip().split("/")[0], 2181))
    for address in (gcs_address, redis_address):
        if address:
            endpoints.append(_host_port(address, 6379))
    endpoints.append((node_ip, None))
    for host, port in endpoints:
        addresses |= _addresses_of(host)
        if port:
            ports.add(port)
    return ControlPlane(addresses=frozenset(addresses), ports=frozenset(ports))


def chain_rules(plane: ControlPlane, *, ipv6: bool, chain: str = CHAIN) -> str:
    """The chain, whole, as ``iptables-restore`` input."""
    family = 6 if ipv6 else 4
    lines = ["*filter", f":{chain} - [0:0]"]
    for address in sorted(plane.addresses):
        if ipaddress.ip_address(address).version == family:
            lines.append(f"-A {chain} -d {address} -j REJECT")
    ports = sorted(plane.ports)
    for chunk in (ports[i : i + 15] for i in range(0, len(ports), 15)):  # multiport's most
        listed = ",".join(str(p) for p in chunk)
        for protocol in ("tcp", "udp"):
            lines.append(
                f"-A {chain} -m addrtype --dst-type LOCAL -p {protocol} "
                f"-m multiport --dports {listed} -j REJECT"
            )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def jump_rule(first_uid: int, last_uid: int, chain: str = CHAIN) -> list[str]:
    return ["OUTPUT", "-m", "owner", "--uid-owner", f"{first_uid}-{last_uid}", "-j", chain]


def install_egress_filter(
    plane: ControlPlane, first_uid: int, last_uid: int, *, chain: str = CHAIN
) -> bool:
    """Write the chain and make sure OUTPUT sends these uids through it.
    False (and a warning) where the host has no iptables or refuses."""
    installed = False
    for ipv6, tool in ((False, "iptables"), (True, "ip6tables")):
        binary = shutil.which(tool)
        restore = shutil.which(f"{tool}-restore")
        if binary is None or restore is None:
            if not ipv6:
                log.warning("no %s: egress scripts reach the control plane", tool)
                return False
            continue
        try:
            subprocess.run(
                [restore, "-w", "--noflush"],
                input=chain_rules(plane, ipv6=ipv6, chain=chain).encode(),
                check=True,
                capture_output=True,
                timeout=30,
            )
            jump = jump_rule(first_uid, last_uid, chain)
            present = subprocess.run(
                [binary, "-w", "-C", *jump], capture_output=True, timeout=30
            ).returncode
            if present != 0:
                subprocess.run(
                    [binary, "-w", "-I", jump[0], "1", *jump[1:]],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            log.warning("%s refused the egress filter: %s %s", tool, exc, detail.decode()[-300:])
            if not ipv6:
                return False
            continue
        installed = installed or not ipv6
    return installed


def remove_egress_filter(first_uid: int, last_uid: int, *, chain: str = CHAIN) -> None:
    """The jump and the chain go (tests; a machine given back)."""
    for tool in ("iptables", "ip6tables"):
        binary = shutil.which(tool)
        if binary is None:
            continue
        while (
            subprocess.run(
                [binary, "-w", "-D", *jump_rule(first_uid, last_uid, chain)], capture_output=True
            ).returncode
            == 0
        ):
            pass
        subprocess.run([binary, "-w", "-F", chain], capture_output=True)
        subprocess.run([binary, "-w", "-X", chain], capture_output=True)
