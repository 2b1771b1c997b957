"""One client's LoRM round on an accelerator at the paper's CIFAR-100 scale: ViT-B/16, 224 px, batch 16.

    python bench/gpu_round.py --device cuda                    # r 1 and 16, 500 images (CIFAR-100 / 10 clients)
    python bench/gpu_round.py --device cpu --images 32 --ranks 1   # a smoke run

A client's round is: train one factor (B or A) and the task's head block for E local epochs, then one Gram pass
(eval mode, no grad) over its data. This times both, through the same functions the ClientApp uses
(common.training.train_block and gram_pass on common.model.build_model), and prints images/s, the time of a
paper round (5 epochs + 1 Gram pass) and the peak accelerator memory. Images are random CIFAR-shaped tensors
(10 classes, upsampled size): speed does not depend on pixel values. Without ``--weights`` the backbone is a
random ViT-B/16 written to a temporary file and loaded through the real local-file path, since the pre-trained
weights need internet; speed does not depend on the weights either. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch.utils.data import TensorDataset

from common.lora import set_trainable
from common.model import HEAD, build_model
from common.training import gram_pass, make_loader, train_block

BACKBONE = "vit_base_patch16_224.augreg_in21k"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", default="", help="a local ViT-B/16 weights file (default: random, see above)")
    parser.add_argument("--images", type=int, default=500, help="the client's images of the task")
    parser.add_argument("--classes", type=int, default=10, help="classes per task")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--epochs", type=int, default=1, help="epochs timed (a paper round has 5)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", nargs="+", default=["highest", "high"], choices=["highest", "high"],
                        help="torch float32 matmul precision; 'high' lets CUDA use TF32")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if not weights:
            weights = str(Path(tmp) / "vit_b16_random.pth")
            torch.save(timm.create_model(BACKBONE, pretrained=False, num_classes=0).state_dict(), weights)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(args.images, 3, 224, 224, generator=gen)
        labels = torch.randint(0, args.classes, (args.images,), generator=gen)
        data = TensorDataset(images, labels)
        indices = np.arange(args.images)
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        print(f"{name}, torch {torch.__version__}, timm {timm.__version__}, {args.images} images, "
              f"batch {args.batch_size}, {args.classes} classes")
        print(f"{'precision':>9} {'r':>3} {'factor':>6} {'train img/s':>11} {'gram img/s':>10} "
              f"{'epoch s':>8} {'gram s':>7} {'paper round s':>13} {'peak GiB':>8}")
        for precision in args.precision:
            torch.set_float32_matmul_precision(precision)
            for r in args.ranks:
                model = build_model(BACKBONE, num_classes=100, rank=r, weights=weights).to(args.device)
                alpha = {name: 0.0 for name in model.adapted_layers} | {HEAD: 0.5}
                for factor in ("B", "A"):
                    set_trainable(model, factor)
                    model.head.requires_grad_(True)
                    loader = make_loader(data, indices, args.batch_size, shuffle=True, seed=0)
                    warm = make_loader(data, indices[: 2 * args.batch_size], args.batch_size, shuffle=False, seed=0)
                    train_block(model, warm, (0, args.classes), epochs=1, lr=3e-3, device=args.device)
                    if args.device.startswith("cuda"):
                        torch.cuda.reset_peak_memory_stats()
                    _, t_train = timed(args.device, lambda: train_block(
                        model, loader, (0, args.classes), epochs=args.epochs, lr=3e-3, device=args.device))
                    gram_loader = make_loader(data, indices, 64, shuffle=False, seed=0)
                    _, t_gram = timed(args.device, lambda: gram_pass(
                        model, gram_loader, alpha, passes=1, device=args.device))
                    epoch = t_train / args.epochs
                    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0
                    print(f"{precision:>9} {r:>3} {factor:>6} {args.images / epoch:>11.1f} "
                          f"{args.images / t_gram:>10.1f} {epoch:>8.2f} {t_gram:>7.2f} {5 * epoch + t_gram:>13.1f} "
                          f"{peak:>8.2f}", flush=True)
                del model
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
