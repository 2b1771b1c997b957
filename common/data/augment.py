"""Train-time views and the test view of a stream's images (the run setting ``augment``).

The reference implementation trains on RandomResizedCrop(224, bicubic) + RandomHorizontalFlip views and runs
every Gram pass on such views too (so a second pass adds information), and tests on Resize(256) +
CenterCrop(224). Here the items are already normalised S x S tensors, so a view crops that tensor and resizes
the crop back to S (bicubic, antialiased), and the test view keeps the central 224/256 of it (the same as
resizing to S * 256/224 and cropping S, up to interpolation).

Views draw from a generator of their own, seeded by the caller per client, task and round, and read in the
loader's seeded order: runs stay reproducible and the global random state is untouched. Epochs and Gram passes
read the same view dataset again, so each gets fresh views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F


@dataclass(frozen=True)
class Augment:
    scale: tuple[float, float]  # the crop's area, as a fraction of the image's
    ratio: tuple[float, float]  # the crop's width / height
    flip: bool  # a horizontal flip with probability 1/2
    test_crop: float  # the test view keeps the central fraction of the side (1 = the image as it is)


AUGMENTS: dict[str, Augment | None] = {
    "none": None,
    # The offline default: 28 px digits and silhouettes, where a flip turns some digits into others.
    "light": Augment(scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), flip=False, test_crop=1.0),
    "paper": Augment(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True, test_crop=224 / 256),
}


def _uniform(lo: float, hi: float, gen: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def crop_box(h: int, w: int, aug: Augment, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop: torchvision's RandomResizedCrop.get_params, drawing from
    ``gen``. Ten tries at a crop of the drawn area and aspect ratio that fits, else the central crop."""
    area = h * w
    log_ratio = (math.log(aug.ratio[0]), math.log(aug.ratio[1]))
    for _ in range(10):
        target = area * _uniform(*aug.scale, gen)
        aspect = math.exp(_uniform(*log_ratio, gen))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < aug.ratio[0]:
        cw, ch = w, round(w / aug.ratio[0])
    elif in_ratio > aug.ratio[1]:
        ch, cw = h, round(h * aug.ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def train_view(x: Tensor, aug: Augment, gen: torch.Generator) -> Tensor:
    """x: (C, S, S) -> a random view of the same shape."""
    h, w = x.shape[-2:]
    top, left, ch, cw = crop_box(h, w, aug, gen)
    out = F.resized_crop(x, top, left, ch, cw, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if aug.flip and float(torch.rand((), generator=gen)) < 0.5:
        out = F.horizontal_flip(out)
    return out


class TrainViews(Dataset):
    """``base[i]`` as a fresh random view each time it is read; views draw from a generator seeded by ``seed``."""

    def __init__(self, base: Dataset, aug: Augment, seed: int) -> None:
        self.base, self.aug = base, aug
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.base[i]
        return train_view(x, self.aug, self.gen), y


class EvalView(Dataset):
    """``base[i]`` with only its central ``aug.test_crop`` of each side kept, resized back (deterministic)."""

    def __init__(self, base: Dataset, aug: Augment) -> None:
        self.base, self.aug = base, aug

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.base[i]
        h, w = x.shape[-2:]
        ch, cw = round(h * self.aug.test_crop), round(w * self.aug.test_crop)
        crop = F.resized_crop(x, (h - ch) // 2, (w - cw) // 2, ch, cw, [h, w],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
        return crop, y
