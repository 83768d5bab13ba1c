"""Test hosts on one machine: network namespaces, each joined to this one by a veth pair.

Host i is the namespace `pgws<tag>n<i>` with the address 10.<net>.<i>.2/24 on its end of the pair
(and its own loopback); this namespace has 10.<net>.<i>.1 on the other end, so the test process
and a PostgreSQL listening on that address reach every host, and hosts reach each other through
this namespace only when forwarding is on (it is not needed: hosts talk to PostgreSQL and to the
test's clients, never to each other, like gateways behind a load balancer).

Needs root (CAP_NET_ADMIN) and iproute2; `unavailable()` says why not, for a skip reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Host:
    """One namespace: run a command in it with `exec_prefix + command`."""

    namespace: str
    address: str  # the host's own address, on its end of the veth pair
    gateway: str  # this namespace's address on the other end (where PostgreSQL listens)

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def unavailable() -> str | None:
    """Why test hosts cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"pgwsprobe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"cannot make a network namespace: {detail.strip()}"
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("netns", "del", probe)
    return None


def _routed_networks() -> list[ipaddress.IPv4Network]:
    routes = subprocess.run(
        ["ip", "-4", "route", "show"], check=True, capture_output=True, text=True, timeout=10
    ).stdout
    found = []
    for line in routes.splitlines():
        destination = line.split(maxsplit=1)[0] if line.strip() else "default"
        with contextlib.suppress(ValueError):
            if destination != "default":
                found.append(ipaddress.IPv4Network(destination, strict=False))
    return found


def _free_network() -> int:
    """N such that no route here covers 10.N.0.0/16 (tried from a pid-chosen start, so that two
    runs at once rarely meet)."""
    used = _routed_networks()
    for offset in range(50):
        n = 200 + (os.getpid() + offset) % 50
        if not any(ipaddress.IPv4Network(f"10.{n}.0.0/16").overlaps(net) for net in used):
            return n
    raise RuntimeError("no free 10.N.0.0/16 network for the test hosts")


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """`count` test hosts, removed (namespaces and links) however the block ends."""
    tag = str(os.getpid() % 100000)
    net = _free_network()
    made: list[Host] = []
    try:
        for i in range(1, count + 1):
            namespace, outside, inside = f"pgws{tag}n{i}", f"pgws{tag}h{i}", f"pgws{tag}v{i}"
            host = Host(namespace, f"10.{net}.{i}.2", f"10.{net}.{i}.1")
            _ip("netns", "add", namespace)
            made.append(host)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("addr", "add", f"{host.gateway}/24", "dev", outside)
            _ip("link", "set", outside, "up")
            _ip("-n", namespace, "addr", "add", f"{host.address}/24", "dev", inside)
            _ip("-n", namespace, "link", "set", inside, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        yield made
    finally:
        for i, host in enumerate(made, start=1):
            # Deleting the namespace deletes its end of the pair, and with it the other end.
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", host.namespace)
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", f"pgws{tag}h{i}")
