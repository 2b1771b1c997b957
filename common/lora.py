"""LoRA adapters through peft on a frozen backbone: dW = B A on nn.Linear and 1x1 nn.Conv2d layers.

The layers are peft's own (``LoraConfig`` + ``inject_adapter_in_model``): module paths stay those of the model,
each adapted layer keeps its weight in ``base_layer`` and its factors in ``lora_A["default"]`` /
``lora_B["default"]``. What LoRM needs on top, done here on peft's layers:
- dW = B A exactly: ``lora_alpha = r``, so peft's scaling is 1;
- factors as matrices, A: (r, d_in) and B: (d_out, r), for Linear and 1x1 Conv2d alike (a conv's factors are
  (r, d_in, 1, 1) / (d_out, r, 1, 1) tensors; get/set read and write their (.., 0, 0) matrix views);
- freezing at the level of one factor (rounds alternate: only B or only A trains);
- A from the server's broadcast (``init_adapter``: seeded, the same on every machine), B zero at a task start;
- the model running as W0 + delta + scale * B A (``set_deltas``): Gram passes through W0 + mean_tau(B_tau A_tau),
  evaluation of W0 + S pinv(H). peft has no slot for a dense frozen delta: its ``merge``/``unmerge`` add and
  subtract B A inside W0 in place, which does not give W0 back bit for bit (docs/architecture.md, "LoRA through
  peft"). So ``set_deltas`` swaps the base layer's weight for W0 + delta and puts the very W0 tensor back.

Factors travel as dicts layer name -> tensor; names are module paths of the model the layers live in
(e.g. "backbone.blocks.0.attn.qkv").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

Factor = Literal["A", "B"]
FACTORS: tuple[Factor, ...] = ("A", "B")
ADAPTER = "default"  # the one peft adapter each layer carries
_W0 = "_lorm_w0"  # attribute of a peft layer holding its own W0 Parameter while set_deltas has swapped it out


class AdapterError(ValueError):
    """Bad adapter input: unknown factor, unsupported layer, missing layer, wrong shape."""


@dataclass(frozen=True)
class LayerKind:
    """How one kind of base layer is a matrix W: (d_out, d_in) applied to rows of its input."""

    matrix: Callable[[Tensor], Tensor]  # the layer's weight (or a factor's) -> its (d_out, d_in) matrix (a view)
    rows: Callable[[Tensor], Tensor]  # the layer's input -> X: (n_rows, d_in), one row per token / pixel
    unsupported: Callable[[nn.Module], str | None]  # why this instance cannot be adapted, None if it can


def _conv_unsupported(conv: nn.Conv2d) -> str | None:
    # Only a 1x1, stride-1, unpadded, ungrouped conv is a plain channel matrix applied at every pixel. peft would
    # adapt any conv; the closed-form merges need the channel matrix.
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        return f"Conv2d kernel {conv.kernel_size} stride {conv.stride} groups {conv.groups} is not a 1x1 conv"
    if conv.padding not in ((0, 0), "valid", "same"):
        return f"Conv2d padding {conv.padding} adds border pixels, which a channel matrix cannot express"
    return None


LINEAR = LayerKind(
    matrix=lambda w: w,
    rows=lambda x: x.reshape(-1, x.shape[-1]),  # x: (..., d_in)
    unsupported=lambda m: None,
)
CONV1X1 = LayerKind(
    matrix=lambda w: w[:, :, 0, 0],  # (d_out, d_in, 1, 1) -> (d_out, d_in)
    rows=lambda x: x.movedim(1, -1).reshape(-1, x.shape[1]),  # x: (N, d_in, H, W) -> (N*H*W, d_in)
    unsupported=_conv_unsupported,
)
# Checked with isinstance in this order, so subclasses (timm's Linear, Conv2dSame) are covered.
LAYER_KINDS: dict[type[nn.Module], LayerKind] = {nn.Linear: LINEAR, nn.Conv2d: CONV1X1}


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def layer_kind(module: nn.Module, name: str = "") -> LayerKind:
    """The kind of a peft LoRA layer's base, an nn.Linear or a 1x1 nn.Conv2d; AdapterError naming ``name``
    otherwise."""
    base = _base(module)
    for cls, kind in LAYER_KINDS.items():
        if isinstance(base, cls):
            reason = kind.unsupported(base)
            if reason is not None:
                raise AdapterError(f"layer {name!r}: {reason}")
            return kind
    raise AdapterError(
        f"layer {name!r} is a {type(base).__name__}; only nn.Linear and 1x1 nn.Conv2d can be adapted"
    )


def weight_matrix(module: nn.Module, name: str = "") -> Tensor:
    """The weight as a matrix (d_out, d_in) of a peft LoRA layer's base, an nn.Linear or a 1x1 nn.Conv2d (a view;
    W0 + delta while ``set_deltas`` has a delta in)."""
    return layer_kind(module, name).matrix(_base(module).weight)


def factor_param(layer: LoraLayer, which: Factor) -> nn.Parameter:
    """The parameter holding one factor of a peft layer: lora_A / lora_B's weight (a 1x1 conv's is 4-d)."""
    return (layer.lora_A if which == "A" else layer.lora_B)[ADAPTER].weight


def factor_matrix(layer: LoraLayer, which: Factor) -> Tensor:
    """A: (r, d_in) or B: (d_out, r), a view of the parameter."""
    return layer_kind(layer).matrix(factor_param(layer, which))


def lora_config(pattern: str, rank: int, **extra) -> LoraConfig:
    """peft's config for our adapters: the regex ``pattern`` (full match of module paths), rank r and
    lora_alpha = r (scaling 1, so dW = B A), no dropout, no bias; factors are set by the caller."""
    return LoraConfig(
        r=rank, lora_alpha=rank, target_modules=pattern, lora_dropout=0.0, bias="none", init_lora_weights=False,
        **extra,
    )


def _check_factor(which: str) -> None:
    if which not in FACTORS:
        raise AdapterError(f"factor must be one of {FACTORS}, got {which!r}")


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every peft LoRA layer of ``model`` by module path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _require_layers(model: nn.Module) -> dict[str, LoraLayer]:
    layers = lora_layers(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no LoRA layers; call inject_lora first")
    return layers


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every adapted layer, in module order."""
    return {name: tuple(weight_matrix(layer, name).shape) for name, layer in lora_layers(model).items()}


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
    """peft LoRA of rank ``rank`` on every module whose path fully matches the regex ``pattern``, in place.

    New adapters start as init_adapter(..., seed): B = 0, so the model's output is unchanged. Which parameters
    require grad is left as it was (peft would freeze everything else), and the global random state is untouched
    (peft's layers draw their initial weights from it). Returns the adapted layer names in module order; raises
    AdapterError if nothing matched, if a match is not an nn.Linear / 1x1 nn.Conv2d, if the rank exceeds a
    layer's width, or if it is already adapted.
    """
    regex = re.compile(pattern)
    existing = lora_layers(model)
    targets = [name for name, _ in model.named_modules() if name and regex.fullmatch(name)]
    if not targets:
        raise AdapterError(f"LoRA pattern {pattern!r} matched no module of {type(model).__name__}")
    for name in targets:
        if any(name == e or name.startswith(e + ".") for e in existing):
            raise AdapterError(f"layer {name!r} is already adapted (or inside an adapted layer)")
    if rank < 1:
        raise AdapterError(f"layer {targets[0]!r}: LoRA rank must be >= 1, got {rank}")
    for name in targets:
        d_out, d_in = weight_matrix(model.get_submodule(name), name).shape
        if rank > min(d_out, d_in):
            # The merges invert r x r Grams (A G A^T, B^T B), singular when B A is wider than the layer.
            raise AdapterError(
                f"layer {name!r} ({d_out} x {d_in}): LoRA rank {rank} exceeds its width; use rank <= {min(d_out, d_in)}"
            )
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    with torch.random.fork_rng(devices=[]):
        inject_adapter_in_model(lora_config(pattern, rank), model, adapter_name=ADAPTER)
    for p in model.parameters():  # peft's own layers move the base parameters, not copies of them
        if id(p) in trainable:
            p.requires_grad_(trainable[id(p)])
    layers = lora_layers(model)
    if sorted(set(layers) - set(existing)) != sorted(targets):
        raise AdapterError(f"peft adapted {sorted(set(layers) - set(existing))[:5]}, expected {targets[:5]}")
    A, B = init_adapter({name: tuple(weight_matrix(layers[name], name).shape) for name in targets}, rank, seed)
    with torch.no_grad():
        for name in targets:
            factor_matrix(layers[name], "A").copy_(A[name])
            factor_matrix(layers[name], "B").copy_(B[name])
    return targets


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s tensors as if it had no adapters: no lora_* entries, peft's "base_layer." dropped from the keys,
    and W0 in every adapted layer (also while ``set_deltas`` has a delta in). Detached, on their own device."""
    swapped = {f"{name}.base_layer.weight": layer.__dict__[_W0] for name, layer in lora_layers(model).items()
               if _W0 in layer.__dict__}
    return {
        key.replace(".base_layer.", "."): swapped.get(key, t).detach()
        for key, t in model.state_dict().items()
        if ".lora_" not in key
    }


def get_factors(model: nn.Module, which: Factor) -> dict[str, Tensor]:
    """Detached CPU copies of one factor of every adapted layer: A: (r, d_in) or B: (d_out, r)."""
    _check_factor(which)
    return {
        name: factor_matrix(layer, which).detach().to("cpu", copy=True) for name, layer in _require_layers(model).items()
    }


def set_factors(model: nn.Module, which: Factor, tensors: Mapping[str, Tensor]) -> None:
    """Copy one factor into every adapted layer (cast to the layer's dtype and device).

    ``tensors`` must name exactly the adapted layers, each A: (r, d_in) or B: (d_out, r) and finite.
    """
    _check_factor(which)
    layers = _require_layers(model)
    _check_layer_set(layers, tensors, f"factor {which}")
    for name, layer in layers.items():
        _check_adapter_tensor(name, f"factor {which}", tensors[name], tuple(factor_matrix(layer, which).shape))
    with torch.no_grad():
        for name, layer in layers.items():
            factor_matrix(layer, which).copy_(tensors[name])


def set_trainable(model: nn.Module, which: str) -> None:
    """Make the factors in ``which`` ("A", "B" or "AB") the only trainable tensors of every LoRA layer (W0 and
    bias frozen). Modules outside LoRA layers (the head) are left as they are.
    """
    if not which:
        raise AdapterError("set_trainable needs at least one factor")
    for factor in which:
        _check_factor(factor)
    for layer in _require_layers(model).values():
        layer.get_base_layer().requires_grad_(False)
        for factor in FACTORS:
            factor_param(layer, factor).requires_grad_(factor in which)


def set_deltas(model: nn.Module, deltas: Mapping[str, Tensor] | None, adapter_scale: float = 1.0) -> None:
    """Run every adapted layer as W0 + deltas[name] + adapter_scale * B A.

    ``deltas``: layer -> (d_out, d_in), exactly the adapted layers (cast to the layer's dtype and device), or None
    to drop all deltas (each base layer then holds its own W0 tensor again, unchanged). ``adapter_scale`` is peft's
    scaling of the live adapter (lora_alpha / r = 1 times this); 0 switches it off.
    """
    if not math.isfinite(adapter_scale):
        raise AdapterError(f"adapter_scale must be finite, got {adapter_scale}")
    layers = _require_layers(model)
    if deltas is not None:
        _check_layer_set(layers, deltas, "deltas")
        for name, layer in layers.items():
            _check_adapter_tensor(name, "delta", deltas[name], tuple(weight_matrix(layer, name).shape))
    for name, layer in layers.items():
        base = layer.get_base_layer()
        w0 = layer.__dict__.pop(_W0, None)
        if w0 is not None:
            base.weight = w0
        if deltas is not None:
            w0 = base.weight
            delta = deltas[name].detach().to(device=w0.device, dtype=w0.dtype)
            # Plain attribute (not a registered parameter): the swapped-out W0 is no part of the state dict.
            layer.__dict__[_W0] = w0
            merged = layer_kind(layer, name).matrix(w0) + delta
            base.weight = nn.Parameter(merged.reshape(w0.shape), requires_grad=False)
        layer.scaling[ADAPTER] = float(adapter_scale)
