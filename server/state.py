"""The server's whole state between rounds, and its atomic checkpoint.

Everything needed to resume sits here: where the schedule is, the shared adapter, the head, the cross-task
running sums S and H, the past tasks' adapters (clients need them for the Gram model), the analytic head's sums
(head = "analytic"), the accuracy matrix so far and the per-round history. It is written after every round with
write-to-temp + rename, so a crash leaves either the previous or the new checkpoint, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from common.analytic import HeadSums
from common.merges import TaskSums

CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is unreadable, from another version, or from a run with other settings."""


def config_fingerprint(config: dict[str, Any]) -> str:
    """Hash of the settings that change results; a checkpoint only resumes the run it came from."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def replaced_atomically(path: Path) -> Iterator[IO[bytes]]:
    """A binary file whose contents replace ``path`` once the block ends: a crash before then leaves the old file
    whole (or none), never a truncated one."""
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # a name no other writer shares
    with open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class ServerState:
    task: int  # the task in progress
    round: int  # the next round of that task (== rounds_per_task: only the task end is left)
    A: dict[str, Tensor]
    B: dict[str, Tensor]
    head_weight: Tensor  # (num_classes, d)
    head_bias: Tensor  # (num_classes,)
    sums: TaskSums
    past: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = field(default_factory=list)
    acc: list[list[float]] = field(default_factory=list)  # acc[t][j], j <= t
    task_aware: list[list[float]] = field(default_factory=list)  # the same, argmax within task j's classes
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0  # seconds the schedule has run, over every session up to this checkpoint
    num_partitions: int = 0  # the run's, as set or learnt at the first start-up check (0: not known yet)
    head_sums: HeadSums | None = None  # head = "analytic": the sums over clients and finished tasks

    def save(self, path: Path, fingerprint: str) -> None:
        payload = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": fingerprint,
            "task": self.task,
            "round": self.round,
            "A": self.A,
            "B": self.B,
            "head_weight": self.head_weight,
            "head_bias": self.head_bias,
            "sums": self.sums.state_dict(),
            "past": self.past,
            "acc": self.acc,
            "task_aware": self.task_aware,
            "history": self.history,
            "wall_s": self.wall_s,
            "num_partitions": self.num_partitions,
            "head_sums": None if self.head_sums is None else self.head_sums.state_dict(),
        }
        with replaced_atomically(path) as f:
            torch.save(payload, f)

    @classmethod
    def load(cls, path: Path, fingerprint: str, num_partitions: int = 0) -> "ServerState":
        """The checkpoint at ``path`` if it belongs to this run: the same fingerprint, and ``num_partitions``
        (the run's setting; 0 = any) equal to the one its run had (CheckpointError otherwise)."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for truncated/garbled files
            raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
        if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint {path} is not a version-{CHECKPOINT_VERSION} LoRM server state")
        if payload["fingerprint"] != fingerprint:
            raise CheckpointError(
                f"checkpoint {path} belongs to a run with other settings (fingerprint {payload['fingerprint']}, "
                f"this run {fingerprint}); use another run-name or output-dir to start fresh"
            )
        if num_partitions and payload.get("num_partitions", 0) not in (0, num_partitions):
            raise CheckpointError(
                f"checkpoint {path} belongs to a run over {payload['num_partitions']} partitions, this run sets "
                f"num-partitions {num_partitions}; use another run-name or output-dir to start fresh"
            )
        return cls(
            task=payload["task"],
            round=payload["round"],
            A=payload["A"],
            B=payload["B"],
            head_weight=payload["head_weight"],
            head_bias=payload["head_bias"],
            sums=TaskSums.from_state_dict(payload["sums"]),
            past=payload["past"],
            acc=payload["acc"],
            task_aware=payload.get("task_aware", []),  # absent from checkpoints written before it existed
            history=payload["history"],
            wall_s=payload.get("wall_s", 0.0),  # absent from checkpoints written before it existed
            num_partitions=payload.get("num_partitions", 0),
            head_sums=HeadSums.from_state_dict(sums) if (sums := payload.get("head_sums")) is not None else None,
        )
