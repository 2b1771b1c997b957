"""Where each process of a deployment runs: its address and the command prefix that puts it there.

Shared by deploy/local.py (which starts the processes) and deploy/netns.py (which makes hosts out of network
namespaces); neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    """Where a process runs: the address it serves on and the command prefix that puts it there."""

    address: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()
    own_network: bool = False  # a namespace of its own: default ports cannot clash with anything
    iface: str = ""  # its link to the others, seen from the root namespace (for traffic counters)


@dataclass(frozen=True)
class Hosts:
    link: Host
    nodes: tuple[Host, ...]


def loopback(k: int) -> Hosts:
    """The SuperLink and k SuperNodes all on this machine's loopback."""
    return Hosts(Host(), tuple(Host() for _ in range(k)))
