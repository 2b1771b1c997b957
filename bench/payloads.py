"""Uplink bytes per client per round for the app's real models, as the wire form really encodes them.

    python bench/payloads.py

For each backbone (the default EfficientNet-Lite0 and the paper's ViT-B/16, built without downloading weights),
rank and Gram shrinkage, a reply of the right shapes is encoded with ``ClientReply.to_wire`` (the code the
clients run) and its arrays counted, against what the reference implementation sends: the trained factor and a
dense d_in x d_in float32 Gram for every adapted layer, every round. The head (its block and its Gram) is
counted separately: it is the same for every backbone rank. Its Gram has one row per image, so a client with
``--head-images`` images (per task) sends it as an exact low-rank factor when that is smaller than the packed
triangle (GramForm LOW_RANK), as the clients do.
"""

from __future__ import annotations

import argparse

import torch

import timm

from common.backbones import BACKBONES
from common.experiment import HEAD
from common.grams import shrink
from common.lora import inject_lora, layer_shapes
from common.merges import project_gram
from common.model import FCILModel
from common.protocol import ClientReply
from common.wire import nbytes


def model_shapes(name: str) -> tuple[dict[str, tuple[int, int]], int]:
    """Adapted layers' (d_out, d_in) and the head's input size; ViT-B/16 is built without its weights."""
    spec = BACKBONES[name]
    net = timm.create_model(name, pretrained=False, num_classes=0) if name.startswith("vit_base") else spec.build(None)
    model = FCILModel(net, spec.num_features, 10)
    inject_lora(model, rf"backbone\.(?:{spec.lora_pattern})", 1)
    return layer_shapes(model), spec.num_features


def reply_bytes(shapes, d_head: int, block: int, factor: str, r: int, alpha: float, alpha_head: float,
                dtype: torch.dtype, head_images: int) -> tuple[int, int]:
    """(backbone part, head part) of one round's reply, in bytes on the wire."""
    def gram(d: int, dense: bool, rows: int | None = None) -> torch.Tensor:
        X = torch.randn(rows or d + 2, d, dtype=torch.float64)
        return shrink(X.T @ X, alpha_head) if dense else (X**2).sum(0)

    trained = {n: torch.zeros((r, d_in) if factor == "A" else (d_out, r)) for n, (d_out, d_in) in shapes.items()}
    grams = {}
    for n, (_, d_in) in shapes.items():
        g = gram(d_in, alpha > 0)
        grams[n] = project_gram(torch.randn(r, d_in, dtype=torch.float64), g) if factor == "B" else g
    backbone = ClientReply(0, 0, factor, 1, grams, {factor: trained}, projected=frozenset(shapes) if factor == "B"
                           else frozenset()).to_wire(dtype)[0]
    head = ClientReply(0, 0, factor, 1, {HEAD: gram(d_head, alpha_head > 0, head_images)}, {},
                       torch.zeros(block, d_head), torch.zeros(block), low_rank={HEAD: alpha_head}).to_wire(dtype)[0]
    return nbytes(backbone), nbytes(head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "vit_base_patch16_224.augreg_in21k"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--head-images", type=int, default=500,
                        help="a client's images in a task (CIFAR-100, 10 clients: 500); the head Gram's rank")
    args = parser.parse_args()
    print(f"{'backbone':>34} {'r':>3} {'alpha':>5} {'round':>5} {'dtype':>8} {'ours MB':>9} {'reference MB':>12} "
          f"{'ratio':>7} {'adapter MB':>10} {'head MB':>8}")
    for name in args.backbones:
        shapes, d_head = model_shapes(name)
        for r in args.ranks:
            adapter = 4 * sum(r * (d_in + d_out) for d_out, d_in in shapes.values())
            for alpha, dtype in ((0.0, torch.float32), (0.5, torch.float32), (0.5, torch.float16)):
                for factor in ("B", "A"):
                    ours, head = reply_bytes(shapes, d_head, 10, factor, r, alpha, 0.5, dtype, args.head_images)
                    trained = 4 * sum((r * d_in if factor == "A" else d_out * r) for d_out, d_in in shapes.values())
                    reference = trained + 4 * sum(d_in * d_in for _, d_in in shapes.values())
                    print(f"{name:>34} {r:>3} {alpha:>5} {factor:>5} {str(dtype)[6:]:>8} {ours / 2**20:>9.3f} "
                          f"{reference / 2**20:>12.1f} {reference / ours:>6.0f}x {adapter / 2**20:>10.3f} "
                          f"{head / 2**20:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
