"""Which training samples each client holds: per task, a Dirichlet(beta) label-skewed split over clients."""

from __future__ import annotations

import numpy as np

from common.data.stream import DataError, Stream


def task_indices(labels: np.ndarray, task_classes: list[int]) -> np.ndarray:
    """Sorted positions in ``labels: (N,)`` whose class is one of ``task_classes``."""
    if not task_classes:
        raise DataError("task_indices: the task has no classes")
    return np.flatnonzero(np.isin(labels, task_classes))


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, beta: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Split positions ``0..N-1`` of ``labels: (N,)`` among clients; one sorted index array per client.

    For each class a vector p ~ Dirichlet(beta, ..., beta) over the clients is drawn and the class's samples go
    to clients by a multinomial(n_c, p) count (lower beta = more skew). Clients then left with fewer than
    ``min_size`` samples get them moved over from the largest clients: a bounded, deterministic repair
    instead of redrawing until lucky, which can take unboundedly long (or fail) at small beta.
    """
    if num_clients < 1:
        raise DataError(f"dirichlet_partition: num_clients must be >= 1, got {num_clients}")
    if not beta > 0:
        raise DataError(f"dirichlet_partition: beta must be > 0, got {beta}")
    if min_size < 0:
        raise DataError(f"dirichlet_partition: min_size must be >= 0, got {min_size}")
    if len(labels) < num_clients * min_size:
        raise DataError(
            f"dirichlet_partition: {len(labels)} samples cannot give each of {num_clients} clients "
            f"at least {min_size} (needs {num_clients * min_size}); use fewer clients or more data"
        )
    rng = np.random.default_rng(seed)
    owner = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(num_clients, beta))
        counts = rng.multinomial(len(members), p / p.sum())
        owner[members] = np.repeat(np.arange(num_clients), counts)
    sizes = np.bincount(owner, minlength=num_clients)
    for client in np.flatnonzero(sizes < min_size):
        while sizes[client] < min_size:
            # The total guarantees some client holds more than min_size while this one holds less.
            donor = int(np.argmax(sizes))
            take = min(min_size - sizes[client], sizes[donor] - min_size)
            moved = rng.choice(np.flatnonzero(owner == donor), size=take, replace=False)
            owner[moved] = client
            sizes[donor] -= take
            sizes[client] += take
    return [np.flatnonzero(owner == k) for k in range(num_clients)]


def client_task_indices(
    stream: Stream, task: int, partition_id: int, num_partitions: int, beta: float, seed: int
) -> np.ndarray:
    """Indices into ``stream.train`` that client ``partition_id`` trains on during ``task``.

    Every client computes the same partition of the task's samples independently (same seed), so the clients'
    shares are disjoint and cover the task without any coordination; the task id is mixed into the seed so
    each task gets its own draw.
    """
    if not 0 <= task < len(stream.tasks):
        raise DataError(f"{stream.name}: task {task} is outside 0..{len(stream.tasks) - 1}")
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"client partition-id {partition_id} is outside 0..{num_partitions - 1}")
    idx = task_indices(stream.train_labels, stream.tasks[task])
    task_seed = int(np.random.SeedSequence([seed, task]).generate_state(1)[0])
    parts = dirichlet_partition(stream.train_labels[idx], num_partitions, beta, task_seed)
    return idx[parts[partition_id]]
