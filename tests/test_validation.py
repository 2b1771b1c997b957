"""Every kind of malformed reply is refused with a reason that names the client and the layer."""

import pytest
import torch

from common.validation import InvalidUpdate, check_gram, validate_update

SHAPES = {"blocks.0.qkv": (4, 6), "head.weight": (3, 5)}
GRAM_SHAPES = {"blocks.0.qkv": (6,), "head": (5, 5)}


def good():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 5, dtype=torch.float64, generator=g)
    tensors = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    grams = {"blocks.0.qkv": torch.rand(6, dtype=torch.float64, generator=g), "head": X.T @ X}
    return tensors, grams


def check(tensors, grams, n=20):
    validate_update("7", tensors, grams, n, SHAPES, GRAM_SHAPES)


def test_a_good_reply_passes():
    check(*good())


def _nan(t, g):
    t["blocks.0.qkv"][1, 2] = float("nan")


def _inf(t, g):
    g["head"][0, 0] = float("inf")


def _shape(t, g):
    t["blocks.0.qkv"] = torch.zeros(4, 7)


def _dtype(t, g):
    t["head.weight"] = t["head.weight"].to(torch.int64)


def _missing(t, g):
    del g["blocks.0.qkv"]


def _extra(t, g):
    t["blocks.9.fc1"] = torch.zeros(2, 2)


def _negative_diag(t, g):
    g["blocks.0.qkv"][3] = -1.0


def _asymmetric(t, g):
    g["head"][0, 1] += 1.0


def _not_psd(t, g):
    # |G_01| > sqrt(G_00 G_11) breaks Cauchy-Schwarz: symmetric, positive diagonal, but indefinite
    g["head"][0, 1] = g["head"][1, 0] = 2 * (g["head"][0, 0] * g["head"][1, 1]).sqrt()


def _not_tensor(t, g):
    g["head"] = [[1.0]]


CASES = {
    "NaN": (_nan, "blocks.0.qkv", "NaN"),
    "Inf": (_inf, "head", "NaN or Inf"),
    "shape": (_shape, "blocks.0.qkv", "shape"),
    "dtype": (_dtype, "head.weight", "dtype"),
    "missing layer": (_missing, "blocks.0.qkv", "missing"),
    "extra layer": (_extra, "blocks.9.fc1", "unexpected"),
    "negative diagonal": (_negative_diag, "blocks.0.qkv", "negative"),
    "asymmetric": (_asymmetric, "head", "not symmetric"),
    "not PSD": (_not_psd, "head", "positive semi-definite"),
    "not a tensor": (_not_tensor, "head", "not a tensor"),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_replies_are_refused_naming_client_and_layer(case):
    spoil, layer, reason = CASES[case]
    tensors, grams = good()
    spoil(tensors, grams)
    with pytest.raises(InvalidUpdate, match=reason) as err:
        check(tensors, grams)
    assert (err.value.client, err.value.layer) == ("7", layer)
    assert str(err.value).startswith(f"client 7, layer {layer}")


@pytest.mark.parametrize("n", [-1, 2.5, "3"])
def test_bad_sample_counts_are_refused(n):
    with pytest.raises(InvalidUpdate, match="sample count"):
        check(*good(), n=n)


def test_zero_samples_with_statistics_is_inconsistent():
    with pytest.raises(InvalidUpdate, match="zero samples"):
        check(*good(), n=0)
    tensors, grams = good()
    check(tensors, {k: torch.zeros_like(g) for k, g in grams.items()}, n=0)


def test_a_float32_gram_of_real_data_passes_the_psd_check():
    """Float32 round-off must not make an honest Gram look indefinite (rank-deficient: 3 rows, 64 features)."""
    X = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    check_gram("1", "l", (X.T @ X).to(torch.float32))
