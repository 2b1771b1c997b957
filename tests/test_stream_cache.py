"""The disk cache of packaged streams: built once, read back equal, rebuilt (never used) when damaged."""

import numpy as np
import torch

from common.data.arrays import ImageArrayDataset
from common.data.cache import cache_path, load_or_build
from common.data.stream import Stream


def tiny_stream() -> Stream:
    images = torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = np.array([0, 1, 2, 0, 1, 2])
    data = ImageArrayDataset(images, labels, img_size=4, mean=(0.5,) * 3, std=(0.5,) * 3)
    return Stream("tiny", ["a", "b", "c"], [[0, 1, 2]], data, data, labels, labels)


def test_a_stream_is_built_once_and_read_back_equal(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return tiny_stream()

    args = {"img_size": 4, "seed": 0}
    first = load_or_build(tmp_path, "tiny", args, build)
    second = load_or_build(tmp_path, "tiny", args, build)
    assert len(calls) == 1
    assert torch.equal(first.train[3][0], second.train[3][0]) and second.tasks == [[0, 1, 2]]
    load_or_build(tmp_path, "tiny", args | {"seed": 1}, build)  # other settings: another entry
    assert len(calls) == 2


def test_a_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path, caplog):
    args = {"img_size": 4}
    load_or_build(tmp_path, "tiny", args, tiny_stream)
    path = cache_path(tmp_path, "tiny", args)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a crash or a full disk
    rebuilt = []
    stream = load_or_build(tmp_path, "tiny", args, lambda: rebuilt.append(1) or tiny_stream())
    assert rebuilt == [1] and isinstance(stream, Stream)
    assert "unreadable" in caplog.text


def test_the_key_changes_with_the_data_code(tmp_path, monkeypatch):
    """A change to how streams are built (e.g. which domains) must never reuse a stream built the old way."""
    import common.data.cache as cache

    before = cache_path(tmp_path, "tiny", {"img_size": 4})
    real = cache.Path.read_bytes
    monkeypatch.setattr(cache.Path, "read_bytes", lambda self: real(self) + b"# edited")
    assert cache_path(tmp_path, "tiny", {"img_size": 4}) != before
