"""CIFAR-100 as 100 classes in their fixed order 0..99, the official 50k/10k split, 10 classes a task by default.

The python-version pickles (``<data_dir>/cifar-100-python/{train,test,meta}``) are read directly, so any copy in
that format loads; torchvision is used only to download and verify the archive when the folder is absent.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from common.data.arrays import ImageArrayDataset
from common.data.splits import cap_per_class
from common.data.stream import DataError, Stream, class_blocks

FOLDER = "cifar-100-python"
DEFAULT_DATA_DIR = Path.home() / ".cache" / "lorm-flower" / "data"


def _unpickle(path: Path, keys: tuple[bytes, ...]) -> dict[bytes, object]:
    """The pickled dict at ``path``, which must hold ``keys``; anything else is a DataError naming the file."""
    if not path.is_file():
        raise DataError(f"cifar100: {path} is missing; delete {path.parent} to download CIFAR-100 again")
    try:
        with path.open("rb") as f:
            raw = pickle.load(f, encoding="bytes")
    except Exception as err:  # truncated or foreign files raise many types (UnpicklingError, EOFError, ...)
        raw = err
    if not isinstance(raw, dict) or not all(k in raw for k in keys):
        what = f"{type(raw).__name__}: {raw}" if isinstance(raw, Exception) else f"a {type(raw).__name__}"
        raise DataError(
            f"cifar100: {path} is not a CIFAR-100 python pickle with {[k.decode() for k in keys]} ({what}); "
            f"delete {path.parent} to download CIFAR-100 again"
        )
    return raw


def _download(root: Path) -> None:
    from torchvision.datasets import CIFAR100

    try:
        CIFAR100(root=str(root), train=True, download=True)
    except Exception as err:  # network or checksum failures alike: the fix is the same
        raise DataError(
            f"cifar100: {root / FOLDER} not found and the download failed ({err}); fetch "
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into "
            f"{root} (or set data-dir to where it is)"
        ) from err


def load_cifar100(
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
    """Images stay ``uint8 (N, 3, 32, 32)`` in memory (150 MB) and are resized per item to ``img_size``."""
    tasks = class_blocks([100], classes_per_task or 10, stream="cifar100")
    root = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    if not (root / FOLDER).is_dir():
        _download(root)
    meta = _unpickle(root / FOLDER / "meta", (b"fine_label_names",))
    names = [bytes(n).decode() for n in meta[b"fine_label_names"]]
    if len(names) != 100:
        raise DataError(f"cifar100: {root / FOLDER / 'meta'} lists {len(names)} fine classes, expected 100")
    splits = {}
    for split, cap in (("train", max_train_per_class), ("test", max_test_per_class)):
        path = root / FOLDER / split
        raw = _unpickle(path, (b"fine_labels", b"data"))
        try:
            labels = np.asarray(raw[b"fine_labels"], dtype=np.int64)
            # Rows are 3072 bytes: the red plane, then green, then blue, each 32x32 row-major.
            data = np.asarray(raw[b"data"], dtype=np.uint8)
        except (TypeError, ValueError) as err:
            raise DataError(f"cifar100: {path} holds labels or data that are not arrays of integers ({err})") from None
        if labels.ndim != 1 or data.shape != (len(labels), 3072):
            raise DataError(f"cifar100: {path} holds data of shape {data.shape} for {labels.shape} labels, expected "
                            "(N, 3072) for N labels")
        if labels.size and not 0 <= labels.min() <= labels.max() < 100:
            raise DataError(f"cifar100: {path} has labels outside 0..99 (from {labels.min()} to {labels.max()})")
        keep = cap_per_class(labels, cap, seed)
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32)[keep].copy())
        splits[split] = (ImageArrayDataset(images, labels[keep], img_size=img_size, mean=mean, std=std), labels[keep])
    (train, train_labels), (test, test_labels) = splits["train"], splits["test"]
    return Stream("cifar100", [f"cifar100/{n}" for n in names], tasks, train, test, train_labels, test_labels)
