"""Images held in memory as uint8 arrays, turned into normalised 3-channel float tensors per item."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

_RESIZE_CHUNK = 1024  # bounds the float copy made while resizing a whole domain at load


def resize_float(x: Tensor, size: int) -> Tensor:
    """``x: float (n, C, h, w)`` in [0, 1] -> ``(n, C, size, size)``; antialiased so downsizing does not alias."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def resize_uint8(images: np.ndarray, size: int) -> Tensor:
    """``images: uint8 (N, C, h, w)`` -> ``uint8 (N, C, size, size)``, resized once in chunks."""
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for lo in range(0, len(images), _RESIZE_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(images[lo : lo + _RESIZE_CHUNK])).float() / 255.0
        out[lo : lo + len(chunk)] = (resize_float(chunk, size) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return out


class ImageArrayDataset(Dataset):
    """``images: uint8 (N, C, h, w)`` with C in {1, 3} and ``labels: (N,)``; item -> (float32 (3, S, S), int).

    Grey images are repeated to 3 channels; images not already S x S are resized per item (native-size storage
    keeps e.g. CIFAR at 32 px in memory whatever S is); then ``(x - mean) / std`` per channel.
    """

    def __init__(
        self, images: Tensor, labels: np.ndarray, *, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, 1|3, h, w), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = resize_float(self.images[i : i + 1].float() / 255.0, self.img_size)[0]
        return (x.expand(3, -1, -1) - self.mean) / self.std, int(self.labels[i])
