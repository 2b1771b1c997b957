"""LoRA adapters on a frozen backbone: dW = B A on nn.Linear and 1x1 nn.Conv2d layers.

Our own small module rather than peft, because LoRM needs things peft does not give directly:
- dW = B A exactly, with no alpha/r scaling (the closed-form merges are written for B A);
- a frozen dense ``delta`` added to W0, so the same model runs W0 + mean_tau(B_tau A_tau) (Gram passes, the
  stand-in evaluation model) and W0 + S pinv(H) (the merged model) without rebuilding anything;
- freezing at the level of one factor (rounds alternate: only B or only A trains);
- one code path for Linear and 1x1 Conv2d: both are a (d_out, d_in) matrix applied to rows (tokens / pixels).

Factors travel as dicts layer name -> tensor with A: (r, d_in) and B: (d_out, r); names are module paths of the
model the layers live in (e.g. "backbone.blocks.0.attn.qkv").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Factor = Literal["A", "B"]
FACTORS: tuple[Factor, ...] = ("A", "B")


class AdapterError(ValueError):
    """Bad adapter input: unknown factor, unsupported layer, missing layer, wrong shape."""


@dataclass(frozen=True)
class LayerKind:
    """How one kind of base layer is a matrix W: (d_out, d_in) applied to rows of its input."""

    matrix: Callable[[Tensor], Tensor]  # the layer's weight -> W: (d_out, d_in) (a view)
    rows: Callable[[Tensor], Tensor]  # the layer's input -> X: (n_rows, d_in), one row per token / pixel
    apply: Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (input, W: (d_out, d_in), bias: (d_out,)) -> output
    unsupported: Callable[[nn.Module], str | None]  # why this instance cannot be adapted, None if it can


def _conv_unsupported(conv: nn.Conv2d) -> str | None:
    # Only a 1x1, stride-1, unpadded, ungrouped conv is a plain channel matrix applied at every pixel.
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        return f"Conv2d kernel {conv.kernel_size} stride {conv.stride} groups {conv.groups} is not a 1x1 conv"
    if conv.padding not in ((0, 0), "valid", "same"):
        return f"Conv2d padding {conv.padding} adds border pixels, which a channel matrix cannot express"
    return None


LINEAR = LayerKind(
    matrix=lambda w: w,
    rows=lambda x: x.reshape(-1, x.shape[-1]),  # x: (..., d_in)
    apply=lambda x, w, b: F.linear(x, w, b),
    unsupported=lambda m: None,
)
CONV1X1 = LayerKind(
    matrix=lambda w: w[:, :, 0, 0],  # (d_out, d_in, 1, 1) -> (d_out, d_in)
    rows=lambda x: x.movedim(1, -1).reshape(-1, x.shape[1]),  # x: (N, d_in, H, W) -> (N*H*W, d_in)
    apply=lambda x, w, b: F.conv2d(x, w[:, :, None, None], b),
    unsupported=_conv_unsupported,
)
# Checked with isinstance in this order, so subclasses (timm's Linear, Conv2dSame) are covered.
LAYER_KINDS: dict[type[nn.Module], LayerKind] = {nn.Linear: LINEAR, nn.Conv2d: CONV1X1}


def layer_kind(module: nn.Module, name: str = "") -> LayerKind:
    """The kind of a LoRALayer, nn.Linear or 1x1 nn.Conv2d; raises AdapterError naming ``name`` otherwise."""
    if isinstance(module, LoRALayer):
        return module.kind
    for cls, kind in LAYER_KINDS.items():
        if isinstance(module, cls):
            reason = kind.unsupported(module)
            if reason is not None:
                raise AdapterError(f"layer {name!r}: {reason}")
            return kind
    raise AdapterError(
        f"layer {name!r} is a {type(module).__name__}; only nn.Linear and 1x1 nn.Conv2d can be adapted"
    )


def weight_matrix(module: nn.Module, name: str = "") -> Tensor:
    """W0: (d_out, d_in) of a LoRALayer, nn.Linear or 1x1 nn.Conv2d (a view of the frozen weight)."""
    base = module.base if isinstance(module, LoRALayer) else module
    return layer_kind(module, name).matrix(base.weight)


class LoRALayer(nn.Module):
    """y = base(x; W0 + delta) + adapter_scale * B (A x) for a wrapped nn.Linear or 1x1 nn.Conv2d.

    W0: (d_out, d_in) and the bias stay frozen inside ``base``; A: (r, d_in), B: (d_out, r) are parameters;
    ``delta``: (d_out, d_in) | None is a non-persistent buffer (not a parameter, never trained or saved).
    The adapter runs as two thin products (x A^T B^T, or two 1x1 convs) so B A is never materialised.
    """

    def __init__(self, base: nn.Module, rank: int, name: str = "") -> None:
        super().__init__()
        if rank < 1:
            raise AdapterError(f"layer {name!r}: LoRA rank must be >= 1, got {rank}")
        self.kind = layer_kind(base, name)
        base.requires_grad_(False)
        self.base = base
        d_out, d_in = self.kind.matrix(base.weight).shape
        if rank > min(d_out, d_in):
            # The merges invert r x r Grams (A G A^T, B^T B), singular when B A is wider than the layer.
            raise AdapterError(
                f"layer {name!r} ({d_out} x {d_in}): LoRA rank {rank} exceeds its width; use rank <= {min(d_out, d_in)}"
            )
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.A = nn.Parameter(torch.zeros(rank, d_in, **like))
        self.B = nn.Parameter(torch.zeros(d_out, rank, **like))
        self.register_buffer("delta", None, persistent=False)
        self.adapter_scale = 1.0

    @property
    def W0(self) -> Tensor:
        """The frozen base weight as a matrix: (d_out, d_in)."""
        return self.kind.matrix(self.base.weight)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in)."""
        return tuple(self.W0.shape)

    def forward(self, x: Tensor) -> Tensor:
        # Without a delta, the base module itself runs, so an adapter with B = 0 reproduces it bit for bit.
        if self.delta is None:
            y = self.base(x)
        else:
            y = self.kind.apply(x, self.W0 + self.delta, self.base.bias)
        if self.adapter_scale == 0.0:
            return y
        return y + self.adapter_scale * self.kind.apply(self.kind.apply(x, self.A, None), self.B, None)


