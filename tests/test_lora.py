"""LoRA through peft, factor handling and the FCIL model, checked against explicit W0 + delta + B A references."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from peft.tuners.lora import LoraLayer

from common.lora import (
    factor_matrix,
    factor_param,
    get_factors,
    init_adapter,
    inject_lora,
    layer_shapes,
    lora_layers,
    set_deltas,
    set_factors,
    set_trainable,
)
from common.model import build_model

F64 = torch.float64


class Tiny(nn.Module):
    """A Linear over tokens and a 1x1 conv over pixels, in float64 so references can be compared tightly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 5, dtype=F64)
        self.conv = nn.Conv2d(4, 3, kernel_size=1, dtype=F64)
        self.conv_nobias = nn.Conv2d(3, 2, kernel_size=1, bias=False, dtype=F64)
        self.spatial = nn.Conv2d(3, 3, kernel_size=3, padding=1, dtype=F64)


def _inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 7, 6, generator=g, dtype=F64), torch.randn(2, 4, 3, 5, generator=g, dtype=F64)


def _run(m: Tiny, x_tok: Tensor, x_img: Tensor) -> tuple[Tensor, Tensor]:
    return m.lin(x_tok), m.conv_nobias(m.conv(x_img))


def _ref_linear(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    return torch.einsum("...i,oi->...o", x, W) + b


def _ref_conv(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    y = torch.einsum("nihw,oi->nohw", x, W)
    return y if b is None else y + b[None, :, None, None]


def _random_factors(m: nn.Module, seed: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    A = {n: torch.randn(factor_matrix(l, "A").shape, generator=g, dtype=F64) for n, l in lora_layers(m).items()}
    B = {n: torch.randn(factor_matrix(l, "B").shape, generator=g, dtype=F64) for n, l in lora_layers(m).items()}
    return A, B


@pytest.fixture
def adapted() -> tuple[Tiny, Tiny]:
    """(plain copy, adapted) with LoRA rank 2 on lin, conv and conv_nobias."""
    plain, model = Tiny(), Tiny()
    names = inject_lora(model, r"lin|conv|conv_nobias", rank=2)
    assert names == ["lin", "conv", "conv_nobias"]
    return plain, model


def test_fresh_adapter_reproduces_base_exactly(adapted):
    plain, model = adapted
    x_tok, x_img = _inputs()
    for got, want in zip(_run(model, x_tok, x_img), _run(plain, x_tok, x_img)):
        assert torch.equal(got, want)
    layers = lora_layers(model).values()
    assert all(isinstance(l, LoraLayer) and l.scaling == {"default": 1.0} for l in layers)  # peft's, lora_alpha = r
    assert all(torch.count_nonzero(factor_param(l, "B")) == 0 and torch.count_nonzero(factor_param(l, "A")) > 0
               for l in layers)


def test_adapted_output_matches_w0_plus_ba(adapted):
    plain, model = adapted
    A, B = _random_factors(model, seed=3)
    set_factors(model, "A", A)
    set_factors(model, "B", B)
    x_tok, x_img = _inputs()
    y_tok, y_img = _run(model, x_tok, x_img)
    torch.testing.assert_close(y_tok, _ref_linear(x_tok, plain.lin.weight + B["lin"] @ A["lin"], plain.lin.bias))
    W_conv = plain.conv.weight[:, :, 0, 0] + B["conv"] @ A["conv"]
    W_nb = plain.conv_nobias.weight[:, :, 0, 0] + B["conv_nobias"] @ A["conv_nobias"]
    ref = _ref_conv(_ref_conv(x_img, W_conv, plain.conv.bias), W_nb, None)
    torch.testing.assert_close(y_img, ref, rtol=1e-12, atol=1e-12)


def test_delta_and_scale(adapted):
    plain, model = adapted
    A, B = _random_factors(model, seed=4)
    set_factors(model, "A", A)
    set_factors(model, "B", B)
    g = torch.Generator().manual_seed(5)
    deltas = {n: torch.randn(s, generator=g, dtype=F64) for n, s in layer_shapes(model).items()}
    x_tok, x_img = _inputs()
    for scale in (0.0, 0.25, 1.0):
        set_deltas(model, deltas, adapter_scale=scale)
        W = plain.lin.weight + deltas["lin"] + scale * B["lin"] @ A["lin"]
        torch.testing.assert_close(model.lin(x_tok), _ref_linear(x_tok, W, plain.lin.bias), rtol=1e-12, atol=1e-12)
        W = plain.conv.weight[:, :, 0, 0] + deltas["conv"] + scale * B["conv"] @ A["conv"]
        torch.testing.assert_close(model.conv(x_img), _ref_conv(x_img, W, plain.conv.bias), rtol=1e-12, atol=1e-12)
    set_deltas(model, None, adapter_scale=0.0)
    assert torch.equal(model.lin(x_tok), plain.lin(x_tok))


def test_deltas_give_back_the_very_w0(adapted):
    """set_deltas swaps W0 + delta into peft's base layer and puts the same W0 tensor back: bit for bit, the same
    object, never part of the state dict (peft's merge/unmerge would add and subtract in place, see lora.py)."""
    _, model = adapted
    weights = {n: l.get_base_layer().weight for n, l in lora_layers(model).items()}
    saved = {n: w.detach().clone() for n, w in weights.items()}
    keys = list(model.state_dict())
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        set_deltas(model, {n: torch.randn(s, generator=g, dtype=F64) for n, s in layer_shapes(model).items()})
        assert list(model.state_dict()) == keys
        assert all(l.get_base_layer().weight is not weights[n] for n, l in lora_layers(model).items())
    set_deltas(model, None)
    for name, layer in lora_layers(model).items():
        assert layer.get_base_layer().weight is weights[name] and torch.equal(weights[name], saved[name])


def test_deltas_must_match_layers(adapted):
    _, model = adapted
    deltas = {n: torch.zeros(s, dtype=F64) for n, s in layer_shapes(model).items()}
    with pytest.raises(ValueError, match="conv_nobias"):
        set_deltas(model, {k: v for k, v in deltas.items() if k != "conv_nobias"})
    with pytest.raises(ValueError, match="'conv'.*shape"):
        set_deltas(model, deltas | {"conv": torch.zeros(4, 3)})


def test_set_trainable_only_that_factor_moves(adapted):
    _, model = adapted
    A, B = _random_factors(model, seed=6)
    set_factors(model, "A", A)
    set_factors(model, "B", B)
    for which in ("A", "B"):
        set_trainable(model, which)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {f"{layer}.lora_{which}.default.weight" for layer in lora_layers(model)}
        expected |= {"spatial.weight", "spatial.bias"}
        assert trainable == expected  # modules outside LoRA layers (here "spatial") are left alone
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x_tok, x_img = _inputs()
        loss = sum(y.square().sum() for y in _run(model, x_tok, x_img))
        loss.backward()
        with torch.no_grad():
            for layer in lora_layers(model).values():
                factor_param(layer, which).sub_(0.1 * factor_param(layer, which).grad)
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == {f"{layer}.lora_{which}.default.weight" for layer in lora_layers(model)}
        model.zero_grad(set_to_none=True)


def test_factor_round_trip(adapted):
    _, model = adapted
    A, B = _random_factors(model, seed=7)
    set_factors(model, "A", A)
    set_factors(model, "B", B)
    got_A, got_B = get_factors(model, "A"), get_factors(model, "B")
    assert list(got_A) == ["lin", "conv", "conv_nobias"]
    for name in A:
        assert torch.equal(got_A[name], A[name]) and torch.equal(got_B[name], B[name])
    got_A["lin"].zero_()  # a copy, not a view of the parameter
    assert torch.count_nonzero(factor_param(lora_layers(model)["lin"], "A")) > 0


def test_set_factors_errors_name_the_layer(adapted):
    _, model = adapted
    A, _ = _random_factors(model, seed=8)
    with pytest.raises(ValueError, match="conv_nobias"):
        set_factors(model, "A", {k: v for k, v in A.items() if k != "conv_nobias"})
    with pytest.raises(ValueError, match="'conv'.*shape.*expected \\(2, 4\\)"):
        set_factors(model, "A", A | {"conv": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="extra"):
        set_factors(model, "A", A | {"extra": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="'lin'.*non-finite"):
        set_factors(model, "A", A | {"lin": torch.full((2, 6), float("nan"))})
    with pytest.raises(ValueError, match="factor"):
        set_factors(model, "C", A)


def test_inject_errors():
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(Tiny(), r"nothing", rank=2)
    with pytest.raises(ValueError, match="'spatial'.*not a 1x1"):
        inject_lora(Tiny(), r"spatial", rank=2)
    with pytest.raises(ValueError, match="'lin'.*LoRA rank"):
        inject_lora(Tiny(), r"lin", rank=0)
    model = Tiny()
    inject_lora(model, r"lin", rank=2)
    with pytest.raises(ValueError, match="already adapted"):
        inject_lora(model, r"lin(\.base_layer)?", rank=2)
    strided = nn.Module()
    strided.strided = nn.Conv2d(3, 3, 1, stride=2)
    with pytest.raises(ValueError, match="'strided'.*not a 1x1"):
        inject_lora(strided, r"strided", rank=1)
    with pytest.raises(ValueError, match="'lin'.*exceeds its width"):
        inject_lora(Tiny(), r"lin", rank=6)


def test_init_adapter_seeded():
    shapes = {"b": (5, 16), "a": (3, 4)}
    A1, B1 = init_adapter(shapes, rank=3, seed=11)
    A2, _ = init_adapter(dict(reversed(shapes.items())), rank=3, seed=11)
    A3, _ = init_adapter(shapes, rank=3, seed=12)
    assert list(A1) == ["b", "a"] and list(B1) == ["b", "a"]
    for name, (d_out, d_in) in shapes.items():
        assert A1[name].shape == (3, d_in) and A1[name].dtype == torch.float32
        assert torch.equal(A1[name], A2[name])  # independent of dict order
        assert not torch.equal(A1[name], A3[name])
        assert A1[name].abs().max() <= d_in**-0.5
        assert A1[name].std() > 0.3 * d_in**-0.5  # spread over the range, not degenerate
        assert torch.equal(B1[name], torch.zeros(d_out, 3))


def test_vit_tiny_model():
    model = build_model("vit_tiny_test", num_classes=7, rank=3)
    assert len(model.adapted_layers) == 4 * 2
    assert all(name.startswith("backbone.blocks.") for name in model.adapted_layers)
    assert {s[1] for s in layer_shapes(model).values()} == {64, 256}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(build_model("vit_tiny_test", 7, 3, head_init="zeros")(x), torch.zeros(3, 7))
    assert torch.equal(model.features(x), build_model("vit_tiny_test", 7, 3).features(x))  # seeded, deterministic


def test_head_starts_as_timm_classifiers_do_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    head = build_model("vit_tiny_test", num_classes=50, rank=1, seed=4).head
    assert torch.equal(torch.rand(3), before)  # building a model drew nothing from the global stream
    assert torch.equal(head.bias, torch.zeros(50))
    assert head.weight.abs().max() <= 2.0 and 0.015 < float(head.weight.detach().std()) < 0.025  # std 0.02, truncated
    assert torch.equal(head.weight, build_model("vit_tiny_test", num_classes=50, rank=1, seed=4).head.weight)
    assert not torch.equal(head.weight, build_model("vit_tiny_test", num_classes=50, rank=1, seed=5).head.weight)


def test_efficientnet_model_and_eval_mode():
    from common.backbones import BACKBONES

    plain = BACKBONES["efficientnet_lite0"].build(None).eval()
    model = build_model("efficientnet_lite0", num_classes=4, rank=2)
    one_by_one = [
        n for n, m in plain.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert model.adapted_layers == [f"backbone.{n}" for n in one_by_one]
    assert all(l.get_base_layer().kernel_size == (1, 1) for l in lora_layers(model).values())
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if ".lora_" not in n)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    running = model.backbone.bn1.running_mean.clone()
    logits = model(x)
    assert logits.shape == (2, 4)
    assert torch.equal(model.backbone.bn1.running_mean, running)  # BatchNorm statistics frozen in train()
    assert torch.equal(model.features(x), plain(x))  # B = 0: exactly the pre-trained features


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        build_model("nope", num_classes=3, rank=1)
