"""Typed run and node configuration, validated once at the edge.

Flower hands both apps the same ``[tool.flwr.app.config]`` table (``context.run_config``) with kebab-case
keys, and each SuperNode its own ``--node-config``. Both are parsed here into frozen pydantic models, so the
rest of the code works with typed, checked objects and a bad value fails at start-up with a message that names
the key, instead of deep inside a round. The defaults below are the app's only defaults: pyproject.toml's table
repeats them for Flower, and a test keeps the two equal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.backbones import BACKBONES
from common.data import STREAMS
from common.methods import METHODS, Method


DEFAULT_CACHE_DIR = "~/.cache/lorm-flower/streams"  # decoded packaged streams (common/data/cache.py)
# A run's folder name: no separators, no "..", nothing hidden, so it always stays inside output-dir.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Config(BaseModel):
    # allow_inf_nan=False: an infinite lr, beta or timeout is accepted by every range check and fails much later.
    model_config = ConfigDict(
        alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True, allow_inf_nan=False
    )

    @classmethod
    def parse(cls, values: Mapping[str, Any], *, source: str) -> "_Config":
        """Validate a Flower config mapping; the error names every bad key and where it came from."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
            )
            raise ConfigError(f"invalid {source}: {problems}") from None


class ConfigError(ValueError):
    """A run or node configuration value is missing, unknown or out of range."""


class RunConfig(_Config):
    """Everything that defines a run; identical on the server and every client."""

    strategy: str = Field("lorm", description="a method of common/methods/ by name")
    dataset: str = "offline"
    data_dir: str = ""
    backbone: str = "efficientnet_lite0"
    weights: str = ""
    img_size: int = Field(48, ge=8, le=1024)
    classes_per_task: int = Field(5, ge=1)
    num_tasks: int = Field(0, ge=0, description="0 = every task the stream has")
    max_train_per_class: int = Field(60, ge=0, description="0 = no cap")
    max_test_per_class: int = Field(40, ge=0, description="0 = no cap")
    validation_fraction: float = Field(
        0.0, ge=0, lt=1,
        description="0 = evaluate on the test split; > 0 = hold out this fraction of every class's training samples "
        "and evaluate on them instead (for choosing settings without looking at the test split)",
    )
    rounds_per_task: int = Field(3, ge=1)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    rank: int = Field(4, ge=1, le=256)
    beta: float = Field(0.5, gt=0)
    alpha_backbone: float = Field(0.0, ge=0, le=1)
    # 0, not the paper's 0.5 (configs/paper/ keep 0.5): on the offline stream a validation hold-out preferred it
    # for LoRM at both betas (docs/methods.md).
    alpha_head: float = Field(0.0, ge=0, le=1)
    gram_passes: int = Field(1, ge=1, description="Gram passes over the local data (fresh augmented views each)")
    augment: Literal["none", "light", "paper"] = Field(
        "none",
        description="train-time views, for training and every Gram pass (common/data/augment.py): paper = the "
        "reference's random resized crop + flip and resize + centre crop at test; light = small crops, no flip",
    )
    # "zeros", not the reference's "trunc-normal" (configs/paper/ keep that): on the offline stream's validation
    # hold-out LoRM scored 54.2 % FAA with zeros and 45.3 % with trunc-normal (docs/results.md).
    head_init: Literal["trunc-normal", "zeros"] = Field(
        "zeros", description="the head's start: timm's truncated normal (std 0.02, bias 0, seeded) or zeros"
    )
    cross_task: Literal["auto", "mean", "chain"] = Field(
        "auto", description="how task deltas combine (common/methods/base.py); auto = the method's own default"
    )
    amp: Literal["bf16", "off"] = Field("bf16", description="autocast of training and Gram forwards on CUDA only")
    ridge: float = Field(0.0, ge=0)
    head: Literal["trained", "analytic"] = Field(
        "trained",
        description="the evaluated and exported classifier: trained = the method's own head blocks (the paper's); "
        "analytic = W0 + a ridge head over every class seen, from sums clients send at each task end "
        "(common/analytic.py, docs/methods.md)",
    )
    # 0.1 was chosen on the validation hold-out (validation-fraction 0.2) by bench/analytic_head.py for the head
    # on W0 (docs/results.md); relative to the mean diagonal of the summed Gram, so it does not depend on scale.
    head_ridge: float = Field(0.1, gt=0, description="ridge of the analytic head (head = analytic)")
    # No bfloat16: its 8-bit significand loses more than float16 scaled by max|G| (common/protocol.py), and
    # float16's range problem is what the scale already solves.
    gram_dtype: Literal["float64", "float32", "float16"] = Field(
        "float32", description="transport dtype of the Gram statistics (float16 is sent divided by max|G|)"
    )
    seed: int = Field(0, ge=0, description="every random draw derives from it (numpy's generators need >= 0)")
    min_clients: int = Field(1, ge=1, description="a round fails when fewer clients reply")
    num_partitions: int = Field(
        0, ge=0,
        description="the SuperNodes' num-partitions, checked against every reply; 0 = the value most nodes report "
        "at the start-up check, then required of every node",
    )
    round_timeout: float = Field(900.0, gt=0)
    reply_poll: float = Field(
        0.2, gt=0, description="seconds between the server's checks for replies (Flower's own loop waits 3 s)"
    )
    output_dir: str = "outputs"
    run_name: str = Field(
        "", description="results folder name (letters, digits, '.', '_', '-'); empty = run-<flower run id>"
    )
    device: str = "auto"
    eval_batch_size: int = Field(128, ge=1)
    privacy: Literal["plain", "secagg"] = Field(
        "plain", description="secagg: the server learns only sums over clients, through Flower's SecAgg+"
    )
    # Levels per value in SecAgg+'s fixed point (values are scaled into [-1, 1] first, see common/secagg.py);
    # at most 2^30, as secaggplus_mod rounds into int32.
    secagg_quantization_range: int = Field(1 << 30, ge=1 << 8, le=1 << 30)
    # As in Flower's SecAggPlusWorkflow: <= 1 is a fraction of the round's clients, > 1 a count.
    secagg_num_shares: float = Field(1.0, gt=0)
    secagg_reconstruction_threshold: float = Field(0.67, gt=0)

    @model_validator(mode="after")
    def _known_names(self) -> "RunConfig":
        for key, value, registry in (
            ("strategy", self.strategy, METHODS),
            ("dataset", self.dataset, STREAMS),
            ("backbone", self.backbone, BACKBONES),
        ):
            if value not in registry:
                raise ValueError(f"{key} {value!r} is not one of {sorted(registry)}")
        self.method  # noqa: B018  (refuses a cross-task rule the method does not have)
        if self.run_name and not SAFE_NAME.fullmatch(self.run_name):
            raise ValueError(
                f"run-name {self.run_name!r} must be a plain folder name (letters, digits, '.', '_', '-', not "
                "starting with '.'): it names a folder inside output-dir"
            )
        if self.num_partitions and self.min_clients > self.num_partitions:
            raise ValueError(
                f"min-clients {self.min_clients} exceeds num-partitions {self.num_partitions}: a round counts one "
                "reply per partition, so it could never have enough"
            )
        if self.privacy == "secagg" and self.min_clients < 2:
            raise ValueError("privacy 'secagg' needs min-clients >= 2: the sum of one client is that client's data")
        if self.privacy == "secagg" and not self.method.summable:
            raise ValueError(
                f"privacy 'secagg' needs a method whose merges need only sums over clients; {self.strategy!r} "
                "merges every client's own factors"
            )
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        for key, value in (("secagg-num-shares", shares), ("secagg-reconstruction-threshold", threshold)):
            if value > 1 and value != int(value):
                raise ValueError(f"{key} {value}: a fraction of the clients (<= 1) or a whole count")
        if 1 < shares < 3 or 1 < shares <= threshold:  # what Flower's SecAggPlusWorkflow refuses at run time
            raise ValueError("secagg-num-shares as a count must be >= 3 and above secagg-reconstruction-threshold")
        return self

    @property
    def method(self) -> Method:
        """The run's method with its cross-task rule."""
        return type(METHODS[self.strategy])("" if self.cross_task == "auto" else self.cross_task)