def _check_factor(which: str) -> None:
    if which not in FACTORS:
        raise AdapterError(f"factor must be one of {FACTORS}, got {which!r}")


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRALayer of ``model`` by module path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def _require_layers(model: nn.Module) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no LoRA layers; call inject_lora first")
    return layers


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every adapted layer, in module order."""
    return {name: layer.shape for name, layer in lora_layers(model).items()}


def _check_layer_set(expected: Mapping[str, object], given: Mapping[str, object], what: str) -> None:
    missing = [n for n in expected if n not in given]
    extra = [n for n in given if n not in expected]
    if missing or extra:
        raise AdapterError(
            f"{what}: layers do not match the model's adapted layers; "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unknown {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )


def _check_adapter_tensor(name: str, what: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise AdapterError(f"{what} of layer {name!r} is a {type(t).__name__}, not a tensor")
    if tuple(t.shape) != shape:
        raise AdapterError(f"{what} of layer {name!r} has shape {tuple(t.shape)}, expected {shape}")
    if not torch.isfinite(t).all():
        raise AdapterError(f"{what} of layer {name!r} has non-finite values")


def init_adapter(
    shapes: Mapping[str, tuple[int, int]], rank: int, seed: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A fresh adapter: (A, B) with A: (r, d_in) ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B: (d_out, r) = 0 (float32, CPU).

    The bound is peft's kaiming_uniform_(a=sqrt(5)). Draws come from a CPU generator seeded by ``seed``, layers
    in sorted name order, so every machine that knows (shapes, rank, seed) gets the same A.
    """
    if rank < 1:
        raise AdapterError(f"LoRA rank must be >= 1, got {rank}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    drawn: dict[str, Tensor] = {}
    for name in sorted(shapes):
        _, d_in = shapes[name]
        bound = 1.0 / math.sqrt(d_in)
        drawn[name] = (torch.rand(rank, d_in, generator=generator) * 2.0 - 1.0) * bound
    A = {name: drawn[name] for name in shapes}
    B = {name: torch.zeros(d_out, rank) for name, (d_out, _) in shapes.items()}
    return A, B


def inject_lora(model: nn.Module, pattern: str, rank: int, *, seed: int = 0) -> list[str]:
    """Wrap every module whose path fully matches the regex ``pattern`` in a LoRALayer, in place.

    New adapters start as init_adapter(..., seed): B = 0, so the model's output is unchanged.
    Returns the adapted layer names in module order; raises AdapterError if nothing matched, if a match is
    not an nn.Linear / 1x1 nn.Conv2d, or if it is already adapted.
    """
    regex = re.compile(pattern)
    existing = lora_layers(model)
    targets = [name for name, _ in model.named_modules() if name and regex.fullmatch(name)]
    if not targets:
        raise AdapterError(f"LoRA pattern {pattern!r} matched no module of {type(model).__name__}")
    for name in targets:
        if any(name == e or name.startswith(e + ".") for e in existing):
            raise AdapterError(f"layer {name!r} is already adapted (or inside an adapted layer)")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALayer(parent.get_submodule(child), rank, name))
    layers = lora_layers(model)
    A, B = init_adapter({name: layers[name].shape for name in targets}, rank, seed)
    with torch.no_grad():
        for name in targets:
            layers[name].A.copy_(A[name])
            layers[name].B.copy_(B[name])
    return targets


