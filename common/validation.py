"""Reply validation (placeholder by the lead until the validation module lands)."""

from __future__ import annotations

import torch


class InvalidUpdate(ValueError):
    def __init__(self, client: str, layer: str, reason: str) -> None:
        super().__init__(f"client {client}, layer {layer}: {reason}")
        self.client, self.layer, self.reason = client, layer, reason


def validate_update(client, factors, grams, num_examples, expected_factor_shapes, expected_gram_shapes) -> None:
    if num_examples < 0:
        raise InvalidUpdate(client, "-", f"negative sample count {num_examples}")
    for given, expected, what in ((factors, expected_factor_shapes, "factor"), (grams, expected_gram_shapes, "gram")):
        if set(given) != set(expected):
            raise InvalidUpdate(client, str(sorted(set(given) ^ set(expected))[:3]), f"{what} layer set differs")
        for name, t in given.items():
            if tuple(t.shape) != tuple(expected[name]):
                raise InvalidUpdate(client, name, f"{what} shape {tuple(t.shape)} != {tuple(expected[name])}")
            if not torch.isfinite(t).all():
                raise InvalidUpdate(client, name, f"{what} has NaN/Inf")
