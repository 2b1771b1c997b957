"""Class-incremental image streams (a registry of loaders) and the clients' label-skewed partitions."""

from __future__ import annotations

import functools
from collections.abc import Callable

from common.data.cifar100 import load_cifar100
from common.data.imagenet_r import load_imagenet_r
from common.data.offline import DEFAULT_DOMAINS, load_offline
from common.data.partition import client_task_indices, dirichlet_partition, task_indices
from common.data.stream import DataError, Stream

STREAMS: dict[str, Callable[..., Stream]] = {
    "offline": load_offline,
    "offline-fashion": functools.partial(load_offline, domains=(*DEFAULT_DOMAINS, "fashion"), name="offline-fashion"),
    "cifar100": load_cifar100,
    "imagenet-r": load_imagenet_r,
}


@functools.lru_cache(maxsize=4)
def load_stream(
    name: str,
    *,
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    classes_per_task: int | None = None,
    data_dir: str | None = None,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    seed: int = 0,
) -> Stream:
    """The named stream, cached per process (clients and the server's evaluation share one copy).

    ``classes_per_task=None`` takes the stream's own default (offline 10, cifar100 10, imagenet-r 20);
    ``max_*_per_class=None`` keeps every sample. ``mean``/``std`` are the backbone's per-channel normalisation.
    """
    if name not in STREAMS:
        raise DataError(f"unknown stream {name!r}, expected one of {sorted(STREAMS)}")
    if img_size < 1:
        raise DataError(f"{name}: img_size must be >= 1, got {img_size}")
    for key, value in (("max_train_per_class", max_train_per_class), ("max_test_per_class", max_test_per_class)):
        if value is not None and value < 1:
            raise DataError(f"{name}: {key} must be >= 1 or None, got {value}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DataError(f"{name}: mean and std need 3 channels and std > 0, got {mean}, {std}")
    return STREAMS[name](
        img_size=img_size,
        mean=tuple(mean),
        std=tuple(std),
        classes_per_task=classes_per_task,
        data_dir=data_dir,
        max_train_per_class=max_train_per_class,
        max_test_per_class=max_test_per_class,
        seed=seed,
    )


__all__ = [
    "STREAMS",
    "DataError",
    "Stream",
    "client_task_indices",
    "dirichlet_partition",
    "load_stream",
    "task_indices",
]