def get_factors(model: nn.Module, which: Factor) -> dict[str, Tensor]:
    """Detached CPU copies of one factor of every adapted layer: A: (r, d_in) or B: (d_out, r)."""
    _check_factor(which)
    return {name: getattr(layer, which).detach().to("cpu", copy=True) for name, layer in _require_layers(model).items()}


def set_factors(model: nn.Module, which: Factor, tensors: Mapping[str, Tensor]) -> None:
    """Copy one factor into every adapted layer (cast to the layer's dtype and device).

    ``tensors`` must name exactly the adapted layers, each A: (r, d_in) or B: (d_out, r) and finite.
    """
    _check_factor(which)
    layers = _require_layers(model)
    _check_layer_set(layers, tensors, f"factor {which}")
    for name, layer in layers.items():
        _check_adapter_tensor(name, f"factor {which}", tensors[name], tuple(getattr(layer, which).shape))
    with torch.no_grad():
        for name, layer in layers.items():
            getattr(layer, which).copy_(tensors[name])


def set_trainable(model: nn.Module, which: str) -> None:
    """Make the factors in ``which`` ("A", "B" or "AB") the only trainable tensors of every LoRALayer (W0 and
    bias frozen). Modules outside LoRALayers (the head) are left as they are.
    """
    if not which:
        raise AdapterError("set_trainable needs at least one factor")
    for factor in which:
        _check_factor(factor)
    for layer in _require_layers(model).values():
        layer.base.requires_grad_(False)
        for factor in FACTORS:
            getattr(layer, factor).requires_grad_(factor in which)


def set_deltas(model: nn.Module, deltas: Mapping[str, Tensor] | None, adapter_scale: float = 1.0) -> None:
    """Run every adapted layer as W0 + deltas[name] + adapter_scale * B A.

    ``deltas``: layer -> (d_out, d_in), exactly the adapted layers (cast to the layer's dtype and device), or None
    to drop all deltas (the base op then runs unchanged). ``adapter_scale`` 0 switches the live adapter off.
    """
    if not math.isfinite(adapter_scale):
        raise AdapterError(f"adapter_scale must be finite, got {adapter_scale}")
    layers = _require_layers(model)
    if deltas is not None:
        _check_layer_set(layers, deltas, "deltas")
        for name, layer in layers.items():
            _check_adapter_tensor(name, "delta", deltas[name], layer.shape)
    for name, layer in layers.items():
        w0 = layer.W0
        layer.delta = None if deltas is None else deltas[name].detach().to(device=w0.device, dtype=w0.dtype)
        layer.adapter_scale = float(adapter_scale)
