"""One run's model and data, built the same way on the server (evaluation) and on every client (training)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from common.backbones import BACKBONES
from common.config import DEFAULT_CACHE_DIR, RunConfig
from common.data import Stream, load_stream
from common.data.augment import AUGMENTS, Augment, EvalView, TrainViews
from common.data.cache import load_or_build
from common.data.splits import holdout_validation
from common.layout import Dims
from common.lora import layer_shapes
from common.model import HEAD, FCILModel, build_model


HEAD_SEED = 7  # a stream of its own for the head's initial weights (tasks use stable_seed(seed, task))


def stable_seed(*parts: int) -> int:
    """A seed derived from integers, equal on every machine (Python's hash() is salted per process)."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class Experiment:
    """The frozen backbone with LoRA slots, the class-incremental stream and per-layer statistic forms."""

    run: RunConfig
    model: FCILModel
    stream: Stream
    tasks: list[list[int]]  # global class ids per task, truncated to run.num_tasks
    shapes: dict[str, tuple[int, int]]  # adapted layer -> (d_out, d_in)
    device: str
    augment: Augment | None = None

    def train_data(self, seed: int) -> Dataset:
        """The training images as clients read them, for training and Gram passes: fresh random views drawn
        from ``seed`` when the run augments (common/data/augment.py), else the images themselves."""
        return TrainViews(self.stream.train, self.augment, seed) if self.augment else self.stream.train

    def head_sums_data(self, task: int) -> Dataset:
        """The training images whose head inputs enter the analytic head's sums at ``task``'s end: one view per
        task, the same on every client (the images themselves when the run does not augment)."""
        return self.train_data(stable_seed(self.run.seed, task, 99))

    @property
    def alpha(self) -> dict[str, float]:
        """Gram shrinkage per layer: alpha-backbone for every adapted layer, alpha-head for the head."""
        return {name: self.run.alpha_backbone for name in self.shapes} | {HEAD: self.run.alpha_head}

    @property
    def dims(self) -> Dims:
        return Dims(self.shapes, self.run.rank, self.model.head.in_features, {n: a > 0 for n, a in self.alpha.items()})

    @property
    def test_samples(self) -> list[int]:
        """Test images of each task (of the evaluation split: the hold-out when validation-fraction > 0)."""
        return [int(np.isin(self.stream.test_labels, classes).sum()) for classes in self.tasks]

    def block(self, task: int) -> tuple[int, int]:
        """(lo, hi): the task's classes are the contiguous global ids lo..hi-1."""
        classes = self.tasks[task]
        return classes[0], classes[-1] + 1


@functools.lru_cache(maxsize=2)
def build_experiment(run: RunConfig, data_dir: str, device: str, cache_dir: str = DEFAULT_CACHE_DIR) -> Experiment:
    """Cached per process: a SuperNode or simulation worker builds the backbone and loads the data once.

    ``cache_dir``: where packaged streams are kept decoded across processes ("" = no disk cache).
    """
    spec = BACKBONES[run.backbone]
    args = dict(
        img_size=run.img_size,
        mean=spec.mean,
        std=spec.std,
        classes_per_task=run.classes_per_task,
        data_dir=data_dir or None,
        max_train_per_class=run.max_train_per_class or None,
        max_test_per_class=run.max_test_per_class or None,
        seed=run.seed,
    )
    if cache_dir and not data_dir:
        stream = load_or_build(Path(cache_dir).expanduser(), run.dataset, args, lambda: load_stream(run.dataset, **args))
    else:
        stream = load_stream(run.dataset, **args)
    if run.validation_fraction:
        stream = holdout_validation(stream, run.validation_fraction, run.seed)
    augment = AUGMENTS[run.augment]
    if augment and augment.test_crop < 1:
        stream = dataclasses.replace(stream, test=EvalView(stream.test, augment))
    tasks = stream.tasks[: run.num_tasks] if run.num_tasks else list(stream.tasks)
    if run.num_tasks > len(stream.tasks):
        raise ValueError(f"num-tasks {run.num_tasks} but the {run.dataset} stream has {len(stream.tasks)} tasks")
    for t, classes in enumerate(tasks):
        if classes != list(range(classes[0], classes[-1] + 1)):
            raise ValueError(f"task {t} classes are not a contiguous block: {classes}")
    num_classes = tasks[-1][-1] + 1
    model = build_model(
        run.backbone, num_classes=num_classes, rank=run.rank, weights=run.weights or None, head_init=run.head_init,
        seed=stable_seed(run.seed, HEAD_SEED),
    )
    model.to(device)
    return Experiment(
        run=run, model=model, stream=stream, tasks=tasks, shapes=layer_shapes(model), device=device, augment=augment
    )
