"""Classify image files with a run's exported model: the top-k class names and their probabilities.

    lorm-flower predict outputs/run-<id> digit.png cat.jpg
    lorm-flower predict outputs/run-<id> --folder my_images --top-k 3 --json

The model is ``<RUN_DIR>/model/`` (written at every task end: the model after the last finished task, over every
class seen so far), loaded by timm from its own files (model.safetensors + config.json). Each image goes through
the run's test view: RGB, resized to the run's image size, the central crop of the run's ``augment`` setting,
normalised with the backbone's mean and std (common/export.py:test_view, the datasets' own code).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from common.export import ExportError, load_network, model_folder, test_view

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(images: list[Path], folder: Path | None) -> list[Path]:
    """The files named, then every image file under ``folder`` (recursively, sorted)."""
    found = list(images)
    if folder is not None:
        if not folder.is_dir():
            raise ExportError(f"--folder {folder} is not a folder")
        found += sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return found


def _load(path: Path, config: dict) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return test_view(image, config)
    except (OSError, UnidentifiedImageError) as err:
        raise ExportError(f"{path}: not a readable image ({err})") from None


@torch.no_grad()
def predict(
    model_dir: Path, paths: list[Path], top_k: int = 5, batch_size: int = 64, device: str = "cpu"
) -> list[dict]:
    """[{"image": path, "top": [{"class": name, "index": i, "probability": p}, ...]}] in the order of ``paths``."""
    net, config, classes = load_network(model_dir, device)
    k = min(top_k, len(classes))
    out = []
    for lo in range(0, len(paths), batch_size):
        batch = paths[lo : lo + batch_size]
        x = torch.stack([_load(p, config) for p in batch]).to(device)
        probs = net(x).float().softmax(dim=-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for path, v, i in zip(batch, values.tolist(), indices.tolist()):
            top = [{"class": classes[c], "index": c, "probability": p} for p, c in zip(v, i)]
            out.append({"image": str(path), "top": top})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (or its model/ folder)")
    parser.add_argument("images", type=Path, nargs="*", metavar="IMAGE", help="image files to classify")
    parser.add_argument("--folder", type=Path, help="also classify every image file under this folder (recursive)")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="cpu", help='torch device, e.g. "cuda" (default cpu)')
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a line per image")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    try:
        paths = image_files(args.images, args.folder)
        if not paths:
            parser.error("no image: name IMAGE files or a --folder that holds some")
        results = predict(model_folder(args.run_dir), paths, args.top_k, args.batch_size, args.device)
    except ExportError as err:
        print(f"lorm-flower predict: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['image']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
