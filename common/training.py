"""Local work on one client's data: training a factor + head block, the Gram pass, and prediction.

Functions of a model and a DataLoader, shared by the client (training, Grams) and the server (evaluation).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from common.grams import collect_grams
from common.lora import lora_layers
from common.model import HEAD

def make_loader(dataset: Dataset, indices: np.ndarray, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
    """A loader over ``dataset[indices]``; shuffling uses its own generator so runs are reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0
    )


def autocast(device: str, amp: bool) -> torch.autocast:
    """bfloat16 autocast on CUDA when ``amp`` (the reference trains under fp16 autocast; bf16 needs no loss
    scaling); a no-op on the CPU, which stays float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and str(device).startswith("cuda"))


def train_block(
    model: nn.Module,
    loader: DataLoader,
    block: tuple[int, int],
    *,
    epochs: int,
    lr: float,
    device: str,
    amp: bool = False,
) -> float:
    """Cross-entropy on the current task's classes only; returns the mean loss of the last epoch.

    ``block = (lo, hi)``: logits lo..hi-1 are the task's classes, labels are global ids in that range.
    Only parameters with ``requires_grad`` move (the caller chose the factor); AdamW, weight decay 0, no schedule.
    ``amp``: the forward under bfloat16 autocast on CUDA (parameters, gradients and optimiser stay float32).
    """
    lo, hi = block
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    mean_loss = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if (y < lo).any() or (y >= hi).any():
                raise ValueError(f"label outside the task block [{lo}, {hi}) in local training data")
            with autocast(device, amp):
                logits = model(x)[:, lo:hi]
            loss = loss_fn(logits.float(), y - lo)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
        mean_loss = total / max(count, 1)
    return mean_loss


@torch.no_grad()
def gram_pass(
    model: nn.Module, loader: DataLoader, alpha: dict[str, float], *, passes: int, device: str, amp: bool = False
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Input Grams of every adapted layer and of the head, over all local data (eval mode, no grad).

    ``alpha[name]`` picks the layers (adapted layer names and/or "head") and each one's form (0 -> diagonal
    vector). Returns (float64 Grams, row counts).
    ``passes`` > 1 repeats the pass (it only changes the result when the loader's views are random).
    ``amp``: the forward under bfloat16 autocast on CUDA; the Grams still accumulate in float64.
    """
    available: dict[str, nn.Module] = dict(lora_layers(model)) | {HEAD: model.head}
    modules = {name: available[name] for name in alpha}
    with collect_grams(modules, alpha) as stats, autocast(device, amp):
        for _ in range(passes):
            for x, _y in loader:
                model(x.to(device))
    return stats.grams, stats.rows


@torch.no_grad()
def head_inputs(model: nn.Module, loader: DataLoader, *, device: str) -> tuple[Tensor, Tensor]:
    """(head inputs (n, d) float64 on the CPU, labels (n,)) of every sample of ``loader``, through the model as it
    is set (float32, no autocast, as evaluation runs it)."""
    xs, ys = [], []
    for x, y in loader:
        xs.append(model.features(x.to(device)).double().cpu())
        ys.append(y)
    if not xs:  # a client without samples of the task
        return torch.zeros(0, model.head.in_features, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: DataLoader, num_seen: int, *, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the classes seen so far (0..num_seen-1): (N, num_seen), and the labels: (N,)."""
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device))[:, :num_seen].float().cpu())
        labels.append(y)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()
