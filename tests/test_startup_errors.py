"""Bad settings and bad input files fail at start-up with a message naming the key or the file (issue 12's
hostile-user cases), never with a library's raw error later in the run."""

import pickle

import numpy as np
import pytest
import torch

from common.backbones import BackboneError
from common.config import ConfigError, RunConfig, resolve_device
from common.data import DataError
from common.data.cifar100 import load_cifar100
from common.lora import AdapterError
from common.model import build_model


@pytest.mark.parametrize("name", ["../../escape", "a/b", ".hidden", "..", "x" * 129, "tab\tname"])
def test_a_run_name_that_could_leave_output_dir_is_refused(name):
    with pytest.raises(ConfigError, match="run-name .* must be a plain folder name"):
        RunConfig.parse({"run-name": name}, source="run config")


def test_plain_run_names_are_accepted():
    for name in ("", "kill", "lorm_beta-0.5", "run-12"):
        assert RunConfig.parse({"run-name": name}, source="run config").run_name == name


@pytest.mark.parametrize("device", ["tpu", "cuda:7", "gpu0"])
def test_a_device_this_machine_lacks_names_the_key(device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight CUDA devices")
    with pytest.raises(ConfigError, match=f"run config device '{device}'"):
        resolve_device(device)
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") in ("cpu", "cuda")


@pytest.mark.parametrize("key, value", [("seed", -1), ("lr", "inf"), ("beta", float("inf")), ("round-timeout", "inf")])
def test_a_negative_seed_or_an_infinite_value_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"invalid run config: {key}: "):
        RunConfig.parse({key: value}, source="run config")


def test_min_clients_above_num_partitions_is_refused():
    with pytest.raises(ConfigError, match="min-clients 4 exceeds num-partitions 3"):
        RunConfig.parse({"min-clients": 4, "num-partitions": 3}, source="run config")
    assert RunConfig.parse({"min-clients": 4}, source="run config").num_partitions == 0  # 0: learnt at start-up


def test_a_rank_wider_than_a_layer_is_refused_naming_the_layer():
    with pytest.raises(AdapterError, match=r"conv_pw' \(16 x 32\): LoRA rank 17 exceeds its width; use rank <= 16"):
        build_model("efficientnet_lite0", num_classes=5, rank=17)
    build_model("efficientnet_lite0", num_classes=5, rank=16)


@pytest.mark.parametrize("backbone", ["vit_tiny_test", "efficientnet_lite0"])
def test_a_garbage_weights_file_names_the_file_and_gives_no_unsafe_advice(tmp_path, backbone):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    with pytest.raises(BackboneError) as err:
        build_model(backbone, num_classes=5, rank=2, weights=str(garbage))
    assert str(garbage) in str(err.value) and "weights" in str(err.value)
    assert "weights_only=False" not in str(err.value)


def _cifar_folder(tmp_path, train=None, meta=None):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    good_meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}
    rng = np.random.default_rng(0)
    good = {b"fine_labels": list(range(100)) * 2, b"data": rng.integers(0, 256, (200, 3072), dtype=np.uint8)}
    for name, content in (("meta", meta or good_meta), ("train", train or good), ("test", good)):
        (folder / name).write_bytes(content if isinstance(content, bytes) else pickle.dumps(content))
    return folder


CIFAR_ARGS = dict(img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, classes_per_task=10, max_train_per_class=None,
                  max_test_per_class=None, seed=0)


@pytest.mark.parametrize(
    "train, reason",
    [
        (pickle.dumps({b"fine_labels": [0]})[:-5], "not a CIFAR-100 python pickle"),  # truncated
        (b"not a pickle at all", "not a CIFAR-100 python pickle"),
        ([1, 2, 3], "not a CIFAR-100 python pickle"),  # a pickle of something else
        ({b"fine_labels": [0, 1], b"data": np.zeros((3, 5), dtype=np.uint8)}, "3072"),
        ({b"fine_labels": [0, 500], b"data": np.zeros((2, 3072), dtype=np.uint8)}, "labels"),
        ({b"fine_labels": ["a", "b"], b"data": np.zeros((2, 3072), dtype=np.uint8)}, "not arrays of integers"),
    ],
)
def test_a_broken_cifar100_pickle_names_the_file(tmp_path, train, reason):
    folder = _cifar_folder(tmp_path, train=train)
    with pytest.raises(DataError, match=reason) as err:
        load_cifar100(data_dir=str(tmp_path), **CIFAR_ARGS)
    assert str(folder / "train") in str(err.value)


def test_a_well_formed_cifar100_folder_still_loads(tmp_path):
    _cifar_folder(tmp_path)
    stream = load_cifar100(data_dir=str(tmp_path), **CIFAR_ARGS)
    assert len(stream.train) == 200 and len(stream.tasks) == 10
