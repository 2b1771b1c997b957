import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, NodeConfig, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_is_valid_and_complete():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run = RunConfig.parse(table, source="pyproject")
    # every field is set in pyproject, so `flwr run --run-config` can override any of them
    assert set(table) == {f.alias for f in RunConfig.model_fields.values()}
    assert run.method.schedule(3) == ["B", "A", "B"]


def test_pyproject_defaults_are_the_run_config_defaults():
    """One source of defaults: Flower reads pyproject's table, tests and tools build RunConfig(...)."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.parse(table, source="pyproject").model_dump() == RunConfig().model_dump()


@pytest.mark.parametrize(
    "override, key",
    [
        ({"rank": 0}, "rank"),
        ({"alpha-head": 1.5}, "alpha-head"),
        ({"beta": 0}, "beta"),
        ({"dataset": "imagenet-x"}, "dataset"),
        ({"backbone": "resnet9000"}, "backbone"),
        ({"no-such-key": 1}, "no-such-key"),
        ({"strategy": "fedsomething"}, "strategy"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        RunConfig.parse(override, source="run config")
    assert key.split("-")[0] in str(err.value) and "run config" in str(err.value)


@pytest.mark.parametrize(
    "override", [{"head": "linear"}, {"head-ridge": 0.0}, {"head-ridge": -1.0}, {"head-ridge": float("inf")},
                 {"head-ridge": float("nan")}, {"head-ridge": "x"}],
)
def test_head_settings_are_checked_naming_the_key(override):
    (key,) = override
    with pytest.raises(ConfigError, match=f"invalid run config: {key}: "):
        RunConfig.parse(override, source="run config")
    assert (RunConfig().head, RunConfig().head_ridge) == ("trained", 0.1)  # the paper's head by default
    assert RunConfig.parse({"head": "analytic", "head-ridge": 10}, source="run config").head_ridge == 10.0


def test_node_config_checks_partition_range_and_ignores_unknown_keys():
    node = NodeConfig.parse({"partition-id": 1, "num-partitions": 3, "other": "x"}, source="node config")
    assert node.partition_id == 1
    with pytest.raises(ConfigError, match="partition-id 3 must be < num-partitions 3"):
        NodeConfig.parse({"partition-id": 3, "num-partitions": 3}, source="node config")
    with pytest.raises(ConfigError, match="partition"):
        NodeConfig.parse({}, source="node config")


def test_lorm_schedule_alternates_starting_with_b():
    assert RunConfig(rounds_per_task=5).method.schedule(5) == ["B", "A", "B", "A", "B"]


def test_paper_configs_are_valid_run_configs():
    """configs/paper/*.toml override pyproject's defaults; every key must exist and every value be in range."""
    root = Path(__file__).resolve().parents[1]
    defaults = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    files = sorted((root / "configs" / "paper").glob("*.toml"))
    # ../shared/LORM_SPEC.md, "Published LoRM settings": (lr, rank, Gram passes) per dataset and beta
    published = {
        "cifar100-beta0.5": (3e-3, 1, 1), "cifar100-beta0.1": (3e-4, 16, 1), "cifar100-beta0.05": (5e-4, 16, 1),
        "imagenet-r-beta0.5": (3e-3, 2, 2), "imagenet-r-beta0.1": (1e-3, 32, 2), "imagenet-r-beta0.05": (1e-3, 16, 2),
    }
    assert sorted(p.stem for p in files) == sorted(published)
    for path in files:
        run = RunConfig.parse(defaults | tomllib.loads(path.read_text()), source=path.name)
        assert run.backbone == "vit_base_patch16_224.augreg_in21k" and run.num_tasks == 10 and run.min_clients == 10
        assert (run.lr, run.rank, run.gram_passes) == published[path.stem] and run.beta == float(path.stem.split("beta")[1])
        assert (run.rounds_per_task, run.local_epochs, run.batch_size, run.alpha_backbone, run.alpha_head) == (
            5, 5, 16, 0.0, 0.5)
        assert (run.augment, run.head_init, run.amp, run.cross_task) == ("paper", "trunc-normal", "bf16", "auto")
        assert run.classes_per_task == (10 if run.dataset == "cifar100" else 20)
