"""Central evaluation of the merged model on every task seen so far."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from common.experiment import Experiment
from common.lora import set_deltas
from common.metrics import accuracy_per_task, task_aware_accuracy_per_task
from common.training import make_loader, predict_logits


def evaluate_seen(
    exp: Experiment, deltas: dict[str, Tensor], head_weight: Tensor, head_bias: Tensor, upto_task: int
) -> tuple[list[float], list[float]]:
    """Accuracy (%) on tasks 0..upto_task of W0 + deltas with the given head: argmax over all classes seen
    (class-incremental, the method's metric), and argmax within each task's own block (task-aware, a diagnostic).

    The live adapter is switched off (scale 0): after a task end its delta is already inside ``deltas``.
    """
    model, device = exp.model, exp.device
    tasks = exp.tasks[: upto_task + 1]
    seen = np.concatenate([np.asarray(c) for c in tasks])
    indices = np.flatnonzero(np.isin(exp.stream.test_labels, seen))
    loader = make_loader(exp.stream.test, indices, exp.run.eval_batch_size, shuffle=False, seed=0)
    set_deltas(model, {k: v.to(device, torch.float32) for k, v in deltas.items()}, adapter_scale=0.0)
    try:
        with torch.no_grad():
            model.head.weight.copy_(head_weight)
            model.head.bias.copy_(head_bias)
        logits, labels = predict_logits(model, loader, num_seen=int(seen.max()) + 1, device=device)
    finally:
        set_deltas(model, None, adapter_scale=1.0)
    return accuracy_per_task(logits.argmax(axis=1), labels, tasks), task_aware_accuracy_per_task(logits, labels, tasks)
