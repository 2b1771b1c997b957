"""The FCIL model: a frozen registry backbone carrying LoRA layers, and one linear head over all classes."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from common.backbones import backbone_spec
from common.lora import inject_lora, lora_layers

HEAD_INITS = ("trunc-normal", "zeros")
HEAD = "head"  # the head's name: a module of FCILModel, and the key of its Gram among the layers'


def initial_head(num_features: int, num_classes: int, head_init: str = "trunc-normal", seed: int = 0) -> tuple[Tensor, Tensor]:
    """The head every client and the server start from: (weight (num_classes, num_features), bias (num_classes,)).

    "trunc-normal" is timm's classifier init (weight ~ truncated normal, std 0.02, bias 0), drawn from its own
    generator seeded by ``seed`` so that every process draws the same head and the global random state is left
    alone; "zeros" starts at zero, where B gets no gradient on the first steps of a task. The server takes the
    head from here, not from a live model: in one process a model another run has trained is no starting point.
    """
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    weight = torch.zeros(num_classes, num_features)
    if head_init != "zeros":
        nn.init.trunc_normal_(weight, std=0.02, generator=torch.Generator().manual_seed(seed))
    return weight, torch.zeros(num_classes)


class FCILModel(nn.Module):
    """logits = head(backbone(x)); backbone: images -> (N, num_features), head: nn.Linear(num_features, classes).

    The head starts as ``initial_head(num_features, num_classes, head_init, seed)``.

    The backbone always stays in eval mode, whatever ``train()`` is called with: W0 is frozen and so must be
    everything else about it. BatchNorm in train mode would normalise with batch statistics (and update its
    running ones), and dropout would be live, so clients would train, and compute Grams, on a different function
    than the one being merged and evaluated; with tiny skewed local batches BatchNorm statistics would drift per
    client. The head has no such layers, so ``train()`` still matters for it only.
    """

    def __init__(
        self, backbone: nn.Module, num_features: int, num_classes: int, head_init: str = "trunc-normal", seed: int = 0
    ) -> None:
        super().__init__()
        weight, bias = initial_head(num_features, num_classes, head_init, seed)
        self.backbone = backbone
        self._head_init = (head_init, seed)
        # skip_init: nn.Linear's own init would draw from the global RNG.
        self.head = skip_init(nn.Linear, num_features, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.train(self.training)

    def initial_head(self) -> tuple[Tensor, Tensor]:
        """The head this model was built with, drawn again (never its live weights, which training moves)."""
        return initial_head(self.head.in_features, self.head.out_features, *self._head_init)

    @property
    def adapted_layers(self) -> list[str]:
        """Names of the LoRA layers (module paths in this model), in module order."""
        return list(lora_layers(self))

    def train(self, mode: bool = True) -> "FCILModel":
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) -> (N, num_features)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) -> logits (N, num_classes)."""
        return self.head(self.features(x))


def build_model(
    backbone: str, num_classes: int, rank: int, weights: str | None = None, head_init: str = "trunc-normal",
    seed: int = 0,
) -> FCILModel:
    """Registry backbone (frozen, eval) + LoRA of rank ``rank`` on its pattern + a head (see FCILModel).

    The adapters start with B = 0, so the backbone computes exactly its pre-trained features.
    """
    spec = backbone_spec(backbone)
    net = spec.build(weights)
    net.requires_grad_(False)
    model = FCILModel(net, spec.num_features, num_classes, head_init, seed)
    inject_lora(model, rf"backbone\.(?:{spec.lora_pattern})", rank)
    return model
