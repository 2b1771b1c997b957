"""Uplink bytes per client per round for the app's real models, as the wire form really encodes them.

    python bench/payloads.py

For each backbone (the default EfficientNet-Lite0 and the paper's ViT-B/16, built without downloading weights),
rank and Gram shrinkage, a reply of the right shapes is encoded with ``ClientReply.to_wire`` (the code the
clients run) and its arrays counted, against what the reference implementation sends: the trained factor and a
dense d_in x d_in float32 Gram for every adapted layer, every round. The head (its block and its Gram) is
counted separately: it is the same for every backbone rank. Its Gram has one row per image, so a client with
``--head-images`` images (per task) sends it as an exact low-rank factor when that is smaller than the packed
triangle (the wire manifest's LOW_RANK Gram form, common/protocol.py), as the clients do.
"""

from __future__ import annotations

import argparse

import torch

import timm

from common.backbones import BACKBONES
from common.grams import shrink
from common.layout import TRAIN, Dims, GramForm
from common.lora import inject_lora, layer_shapes
from common.methods import METHODS
from common.model import HEAD, FCILModel
from common.protocol import ClientReply
from common.wire import nbytes


def model_shapes(name: str) -> tuple[dict[str, tuple[int, int]], int]:
    """Adapted layers' (d_out, d_in) and the head's input size; ViT-B/16 is built without its weights."""
    spec = BACKBONES[name]
    net = timm.create_model(name, pretrained=False, num_classes=0) if name.startswith("vit_base") else spec.build(None)
    model = FCILModel(net, spec.num_features, 10)
    inject_lora(model, rf"backbone\.(?:{spec.lora_pattern})", 1)
    return layer_shapes(model), spec.num_features


def reply_bytes(method: str, shapes, d_head: int, block: int, factor: str, r: int, alpha: float,
                alpha_head: float, dtype: torch.dtype, head_images: int) -> tuple[int, int]:
    """(backbone part, head part) of one round's reply as the method's layout states it, in bytes on the wire."""
    dims = Dims(shapes, r, d_head, {n: alpha > 0 for n in shapes} | {HEAD: alpha_head > 0})
    spec = METHODS[method].reply_spec(TRAIN, factor, dims, block)

    def gram(name: str, rows: int) -> torch.Tensor:
        slot = spec.grams[name]
        X = torch.randn(rows, slot.side, dtype=torch.float64)
        if slot.form is GramForm.DIAGONAL:
            return (X**2).sum(0)
        return X.T @ X if slot.form is GramForm.PROJECTED else shrink(X.T @ X, alpha_head if name == HEAD else alpha)

    grams = {n: gram(n, spec.grams[n].side + 2) for n in spec.grams if n != HEAD}
    trained = {f: {n: torch.zeros(dims.factor_shape(f, n)) for n in shapes} for f in factor}
    backbone = ClientReply(0, 0, factor, 1, grams, trained, projected=spec.projected).to_wire(dtype)[0]
    head_grams = {HEAD: gram(HEAD, head_images)} if HEAD in spec.grams else {}
    head = ClientReply(0, 0, factor, 1, head_grams, {}, torch.zeros(spec.tensors["head.weight"]),
                       torch.zeros(spec.tensors["head.bias"]), low_rank={HEAD: alpha_head}).to_wire(dtype)[0]
    return nbytes(backbone), nbytes(head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "vit_base_patch16_224.augreg_in21k"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--method", default="lorm", choices=sorted(METHODS))
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
                for factor in dict.fromkeys(METHODS[args.method].schedule(2)):
                    ours, head = reply_bytes(args.method, shapes, d_head, 10, factor, r, alpha, 0.5, dtype,
                                             args.head_images)
                    trained = 4 * sum(r * (d_in if f == "A" else d_out) for f in factor for d_out, d_in in shapes.values())
                    reference = trained + 4 * sum(d_in * d_in for _, d_in in shapes.values())
                    print(f"{name:>34} {r:>3} {alpha:>5} {factor:>5} {str(dtype)[6:]:>8} {ours / 2**20:>9.3f} "
                          f"{reference / 2**20:>12.1f} {reference / ours:>6.0f}x {adapter / 2**20:>10.3f} "
                          f"{head / 2**20:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
