"""``flower-supernode`` with a shorter idle poll: ``python -m cli.supernode [--idle-poll S] <its flags>``.

Flower 1.42's SuperNode asks the SuperLink for a message and, when none is waiting, sleeps a fixed 3 s
(flwr/supernode/start_client_internal.py), so every order reaches a node on average 1.5 s (at worst 3 s) after
the server sent it: most of what a deployed round costs beyond a simulated one once messages are packed and the
ClientApp is warm (docs/deployment.md). Here that one wait is ``--idle-poll`` seconds (default 0.2); every other
flag is flower-supernode's. An idle node then sends 1/S requests a second to the SuperLink: right for a few
nodes, not for hundreds (use plain flower-supernode there). Pinned to flwr 1.42 (tests/test_warm_exec.py).
"""

from __future__ import annotations

import argparse
import sys
import time

from flwr.supernode import start_client_internal as node_loop
from flwr.supernode.cli.flower_supernode import flower_supernode

FLOWER_IDLE_S = 3  # the literal of node_loop's idle wait


class _IdleClock:
    """The ``time`` module as node_loop sees it, with its idle wait shortened and every other sleep as is."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle_s if seconds == FLOWER_IDLE_S else seconds)


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--idle-poll", type=float, default=0.2)
    args, rest = parser.parse_known_args()
    if not 0 < args.idle_poll <= FLOWER_IDLE_S:
        parser.error(f"--idle-poll must be in (0, {FLOWER_IDLE_S}] seconds, got {args.idle_poll}")
    node_loop.time = _IdleClock(args.idle_poll)
    sys.argv = [sys.argv[0], *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
