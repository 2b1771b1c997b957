"""The run's model, exported at every task end into the run folder beside the checkpoint: ``<run>/model/``.

What the files are and how the delta becomes a LoRA adapter is in common/export.py; this module gathers them
from the server's experiment and the schedule's state and writes the model card. The folder is replaced in one
step (common/export.py:atomic_folder), so a reader or a crash never sees half of it. It always holds the model
after the last finished task: W0 + the method's evaluated delta and the head over every class seen so far, the
model whose accuracy the run reports (with head = "analytic": W0, a zero delta, and the ridge head).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from torch import Tensor

from common.backbones import backbone_spec
from common.experiment import Experiment
from common.export import MODEL_DIR, data_config, write_model_folder
from common.lora import base_state_dict

BACKBONE = "backbone."  # the backbone's module path inside FCILModel, the prefix of every adapted layer's name


def export_model(
    exp: Experiment,
    run_folder: Path,
    deltas: dict[str, Tensor],
    head_weight: Tensor,
    head_bias: Tensor,
    task: int,
    results: dict,
) -> dict:
    """Write ``<run_folder>/model/`` for the model after ``task``: ``deltas`` (adapted layer -> (d_out, d_in), the
    method's evaluated delta), the head's rows of the classes seen, ``results`` (metrics.json's content so far)
    for the card. Returns what common/export.py:write_model_folder reports, plus the seconds it took."""
    started = time.perf_counter()
    spec = backbone_spec(exp.run.backbone)
    seen = exp.block(task)[1]  # classes 0..seen-1: every task's block so far
    tasks = exp.tasks[: task + 1]
    data = data_config(spec, exp.run.img_size, exp.augment)
    info = write_model_folder(
        run_folder / MODEL_DIR,
        spec,
        base_state_dict(exp.model.backbone),
        {name.removeprefix(BACKBONE): d for name, d in deltas.items()},
        head_weight[:seen],
        head_bias[:seen],
        list(exp.stream.class_names[:seen]),
        tasks,
        data,
        card=lambda info: model_card(exp, run_folder, task, results, data, info),
    )
    return info | {"export_s": time.perf_counter() - started}


def _matrix(acc: list[list[float]], tasks: list[list[int]], names: list[str]) -> str:
    head = [f"task {j} ({names[c[0]]}..{names[c[-1]]})" for j, c in enumerate(tasks)]
    lines = ["| after task | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for t, row in enumerate(acc):
        cells = [f"{a:.1f}" for a in row] + [""] * (len(head) - len(row))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(exp: Experiment, run_folder: Path, task: int, results: dict, data: dict, info: dict) -> str:
    """The model card (model/README.md): data, settings, results and how to load the files."""
    r, spec = exp.run, backbone_spec(exp.run.backbone)
    run_name = run_folder
    seen = exp.block(task)[1]
    names = list(exp.stream.class_names)
    tasks = exp.tasks[: task + 1]
    train = int(np.isin(exp.stream.train_labels, np.arange(seen)).sum())
    test = sum(exp.test_samples[: task + 1])
    args = "".join(f", {k}={v!r}" for k, v in spec.timm_args)
    timm_load = (
        f'timm.create_model("{spec.timm_name}", pretrained=True, num_classes={seen}{args},\n'
        f'                          pretrained_cfg_overlay=dict(file="{run_name}/model/model.safetensors", '
        f"num_classes={seen})).eval()"
    )
    settings = (
        f"strategy {r.strategy}, backbone {r.backbone} ({spec.timm_name} in timm), LoRA rank {r.rank}, "
        f"{r.rounds_per_task} rounds per task x {r.local_epochs} local epochs, lr {r.lr}, batch {r.batch_size}, "
        f"Dirichlet beta {r.beta}, alpha-backbone {r.alpha_backbone}, alpha-head {r.alpha_head}, ridge {r.ridge}, "
        f"augment {r.augment}, head-init {r.head_init}, seed {r.seed}, head {r.head}"
        + (f" (ridge {r.head_ridge:g} on the pre-trained features, zero LoRA delta)" if r.head == "analytic" else "")
        + "; every setting is in ../config.json"
    )
    return f"""# {run_folder.name}: {seen} classes after task {task + 1} of {len(exp.tasks)}

A classifier trained by federated class-incremental learning ({r.strategy}, LoRM-Flower): the pre-trained
{spec.timm_name} with the merged LoRA delta folded into its adapted layers and one linear head over every class
seen so far. Written at the end of task {task + 1}; the next task end replaces this folder.

## Data

Stream `{r.dataset}`: {len(tasks)} of {len(exp.tasks)} tasks so far, {r.classes_per_task} classes each, images at {r.img_size} px;
{train} training images (split over the clients, never pooled) and {test} {"validation hold-out" if r.validation_fraction else "test"}
images of the classes seen. Class names in head order, and each task's classes, are in `classes.json`.

## Settings

{settings}.

## Results ({"validation hold-out" if r.validation_fraction else "test split"}, %)

FAA {results["faa"]:.2f} (mean over the tasks seen of the final accuracy on each), pooled {results["faa_pooled"]:.2f},
average forgetting {results["average_forgetting"]:.2f}. Accuracy after task t on task j's classes:

{_matrix(results["acc_matrix"], tasks, names)}

## Files

- `model.safetensors` + `config.json`: the whole network for timm (W0 + delta, head of {seen} classes).
- `adapter/`: the delta as a peft LoRA adapter of rank {info["adapter_rank"]} (lora_alpha = r, B A equals the
  delta to {info["max_rel_error"]:.0e} relative), with the head saved whole (`modules_to_save`), on the
  pre-trained network.
- `classes.json`: class names in head order, and each task's class ids.

## Load

Inputs: RGB images resized to {r.img_size} x {r.img_size}, {"the central " + format(data["crop_pct"], ".3f") + " kept, " if data["crop_pct"] < 1 else ""}normalised with mean {tuple(round(m, 4) for m in data["mean"])},
std {tuple(round(s, 4) for s in data["std"])} (in `config.json`).

```python
import timm
model = {timm_load}
# or, with a recent timm (1.0.31 tested), from the folder alone:
model = timm.create_model("local-dir:{run_name}/model", pretrained=True).eval()
```

```python
from peft import PeftModel
from common.export import pretrained_network   # W0 of the run's backbone, a {seen}-class head to be replaced
base = pretrained_network("{r.backbone}", num_classes={seen})
model = PeftModel.from_pretrained(base, "{run_name}/model/adapter").eval()
```

```bash
lorm-flower predict {run_name} image.png ...       # top-5 class names and probabilities
```
"""
