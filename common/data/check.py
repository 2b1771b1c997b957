"""Every image file a process will read, decoded once before the first round, so a bad file stops the run at
start-up with its path instead of failing a client in every round (or the server's evaluation after a whole
task has trained).

Streams held in memory (offline, CIFAR-100) were decoded when they were loaded; streams read from files
(ImageNet-R) are decoded here, file by file. A pass is remembered in the stream cache folder
(common/data/cache.py), keyed by the files' paths, sizes and modification times.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from common.data.cache import remember_checked, verdict_path
from common.data.imagenet_r import ImageFileDataset
from common.data.stream import DataError

log = logging.getLogger(__name__)

SHOWN = 10  # bad files named in the error; the rest are counted


def image_files(dataset: Dataset, indices: np.ndarray) -> list[Path]:
    """The files behind ``dataset[indices]``, through subsets and one-to-one views (an object whose ``base``
    is as long as itself); [] for images held in memory."""
    indices = np.asarray(indices, dtype=np.int64)
    while True:
        if isinstance(dataset, Subset):
            indices, dataset = np.asarray(dataset.indices, dtype=np.int64)[indices], dataset.dataset
        elif isinstance(getattr(dataset, "base", None), Dataset) and len(dataset.base) == len(dataset):
            dataset = dataset.base
        else:
            break
    if not isinstance(dataset, ImageFileDataset):
        return []
    return sorted({dataset.paths[i] for i in indices.tolist()})


def decode_error(path: Path) -> str | None:
    """Why ``path`` cannot be read as the RGB image training will read, or None."""
    try:
        with Image.open(path) as image:
            image.convert("RGB").load()  # the whole image: a truncated file fails here, not at open()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"{type(err).__name__}: {err}"
    return None


def check_images(dataset: Dataset, indices: np.ndarray, *, what: str, cache_dir: str = "") -> int:
    """Decode every image file behind ``dataset[indices]``; DataError naming the bad ones (``what``: whose
    files, for the message). Returns how many files were decoded (0 when held in memory or checked before)."""
    files = image_files(dataset, indices)
    if not files:
        return 0
    cache = Path(cache_dir).expanduser() if cache_dir else None
    if cache is not None and verdict_path(cache, files).exists():
        return 0
    log.info("checking the %d image files of %s", len(files), what)
    bad = [(path, reason) for path in files if (reason := decode_error(path))]
    if bad:
        shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:SHOWN])
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise DataError(
            f"{len(bad)} of the {len(files)} image files of {what} cannot be decoded: {shown}{more}; replace or "
            "remove them (a file removed changes the split: start the run afresh)"
        )
    if cache is not None:
        remember_checked(cache, files)
    return len(files)