class NodeConfig(_Config):
    """One SuperNode's own settings (``--node-config``); simulation fills partition-id/num-partitions."""

    model_config = ConfigDict(
        alias_generator=_kebab, populate_by_name=True, extra="ignore", frozen=True, allow_inf_nan=False
    )

    partition_id: int = Field(ge=0)
    num_partitions: int = Field(ge=1)
    data_dir: str = ""
    device: str = ""
    num_threads: int = Field(0, ge=0, description="torch threads; 0 = torch's default")
    cache_dir: str = Field(DEFAULT_CACHE_DIR, description="decoded packaged streams, kept across messages; '' = off")

    @model_validator(mode="after")
    def _partition_in_range(self) -> "NodeConfig":
        if self.partition_id >= self.num_partitions:
            raise ValueError(f"partition-id {self.partition_id} must be < num-partitions {self.num_partitions}")
        return self


def resolve_device(requested: str, key: str = "run config device") -> str:
    """'auto' picks CUDA when this machine has it; anything else must be a device this machine has (ConfigError
    naming ``key`` otherwise, at start-up instead of torch's error at the first tensor moved there)."""
    import torch

    if requested in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    usable = "use auto, cpu, cuda, cuda:<index> or mps"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key} {requested!r} is not a torch device; {usable}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise ConfigError(f"{key} {requested!r}: this machine has {count} CUDA device(s); {usable}")
    elif device.type != "cpu" and not (device.type == "mps" and torch.backends.mps.is_available()):
        raise ConfigError(f"{key} {requested!r} is not available on this machine; {usable}")
    return requested
