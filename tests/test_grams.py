"""Gram collection, checked against inputs captured by a plain hook and X^T X computed here in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from common.grams import collect_grams, shrink
from common.lora import inject_lora, set_factors


def _rand(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Net(nn.Module):
    """tokens (N, T, 6) -> lin (6 -> 4); images (N, 5, H, W) -> conv 1x1 (5 -> 3) -> LoRA conv 1x1 (3 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 4)
        self.conv = nn.Conv2d(5, 3, 1)
        self.lora = nn.Conv2d(3, 2, 1)
        inject_lora(self, r"lora", rank=2)  # a peft LoRA layer: the hooks see its input
        set_factors(self, "A", {"lora": _rand(2, 3, seed=9)})
        set_factors(self, "B", {"lora": _rand(2, 2, seed=10)})

    def forward(self, tokens: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.lin(tokens), self.lora(torch.relu(self.conv(images)))


def _batches() -> list[tuple[Tensor, Tensor]]:
    # Offset inputs: a non-zero mean makes X^T X differ clearly from a covariance.
    return [(_rand(2, 7, 6, seed=s) + 0.5, _rand(2, 5, 3, 4, seed=100 + s) + 1.0) for s in range(3)]


def _reference(net: Net) -> dict[str, Tensor]:
    """Stacked rows X: (n, d_in) per layer, captured by plain forward hooks, in float64."""
    captured: dict[str, list[Tensor]] = {"lin": [], "conv": [], "lora": []}
    to_rows = {
        "lin": lambda x: x.reshape(-1, x.shape[-1]),
        "conv": lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]),
        "lora": lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]),
    }
    handles = [
        getattr(net, name).register_forward_hook(lambda m, args, out, name=name: captured[name].append(args[0]))
        for name in captured
    ]
    with torch.no_grad():
        for tokens, images in _batches():
            net(tokens, images)
    for h in handles:
        h.remove()
    return {name: torch.cat([to_rows[name](x) for x in xs]).double() for name, xs in captured.items()}


def _collect(net: Net, alpha: dict[str, float]):
    modules = {name: getattr(net, name) for name in alpha}
    with collect_grams(modules, alpha) as stats, torch.no_grad():
        for tokens, images in _batches():
            net(tokens, images)
    return stats


def test_dense_and_diagonal_match_reference():
    net = Net()
    X = _reference(net)
    dense = _collect(net, {"lin": 1.0, "conv": 0.5, "lora": 0.3})
    diag = _collect(net, {"lin": 0.0, "conv": 0.0, "lora": 0.0})
    for name, a in dense.alpha.items():
        G = X[name].T @ X[name]
        want = a * G + (1 - a) * torch.diag(torch.diag(G))
        assert dense.grams[name].dtype == torch.float64
        torch.testing.assert_close(dense.grams[name], want, rtol=1e-10, atol=1e-10)
        assert diag.grams[name].shape == (G.shape[0],)  # the memory form: never a dense matrix
        assert diag.sums[name].shape == (G.shape[0],)
        torch.testing.assert_close(diag.grams[name], torch.diag(G), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(diag.grams[name], torch.diag(dense.sums[name]), rtol=1e-12, atol=1e-12)


def test_row_counts():
    stats = _collect(Net(), {"lin": 0.0, "conv": 0.5, "lora": 0.0})
    assert stats.rows == {"lin": 3 * 2 * 7, "conv": 3 * 2 * 3 * 4, "lora": 3 * 2 * 3 * 4}  # tokens; N*H*W


def test_unused_layer_gives_zero_gram():
    net = Net()
    with collect_grams({"lin": net.lin, "lora": net.lora}, {"lin": 0.0, "lora": 0.5}) as stats:
        net.lin(_rand(4, 6, seed=1))
    assert stats.rows == {"lin": 4, "lora": 0}
    assert torch.equal(stats.grams["lora"], torch.zeros(3, 3, dtype=torch.float64))


def test_hooks_removed_on_exit_and_on_error():
    net = Net()
    with collect_grams({"lin": net.lin}, {"lin": 0.0}) as stats:
        net.lin(_rand(2, 6, seed=1))
    net.lin(_rand(5, 6, seed=2))
    assert stats.rows["lin"] == 2 and not net.lin._forward_pre_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with collect_grams({"conv": net.conv}, {"conv": 0.5}):
            raise RuntimeError("boom")
    assert not net.conv._forward_pre_hooks


def test_chunked_accumulation_matches(monkeypatch):
    import common.grams as grams

    net = Net()
    X = _reference(net)
    monkeypatch.setattr(grams, "_CHUNK_ELEMENTS", 7)  # forces many tiny chunks per batch
    stats = _collect(net, {"lin": 1.0, "conv": 0.0, "lora": 1.0})
    torch.testing.assert_close(stats.grams["lin"], X["lin"].T @ X["lin"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.grams["conv"], (X["conv"] ** 2).sum(0), rtol=1e-10, atol=1e-10)


def test_shrink():
    G = _rand(2, 4, 4, seed=3)
    torch.testing.assert_close(shrink(G, 0.0), torch.stack([torch.diag(g) for g in G]))
    want = torch.stack([0.25 * g + 0.75 * torch.diag(torch.diag(g)) for g in G])
    torch.testing.assert_close(shrink(G, 0.25), want)
    assert torch.equal(shrink(G, 1.0), G)
    with pytest.raises(ValueError, match="alpha"):
        shrink(G, 1.5)


def test_bad_requests():
    net = Net()
    with pytest.raises(ValueError, match="no alpha for \\['conv'\\]"):
        with collect_grams({"lin": net.lin, "conv": net.conv}, {"lin": 0.0}):
            pass
    with pytest.raises(ValueError, match="'lin'.*alpha"):
        with collect_grams({"lin": net.lin}, {"lin": -0.1}):
            pass
    with pytest.raises(ValueError, match="'pool'"):
        with collect_grams({"pool": nn.AvgPool2d(2)}, {"pool": 0.0}):
            pass
    with pytest.raises(ValueError, match="'k3'.*not a 1x1"):
        with collect_grams({"k3": nn.Conv2d(3, 3, 3)}, {"k3": 0.0}):
            pass
    assert not net.lin._forward_pre_hooks
