"""Streams, splits and Dirichlet partitions: checked against counts and values computed independently here."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import STREAMS, DataError, client_task_indices, dirichlet_partition, load_stream, task_indices
from common.data.arrays import ImageArrayDataset
from common.data.offline import FASHION_SYSTEM_DIR, read_idx
from common.data.splits import cap_per_class, holdout_validation, stratified_split

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SMALL = dict(img_size=12, mean=MEAN, std=STD, max_train_per_class=20, max_test_per_class=5)


def _offline(**overrides) -> object:
    return load_stream("offline", **(SMALL | overrides))


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---- the offline stream ----------------------------------------------------------------------------------


def test_offline_stream_classes_tasks_and_caps() -> None:
    stream = _offline(classes_per_task=5)
    assert stream.name == "offline"
    assert len(stream.class_names) == 20
    assert stream.class_names[:10] == [f"digit/{d}" for d in range(10)]  # scikit-learn + MNIST: one concept each
    assert stream.class_names[10:] == [
        f"animal/{a}" for a in "bear bird cat cow dog elephant giraffe horse sheep zebra".split()
    ]
    assert stream.tasks == [list(range(lo, lo + 5)) for lo in range(0, 20, 5)]
    # Every class has far more than the caps, so each holds exactly the cap.
    assert np.array_equal(np.bincount(stream.train_labels, minlength=20), np.full(20, 20))
    assert np.array_equal(np.bincount(stream.test_labels, minlength=20), np.full(20, 5))
    assert stream.train_labels.dtype == np.int64
    assert len(stream.train) == 400 and len(stream.test) == 100


def test_offline_default_is_two_tasks_of_ten() -> None:
    assert _offline().tasks == [list(range(lo, lo + 10)) for lo in (0, 10)]


def test_offline_items_are_normalised_grey_images_with_aligned_labels() -> None:
    stream = _offline()
    for i in (0, 123, len(stream.train) - 1):
        x, y = stream.train[i]
        assert x.shape == (3, 12, 12) and x.dtype == torch.float32
        assert y == stream.train_labels[i]
        pixels = _unnormalise(x)
        # Grey images repeated over the channels, and back in [0, 1] after undoing the normalisation.
        assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[0], pixels[2], atol=1e-5)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    x, y = stream.test[7]
    assert x.shape == (3, 12, 12) and y == stream.test_labels[7]


def test_offline_uncapped_split_is_80_20_per_class() -> None:
    stream = load_stream("offline", img_size=8, mean=MEAN, std=STD)
    train, test = np.bincount(stream.train_labels), np.bincount(stream.test_labels)
    # animal-mnist has 1000 per class: 800/200 exactly; digits are scikit-learn's 1,797 + MNIST's 5,000.
    assert np.array_equal(train[10:], np.full(10, 800)) and np.array_equal(test[10:], np.full(10, 200))
    assert (train + test)[:10].sum() == 1797 + 5000
    assert np.allclose(test / (train + test), 0.2, atol=0.01)


def test_offline_same_seed_same_data_other_seed_other_data() -> None:
    # cache_clear: the comparison needs a second, independent build, not the cached object.
    a = _offline(seed=3)
    load_stream.cache_clear()
    b = _offline(seed=3)
    c = _offline(seed=4)
    assert a is not b
    assert np.array_equal(a.train_labels, b.train_labels)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)


def test_offline_classes_per_task_must_divide_a_domain() -> None:
    with pytest.raises(DataError, match="classes-per-task 3"):
        _offline(classes_per_task=3)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_domain_from_idx_files_keeps_the_official_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    sizes = {"train": 6, "t10k": 2}  # per class
    for split, per_class in sizes.items():
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 256, size=(len(labels), 28, 28))
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    assert np.array_equal(read_idx(folder / "t10k-images-idx3-ubyte.gz"), images)  # the last written: t10k

    stream = load_stream("offline-fashion", **SMALL, classes_per_task=5, data_dir=str(tmp_path))
    assert stream.name == "offline-fashion"
    assert len(stream.tasks) == 6 and stream.class_names[20] == "fashion/t-shirt"
    assert np.array_equal(np.bincount(stream.train_labels)[20:], np.full(10, 6))
    assert np.array_equal(np.bincount(stream.test_labels)[20:], np.full(10, 2))


@pytest.mark.skipif(FASHION_SYSTEM_DIR.is_dir(), reason="Debian's Fashion-MNIST is installed here")
def test_fashion_missing_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_stream("offline-fashion", **SMALL, data_dir=str(tmp_path))


def test_unknown_stream_and_bad_arguments_are_refused() -> None:
    with pytest.raises(DataError, match="unknown stream 'mnist'"):
        load_stream("mnist", img_size=8, mean=MEAN, std=STD)
    with pytest.raises(DataError, match="max_train_per_class"):
        load_stream("offline", img_size=8, mean=MEAN, std=STD, max_train_per_class=0)
    assert set(STREAMS) >= {"offline", "cifar100", "imagenet-r"}


# ---- in-memory images, splits and caps -------------------------------------------------------------------


def test_image_array_dataset_normalises_and_resizes() -> None:
    images = torch.tensor([[[[0, 255], [51, 102]]], [[[7, 7], [7, 7]]]], dtype=torch.uint8)  # (2, 1, 2, 2)
    same = ImageArrayDataset(images, np.array([4, 9]), img_size=2, mean=MEAN, std=STD)
    x, y = same[0]
    expected = (torch.tensor([[0.0, 1.0], [0.2, 0.4]]) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(
        STD
    ).view(3, 1, 1)
    assert y == 4 and x.shape == (3, 2, 2) and torch.allclose(x, expected, atol=1e-6)
    bigger = ImageArrayDataset(images, np.array([4, 9]), img_size=5, mean=MEAN, std=STD)
    x, y = bigger[1]
    # A constant image stays constant under resizing.
    assert y == 9 and x.shape == (3, 5, 5) and torch.allclose(_unnormalise(x), torch.full((3, 5, 5), 7 / 255), atol=1e-6)


def test_stratified_split_is_a_seeded_disjoint_per_class_cover() -> None:
    labels = np.repeat([0, 1, 2], [10, 20, 5])
    train, test = stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert np.array_equal(np.bincount(labels[test]), [2, 4, 1])
    again = stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, stratified_split(labels, 0.2, seed=2)[1])


def test_validation_holdout_replaces_test_with_unseen_training_samples() -> None:
    stream = _offline()
    held = holdout_validation(stream, 0.3, seed=0)
    n_train = len(stream.train_labels)
    assert len(held.train) + len(held.test) == n_train and len(held.test) == len(held.test_labels)
    # 20 training samples per class -> 6 held out, 14 kept, for every class
    assert set(np.bincount(held.test_labels)) == {6} and set(np.bincount(held.train_labels)) == {14}
    # the validation samples are training samples the clients no longer get, and no test sample is used
    assert held.test.dataset is stream.train and held.train.dataset is stream.train
    assert sorted(held.test.indices + held.train.indices) == list(range(n_train))
    assert np.array_equal(stream.train_labels[held.test.indices], held.test_labels)
    assert all(held.test[i][1] == held.test_labels[i] for i in range(0, len(held.test), 7))
    assert held.tasks == stream.tasks
    with pytest.raises(DataError, match="fraction"):
        holdout_validation(stream, 1.0, seed=0)
    with pytest.raises(DataError, match="without validation"):
        holdout_validation(stream, 0.01, seed=0)


def test_cap_per_class() -> None:
    labels = np.repeat([0, 1, 2], [10, 2, 5])
    kept = cap_per_class(labels, 3, seed=0)
    assert np.array_equal(np.bincount(labels[kept]), [3, 2, 3]) and np.all(np.diff(kept) > 0)
    assert np.array_equal(cap_per_class(labels, None, seed=0), np.arange(len(labels)))


# ---- Dirichlet partitions --------------------------------------------------------------------------------


def _labels(num_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


def test_partition_is_a_disjoint_cover_and_deterministic() -> None:
    labels = np.random.default_rng(0).permutation(_labels(10, 50))
    parts = dirichlet_partition(labels, num_clients=7, beta=0.5, seed=11)
    assert len(parts) == 7
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    again = dirichlet_partition(labels, num_clients=7, beta=0.5, seed=11)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    other = dirichlet_partition(labels, num_clients=7, beta=0.5, seed=12)
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other))


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_partition_honours_min_size(beta: float) -> None:
    labels = _labels(5, 20)  # 100 samples, 20 clients: at beta 0.01 most clients draw nothing
    for seed in range(5):
        parts = dirichlet_partition(labels, num_clients=20, beta=beta, seed=seed, min_size=4)
        assert min(len(p) for p in parts) >= 4
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(100))
    # Exactly enough samples: every client ends with exactly min_size.
    exact = dirichlet_partition(labels, num_clients=20, beta=beta, seed=0, min_size=5)
    assert [len(p) for p in exact] == [5] * 20


def test_skew_grows_as_beta_falls() -> None:
    labels = _labels(10, 200)

    def mean_entropy(beta: float) -> float:
        parts = dirichlet_partition(labels, num_clients=10, beta=beta, seed=0)
        return float(np.mean([_entropy(np.bincount(labels[p], minlength=10)) for p in parts]))

    uniform = np.log(10)
    low, mid, high = mean_entropy(0.05), mean_entropy(0.5), mean_entropy(100.0)
    assert low < mid < high
    assert high > 0.98 * uniform and low < 0.5 * uniform


def test_large_beta_gives_each_client_an_even_share_of_each_class() -> None:
    labels = _labels(4, 1000)
    parts = dirichlet_partition(labels, num_clients=5, beta=1e4, seed=0)
    counts = np.stack([np.bincount(labels[p], minlength=4) for p in parts])
    # Near-uniform p: each count is ~Binomial(1000, 0.2), so its spread is the binomial one.
    sigma = np.sqrt(1000 * 0.2 * 0.8)
    assert np.abs(counts - 200).max() < 5 * sigma
    assert 0.5 * sigma < counts.std() < 1.5 * sigma


def test_impossible_or_bad_partitions_raise() -> None:
    with pytest.raises(DataError, match="needs 30"):
        dirichlet_partition(_labels(3, 9), num_clients=10, beta=0.5, seed=0, min_size=3)
    with pytest.raises(DataError, match="beta"):
        dirichlet_partition(_labels(3, 9), num_clients=2, beta=0.0, seed=0)
    with pytest.raises(DataError, match="num_clients"):
        dirichlet_partition(_labels(3, 9), num_clients=0, beta=0.5, seed=0)


def test_client_task_indices_split_each_task_among_clients() -> None:
    stream = _offline(classes_per_task=5)
    for task in (0, 3):
        expected = task_indices(stream.train_labels, stream.tasks[task])
        assert np.array_equal(expected, np.flatnonzero(np.isin(stream.train_labels, stream.tasks[task])))
        shares = [client_task_indices(stream, task, k, 4, beta=0.1, seed=5) for k in range(4)]
        assert all(len(s) >= 1 for s in shares)
        assert np.array_equal(np.sort(np.concatenate(shares)), expected)
        assert np.array_equal(shares[2], client_task_indices(stream, task, 2, 4, beta=0.1, seed=5))
    # The task id is mixed into the seed: two tasks' draws are not the same pattern shifted.
    first = [len(client_task_indices(stream, t, 0, 4, beta=0.1, seed=5)) for t in range(4)]
    assert len(set(first)) > 1
    with pytest.raises(DataError, match="partition-id 4"):
        client_task_indices(stream, 0, 4, 4, beta=0.1, seed=5)
    with pytest.raises(DataError, match="task 4"):
        client_task_indices(stream, 4, 0, 4, beta=0.1, seed=5)


# ---- CIFAR-100 and ImageNet-R on generated on-disk files ---------------------------------------------------


def _write_fake_cifar100(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class{c:02d}".encode() for c in range(100)]
    with (folder / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": [b"x"] * 20}, f)
    written = {}
    for split, per_class in (("train", 3), ("test", 1)):
        labels = [c for c in range(100) for _ in range(per_class)][::-1]  # not sorted, as in the real files
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        with (folder / split).open("wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}, f)
        written[split] = (data, labels)
    return written


def test_cifar100_reads_the_python_pickles(tmp_path: Path) -> None:
    written = _write_fake_cifar100(tmp_path, np.random.default_rng(0))
    stream = load_stream("cifar100", img_size=32, mean=MEAN, std=STD, data_dir=str(tmp_path))
    assert stream.class_names[:2] == ["cifar100/class00", "cifar100/class01"]
    assert stream.tasks == [list(range(lo, lo + 10)) for lo in range(0, 100, 10)]
    assert np.array_equal(stream.train_labels, written["train"][1])
    assert np.array_equal(np.bincount(stream.test_labels), np.ones(100))
    x, y = stream.train[5]
    # Rows are channel planes: R (1024 bytes), G, B, each 32x32 row-major.
    expected = written["train"][0][5].reshape(3, 32, 32) / 255.0
    assert y == written["train"][1][5] and x.dtype == torch.float32
    assert torch.allclose(_unnormalise(x), torch.from_numpy(expected).float(), atol=1e-5)

    small = load_stream(
        "cifar100", img_size=8, mean=MEAN, std=STD, data_dir=str(tmp_path), classes_per_task=20, max_train_per_class=2
    )
    assert small.train[0][0].shape == (3, 8, 8) and len(small.tasks) == 5
    assert np.array_equal(np.bincount(small.train_labels), np.full(100, 2))


def test_cifar100_failed_download_says_where_to_put_the_data(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(DataError, match="cifar-100-python.tar.gz"):
        load_stream("cifar100", img_size=8, mean=MEAN, std=STD, data_dir=str(tmp_path / "empty"))


def test_imagenet_r_folder_tree(tmp_path: Path) -> None:
    colours = {"n01443537": (200, 100, 50), "n01484850": (10, 220, 130), "n01494475": (0, 0, 255), "n01498041": (90, 90, 90)}
    for wnid, colour in colours.items():
        (tmp_path / "imagenet-r" / wnid).mkdir(parents=True)
        for j in range(5):
            Image.new("RGB", (20 + 3 * j, 16), colour).save(tmp_path / "imagenet-r" / wnid / f"art_{j}.jpg", quality=95)
    stream = load_stream("imagenet-r", img_size=10, mean=MEAN, std=STD, data_dir=str(tmp_path), classes_per_task=2)
    assert stream.class_names == [f"imagenet-r/{w}" for w in sorted(colours)]
    assert stream.tasks == [[0, 1], [2, 3]]
    assert np.array_equal(np.bincount(stream.train_labels), [4, 4, 4, 4])
    assert np.array_equal(np.bincount(stream.test_labels), [1, 1, 1, 1])
    assert not set(map(str, stream.train.paths)) & set(map(str, stream.test.paths))
    for dataset, labels in ((stream.train, stream.train_labels), (stream.test, stream.test_labels)):
        x, y = dataset[len(dataset) - 1]
        assert x.shape == (3, 10, 10) and x.dtype == torch.float32 and y == labels[-1]
        colour = torch.tensor(colours[sorted(colours)[y]], dtype=torch.float32).view(3, 1, 1) / 255
        assert torch.allclose(_unnormalise(x), colour.expand(3, 10, 10), atol=4 / 255)  # JPEG is lossy


def test_imagenet_r_missing_folder_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="imagenet-r.tar"):
        load_stream("imagenet-r", img_size=8, mean=MEAN, std=STD, data_dir=str(tmp_path))
    with pytest.raises(DataError, match="imagenet-r"):
        load_stream("imagenet-r", img_size=8, mean=MEAN, std=STD)
