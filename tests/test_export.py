"""The exported model (common/export.py, server/export.py) and the predict command (cli/predict.py).

A short run on the offline stream writes <run>/model/ at every task end; timm and peft load it and give the run's
own accuracy and predictions, and `lorm-flower predict` on the test images saved as PNG files gives the run's
final accuracy on them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import cli
from common.backbones import backbone_spec
from common.config import RunConfig
from common.experiment import build_experiment
from common.export import (
    ADAPTER_DIR, WEIGHTS_FILE, atomic_folder, load_network, low_rank, low_rank_layers, pretrained_network,
)
from common.grams import shrink
from common.merges import TaskSums
from common.metrics import accuracy_per_task
from common.training import make_loader
from deploy.inprocess import InProcessTransport, run_in_process
from server.server_app import execute

K = 2  # clients


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_low_rank_is_exact_at_the_numerical_rank():
    for k in (1, 3, 7):
        delta = _rand(40, k, seed=k) @ _rand(k, 25, seed=10 + k)
        B, A = low_rank(delta)
        assert B.shape == (40, k) and A.shape == (k, 25)
        torch.testing.assert_close(B @ A, delta, rtol=1e-12, atol=1e-12)
    B, A = low_rank(torch.zeros(5, 4))
    assert B.shape == (5, 1) and A.shape == (1, 4) and not B.any()


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_the_merged_lorm_delta_is_a_lora_of_rank_at_most_tasks_times_r(alpha):
    """S pinv(H) = sum_tau B_tau (A_tau G_tau) pinv(H): rank <= T r with diagonal (alpha 0) and dense Grams alike."""
    T, r, d_out, d_in = 4, 3, 30, 50
    sums = TaskSums()
    for t in range(T):
        X = _rand(60, d_in, seed=100 + t) * torch.linspace(0.1, 3.0, d_in, dtype=torch.float64)
        X[:, -2:] = 0  # features no sample activated: pinv leaves them out
        sums.fold({"l": _rand(r, d_in, seed=t)}, {"l": _rand(d_out, r, seed=50 + t)}, {"l": shrink(X.T @ X, alpha)})
    delta = sums.delta()["l"]
    factors, rank, error = low_rank_layers({"l": delta})
    assert rank == T * r < min(d_out, d_in)  # generic factors: exactly T r
    assert error < 1e-12
    B, A = factors["l"]
    torch.testing.assert_close(B @ A, delta, rtol=0, atol=1e-12 * float(delta.abs().max()))


def test_the_folder_is_replaced_in_one_step_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(target) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("boom")
    assert (target / "a").read_text() == "1"
    (tmp_path / ".model.1.tmp").mkdir()  # left by a writer that died
    with atomic_folder(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folder left


RUNS = {
    "vit_tiny_test": dict(img_size=32),
    "efficientnet_lite0": dict(img_size=32),  # the default backbone: 1x1 convs, classifier "classifier"
}


# The EfficientNet run takes ~40 s of CPU (minutes on a shared 2-core machine): in the slow tier.
@pytest.fixture(scope="module", params=["vit_tiny_test", pytest.param("efficientnet_lite0", marks=pytest.mark.slow)])
def finished(request, tmp_path_factory):
    """(run config, run folder, metrics, experiment) of a 2-task run on the offline stream."""
    out = tmp_path_factory.mktemp("runs")
    run = RunConfig(
        backbone=request.param, classes_per_task=5, num_tasks=2, rounds_per_task=1, local_epochs=1,
        max_train_per_class=6, max_test_per_class=4, rank=2, min_clients=K, seed=3, output_dir=str(out),
        **RUNS[request.param],
    )
    metrics = execute(run, "r", lambda schedule: run_in_process(schedule, InProcessTransport(run, K)))
    return run, out / "r", metrics, build_experiment(run, run.data_dir, "cpu")  # the server's (cached)


def _test_set(exp, num_classes: int):
    indices = np.flatnonzero(exp.stream.test_labels < num_classes)
    return make_loader(exp.stream.test, indices, 64, shuffle=False, seed=0)


@torch.no_grad()
def _predict(net, loader) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = zip(*((net(x), y) for x, y in loader))
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def test_the_run_folder_holds_the_model_of_its_last_task(finished):
    run, folder, metrics, exp = finished
    model = folder / "model"
    files = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
    assert files == [
        "README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "classes.json",
        "config.json", "model.safetensors",
    ]
    classes = json.loads((model / "classes.json").read_text())
    assert classes["classes"] == exp.stream.class_names[:10] and classes["tasks"] == exp.tasks
    config = json.loads((model / "config.json").read_text())
    assert config["label_names"] == classes["classes"] and config["num_classes"] == 10
    card = (model / "README.md").read_text()
    assert f"FAA {metrics['faa']:.2f}" in card and "| 1 |" in card and "PeftModel.from_pretrained" in card
    adapter = json.loads((model / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["r"] == adapter["lora_alpha"] <= 2 * run.rank  # an exact LoRA of rank <= tasks x r
    assert not [p for p in folder.iterdir() if p.name.startswith(".model")]


def test_timm_loads_every_key_and_gives_the_run_accuracy(finished, caplog):
    run, folder, metrics, exp = finished
    spec = backbone_spec(run.backbone)
    with caplog.at_level(logging.INFO, logger="timm"):
        net = timm.create_model(
            spec.timm_name, pretrained=True, num_classes=10, **dict(spec.timm_args),
            pretrained_cfg_overlay=dict(file=str(folder / "model" / WEIGHTS_FILE), num_classes=10),
        ).eval()
    assert "Loading pretrained weights from file" in caplog.text
    assert "Missing keys" not in caplog.text and "Unexpected keys" not in caplog.text
    logits, labels = _predict(net, _test_set(exp, 10))
    assert accuracy_per_task(logits.argmax(1), labels, exp.tasks) == metrics["acc_matrix"][-1]
    loaded, _, classes = load_network(folder / "model")  # predict's loader: the same network
    torch.testing.assert_close(_predict(loaded, _test_set(exp, 10))[0], logits, rtol=0, atol=0)
    if "local-dir" in getattr(timm.models._factory, "_MODEL_SOURCES", ()):  # recent timm: the folder alone
        local = timm.create_model(f"local-dir:{folder / 'model'}", pretrained=True).eval()
        torch.testing.assert_close(_predict(local, _test_set(exp, 10))[0], logits, rtol=0, atol=0)


def test_peft_loads_the_adapter_and_gives_the_run_predictions(finished):
    from peft import PeftModel

    run, folder, metrics, exp = finished
    timm_logits, labels = _predict(load_network(folder / "model")[0], _test_set(exp, 10))
    base = pretrained_network(run.backbone, num_classes=10)
    model = PeftModel.from_pretrained(base, str(folder / "model" / ADAPTER_DIR)).eval()
    logits, _ = _predict(model, _test_set(exp, 10))
    assert (logits.argmax(1) == timm_logits.argmax(1)).all()
    assert np.abs(logits - timm_logits).max() < 1e-4 * max(1.0, np.abs(timm_logits).max())
    assert accuracy_per_task(logits.argmax(1), labels, exp.tasks) == metrics["acc_matrix"][-1]


def _command() -> list[str]:
    script = Path(sys.executable).with_name("lorm-flower")  # the console script pyproject.toml declares
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def test_predict_on_the_test_images_as_png_files_gives_the_run_final_accuracy(finished, tmp_path, capsys):
    run, folder, metrics, exp = finished
    images = tmp_path / "images"
    images.mkdir()
    test = exp.stream.test  # uint8 (N, 1, S, S): the offline stream's own pixels, written losslessly
    keep = np.flatnonzero(exp.stream.test_labels < 10)
    for i in keep:
        Image.fromarray(test.images[i, 0].numpy(), mode="L").save(images / f"{i:05d}.png")
    (images / "notes.txt").write_text("not an image: skipped by --folder")
    done = subprocess.run(
        [*_command(), "predict", str(folder), "--folder", str(images), "--json", "--top-k", "3"],
        capture_output=True, text=True, check=True, timeout=600,
    )
    results = json.loads(done.stdout)
    assert len(results) == len(keep) and all(len(r["top"]) == 3 for r in results)
    names = exp.stream.class_names
    predicted = np.array([names.index(r["top"][0]["class"]) for r in results])
    assert all(abs(sum(t["probability"] for t in r["top"]) - 1) < 1 for r in results)
    labels = exp.stream.test_labels[keep]
    assert accuracy_per_task(predicted, labels, exp.tasks) == metrics["acc_matrix"][-1]
    first = images / f"{keep[0]:05d}.png"
    assert cli.main(["predict", str(folder), str(first)]) == 0  # in process: the text form, top-5
    text = capsys.readouterr().out
    assert text.startswith(f"{first}: ") and text.count(",") == 4


def test_predict_names_a_folder_without_a_model(tmp_path, capsys):
    assert cli.main(["predict", str(tmp_path), "x.png"]) == 1
    assert "holds no exported model" in capsys.readouterr().err


@pytest.mark.parametrize("command, option", [
    ("predict", "--folder"), ("simulate", "--supernodes"), ("deploy", "--netns"), ("compare", "--strategies"),
])
def test_every_command_lists_its_options(command, option, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert option in out and out.startswith(f"usage: lorm-flower {command}")


def test_the_console_script_is_declared():
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lorm-flower": "cli:main"}
