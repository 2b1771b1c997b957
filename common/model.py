"""The FCIL model: a frozen registry backbone carrying LoRA layers, and one linear head over all classes."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from common.backbones import backbone_spec
from common.lora import inject_lora, lora_layers

HEAD_INITS = ("trunc-normal", "zeros")
HEAD = "head"  # the head's name: a module of FCILModel, and the key of its Gram among the layers'


class FCILModel(nn.Module):
    """logits = head(backbone(x)); backbone: images -> (N, num_features), head: nn.Linear(num_features, classes).

    The head starts as timm's classifiers do (``head_init`` "trunc-normal": weight ~ truncated normal with std 0.02,
    bias 0), drawn from its own generator seeded by ``seed`` so that every client and the server build the same
    head and the global random state is left alone; or at zero ("zeros"), where B gets no gradient on the first
    steps of a task.

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
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        self.backbone = backbone
        # skip_init: nn.Linear's own init would draw from the global RNG.
        self.head = skip_init(nn.Linear, num_features, num_classes)
        nn.init.zeros_(self.head.bias)
        if head_init == "zeros":
            nn.init.zeros_(self.head.weight)
        else:
            nn.init.trunc_normal_(self.head.weight, std=0.02, generator=torch.Generator().manual_seed(seed))
        self.train(self.training)

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
