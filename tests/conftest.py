"""Test tiers and seeding for the whole suite.

Tiers: a test that starts Flower's runtime is marked with its tier, `simulation` (a simulation SuperLink + Ray),
`deployment` (real SuperLink / SuperNode processes, network namespaces) or `containers` (runs Docker / Podman
Compose); every test of a tier is also `slow`, added here in one place. `pytest -m "not slow"` runs the fast
tier (in-process federations included); a plain `pytest` runs every tier.

Seeding: every test starts from the same torch, numpy and `random` global state, so a draw a test forgot to
seed is still the same on every run and in any test order. Tests seed their own generators as well; this is
the safety net, not a licence to draw unseeded.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

SLOW_TIERS = ("simulation", "deployment", "containers")
SEED = 0


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `-m "not slow"` must see the added marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in SLOW_TIERS) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed_global_rngs():
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)  # also seeds every CUDA device
    yield
