"""Test tiers for the whole suite.

Tiers: a test that starts Flower's runtime is marked with its tier, `simulation` (a simulation SuperLink + Ray),
`deployment` (real SuperLink / SuperNode processes, network namespaces) or `containers` (runs Docker / Podman
Compose); every test of a tier is also `slow`, added here in one place. `pytest -m "not slow"` runs the fast
tier (in-process federations included); a plain `pytest` runs every tier.

"""

from __future__ import annotations

import pytest

SLOW_TIERS = ("simulation", "deployment", "containers")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `-m "not slow"` must see the added marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in SLOW_TIERS) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
