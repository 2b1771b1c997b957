"""ImageNet-R (200 ImageNet classes as renditions: art, cartoons, sketches, ...), 20 classes a task by default.

Layout: ``<data_dir>/imagenet-r/<wnid>/*.jpg`` as the official tarball extracts. Classes are in sorted-wnid
order. The FCIL literature's "80/20 split" is an unseeded ``random_split`` of the whole folder, which cannot be
reproduced, so this is a seeded 80/20 split stratified per class instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from common.data.splits import cap_per_class, stratified_split
from common.data.stream import DataError, Stream, class_blocks

FOLDER = "imagenet-r"
TEST_FRACTION = 0.2
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class ImageFileDataset(Dataset):
    """Image files decoded per item: RGB, resized to (S, S), normalised -> (float32 (3, S, S), int label)."""

    def __init__(
        self, paths: list[Path], labels: np.ndarray, *, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self.paths = paths
        self.labels = labels
        self.transform = transforms.Compose(
            [
                transforms.Resize((img_size, img_size), antialias=True),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def _scan(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """(sorted wnids, image paths, labels: (N,)) of a class-per-folder tree."""
    wnids = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        files = sorted(p for p in (root / wnid).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"imagenet-r: class folder {root / wnid} holds no images")
        paths += files
        labels += [label] * len(files)
    if not wnids:
        raise DataError(f"imagenet-r: {root} has no class folders")
    return wnids, paths, np.asarray(labels, dtype=np.int64)


def load_imagenet_r(
    *,
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    classes_per_task: int | None,
    data_dir: str | None,
    max_train_per_class: int | None,
    max_test_per_class: int | None,
    seed: int,
) -> Stream:
    root = Path(data_dir) / FOLDER if data_dir else None
    if root is None or not root.is_dir():
        raise DataError(
            f"imagenet-r: no data at {root or 'data-dir (not set)'}; download "
            "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar, extract it so that "
            "<data-dir>/imagenet-r/<wnid>/*.jpg exist, and set data-dir to that folder"
        )
    wnids, paths, labels = _scan(root)
    tasks = class_blocks([len(wnids)], classes_per_task or 20, stream="imagenet-r")
    splits = {}
    for split, idx, cap in zip(
        ("train", "test"), stratified_split(labels, TEST_FRACTION, seed), (max_train_per_class, max_test_per_class)
    ):
        idx = idx[cap_per_class(labels[idx], cap, seed)]
        dataset = ImageFileDataset([paths[i] for i in idx], labels[idx], img_size=img_size, mean=mean, std=std)
        splits[split] = (dataset, labels[idx])
    (train, train_labels), (test, test_labels) = splits["train"], splits["test"]
    return Stream("imagenet-r", [f"imagenet-r/{w}" for w in wnids], tasks, train, test, train_labels, test_labels)
