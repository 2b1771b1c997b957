"""Image files are decoded once, before the first round (common/data/check.py): a bad file in a node's partition
fails the start-up check naming the node and the file, a bad file in the server's evaluation split stops the
run before anything is trained or written, and a pass is remembered with the stream cache."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.client_app import app
from client.local import LocalWork
from common.config import NodeConfig, RunConfig
from common.data import DataError, client_task_indices
from common.data.check import check_images
from common.experiment import build_experiment
from server.report import RunReport
from server.schedule import Schedule
from server.server_app import execute
from server.startup import NodeCheckFailed, check_nodes
from server.transport import FlowerTransport
from tests.direct_grid import DirectGrid, server_identity

K = 2


def imagenet_r(root: Path, classes: int = 4, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "imagenet-r" / f"n0000000{c}"
        folder.mkdir(parents=True)
        for j in range(per_class):
            pixels = rng.integers(0, 256, (16 + j, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"art_{j}.jpg", quality=90)
    return root


def run_for(data: Path, **overrides) -> RunConfig:
    return RunConfig(
        dataset="imagenet-r", data_dir=str(data), backbone="vit_tiny_test", img_size=32, classes_per_task=2,
        rounds_per_task=1, local_epochs=1, rank=2, min_clients=1, seed=1, **overrides,
    )


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])  # as a copy interrupted half way


def a_training_file_of(run: RunConfig, partition: int) -> Path:
    exp = build_experiment(run, run.data_dir, "cpu", "")
    index = client_task_indices(exp.stream, 1, partition, K, run.beta, run.seed)[0]
    return exp.stream.train.paths[index]


def test_a_truncated_jpeg_in_a_nodes_partition_fails_the_start_up_check_naming_node_and_file(tmp_path):
    run = run_for(imagenet_r(tmp_path / "data"))
    bad = a_training_file_of(run, 1)
    truncate(bad)
    schedule = Schedule(build_experiment(run, run.data_dir, "cpu", ""), RunReport(tmp_path / "out"), "t", "cpu")
    grid = DirectGrid(app, run.model_dump(by_alias=True), K)  # nodes 100 (partition 0) and 101 (partition 1)
    with server_identity(), pytest.raises(NodeCheckFailed) as err:
        check_nodes(FlowerTransport(grid, 1, 60.0, 0.2), schedule)
    message = str(err.value)
    assert message.startswith("start-up check failed, no round has run: node 101 (partition unknown): client error")
    assert "1 of the " in message and f"image files of partition 1/2 cannot be decoded: {bad} (OSError" in message
    assert "node 100" not in message  # partition 0 does not hold the file and passed
    assert not (tmp_path / "out" / "config.json").exists()


def not_an_image(path: Path) -> None:
    path.write_bytes(b"this is not a JPEG")


def a_truncated_jpeg(path: Path) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # its headers intact: it opens, and fails only when decoded


@pytest.mark.parametrize("spoil", [not_an_image, a_truncated_jpeg])
def test_a_bad_file_in_the_evaluation_split_stops_the_run_before_any_work(tmp_path, spoil):
    run = run_for(imagenet_r(tmp_path / "data"), output_dir=str(tmp_path / "out"))
    exp = build_experiment(run, run.data_dir, "cpu", "")
    bad = exp.stream.test.paths[-1]
    spoil(bad)
    drove = []
    with pytest.raises(DataError, match=f"image files of the server's evaluation split cannot be decoded: {bad}"):
        execute(run, "r", drove.append)
    assert drove == [] and not (tmp_path / "out" / "r" / "config.json").exists()


def test_a_pass_is_remembered_until_a_file_changes(tmp_path):
    run = run_for(imagenet_r(tmp_path / "data"))
    exp = build_experiment(run, run.data_dir, "cpu", "")
    everything = np.arange(len(exp.stream.train))
    cache = str(tmp_path / "cache")
    assert check_images(exp.stream.train, everything, what="all", cache_dir=cache) == len(everything)
    assert check_images(exp.stream.train, everything, what="all", cache_dir=cache) == 0  # remembered
    truncate(exp.stream.train.paths[3])  # size and mtime change: checked again, and refused
    with pytest.raises(DataError, match=str(exp.stream.train.paths[3])):
        check_images(exp.stream.train, everything, what="all", cache_dir=cache)


def test_streams_held_in_memory_have_no_files_to_check():
    exp = build_experiment(RunConfig(backbone="vit_tiny_test", img_size=32, num_tasks=1), "", "cpu", "")
    assert check_images(exp.stream.train, np.arange(10), what="offline") == 0


def test_a_node_checks_only_its_own_partition(tmp_path):
    run = run_for(imagenet_r(tmp_path / "data"))
    truncate(a_training_file_of(run, 1))
    LocalWork.create(run, NodeConfig(partition_id=0, num_partitions=K, cache_dir=""))  # does not hold it
    with pytest.raises(DataError, match="partition 1/2 cannot be decoded"):
        LocalWork.create(run, NodeConfig(partition_id=1, num_partitions=K, cache_dir=""))
