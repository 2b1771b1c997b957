"""Several hosts on one machine: the SuperLink and each SuperNode in a Linux network namespace of its own.

Layout (X is a free /24 picked per run, names carry a random tag so concurrent runs do not collide):

    root namespace: bridge lfbr<tag> 10.201.X.1  <- the operator's machine: `flwr` runs here
      |- veth -> namespace lorm-<tag>-link   eth0 10.201.X.2   flower-superlink --host 10.201.X.2 --port 8000
      |- veth -> namespace lorm-<tag>-node0  eth0 10.201.X.10  flower-supernode --superlink 10.201.X.2:8000
      |- ...

Every Fleet and Control API message crosses a veth pair and the bridge; each SuperNode's Runtime API and the
SuperLink's SuperExec stay on their namespace's own loopback, as they would on separate hosts. Needs root
(CAP_NET_ADMIN); `namespaces()` raises NetnsUnavailable when it cannot create them, and always deletes what it
made.
"""

from __future__ import annotations

import secrets
import subprocess
from contextlib import contextmanager

from deploy.hosts import Host, Hosts


class NetnsUnavailable(RuntimeError):
    """This machine (or user) cannot create network namespaces."""


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


def _free_subnet() -> int:
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for x in [secrets.randbelow(254) + 1 for _ in range(64)]:
        if f"10.201.{x}." not in used:
            return x
    raise RuntimeError("no free 10.201.X.0/24 subnet")


@contextmanager
def namespaces(k: int):
    """Create a link namespace and k node namespaces on one bridge; yield their Hosts; delete them all."""
    tag = secrets.token_hex(3)
    bridge = f"lfbr{tag}"
    made_ns: list[str] = []
    made_links = [bridge]
    try:
        try:
            _ip("netns", "add", f"lorm-{tag}-link")
        except (RuntimeError, FileNotFoundError) as err:
            raise NetnsUnavailable(f"cannot create a network namespace (root and `ip` needed): {err}") from None
        made_ns.append(f"lorm-{tag}-link")
        x = _free_subnet()
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"10.201.{x}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")

        def member(ns: str, index: str, last_octet: int) -> Host:
            if ns not in made_ns:
                _ip("netns", "add", ns)
                made_ns.append(ns)
            outside, inside = f"lf{tag}h{index}", f"lf{tag}n{index}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            made_links.append(outside)
            _ip("link", "set", inside, "netns", ns)
            _ip("-n", ns, "link", "set", inside, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"10.201.{x}.{last_octet}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # Runtime APIs and SuperExec talk over the namespace's loopback
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            return Host(f"10.201.{x}.{last_octet}", ("ip", "netns", "exec", ns), own_network=True, iface=outside)

        link = member(f"lorm-{tag}-link", "l", 2)
        nodes = tuple(member(f"lorm-{tag}-node{i}", str(i), 10 + i) for i in range(k))
        yield Hosts(link, nodes)
    finally:
        for ns in made_ns:  # deleting a namespace deletes its end of the veth pair, and with it the other end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for dev in made_links:
            subprocess.run(["ip", "link", "del", dev], capture_output=True)
