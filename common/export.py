"""A run's merged model as files that timm and peft load, and the image transform that goes with them.

    model/
        model.safetensors   the whole network for timm: W0 + the merged delta folded into every adapted layer,
                            the head for every class seen (timm's own key names)
        config.json         timm's model config (architecture, model args, class names, mean/std/input size)
        adapter/            the merged delta as a peft LoRA adapter on the pre-trained network
                            (adapter_config.json + adapter_model.safetensors), the head as a module to save
        classes.json        class names in head order, and the task blocks
        README.md           the model card (written by server/export.py)

The delta is exported exactly as a low-rank product. Every method's delta is a sum of low-rank terms times a
matrix on the right: LoRM's S pinv(H) = sum_tau B_tau (A_tau G_tau) pinv(H), the same identity
common/merges.py:regmean_lowrank uses, so its rank is at most (tasks x r) whatever the Grams' shrinkage (alpha 0:
diagonal G, alpha > 0: dense G; pinv(H) multiplies on the right either way). ``low_rank`` finds that rank by an
SVD in float64 and keeps every singular value above float64 rounding, so B A equals the delta to ~1e-15
relative; the adapter's rank is the largest layer's (the others padded with zeros).

Functions of tensors and a backbone spec; nothing here knows Flower, a method or the schedule.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from common.backbones import BackboneSpec, backbone_spec
from common.data.arrays import ImageArrayDataset
from common.data.augment import Augment, EvalView

MODEL_DIR = "model"
WEIGHTS_FILE = "model.safetensors"
TIMM_CONFIG = "config.json"
ADAPTER_DIR = "adapter"
CLASSES_FILE = "classes.json"
CARD_FILE = "README.md"


class ExportError(RuntimeError):
    """A model folder that cannot be written or read back."""


# ------------------------------------------------------------------------------------------------ the low-rank delta


def low_rank(delta: Tensor, sketch: int = 64) -> tuple[Tensor, Tensor]:
    """(B: (d_out, k), A: (k, d_in)) float64 with B A == delta to float64 rounding; k >= 1 is its numerical rank.

    Singular values above max(d_out, d_in) * eps * the largest are kept (numpy's matrix_rank rule); B and A
    share each one's square root. A zero delta gives k = 1 with B = 0.

    A rank-k delta is caught whole by a Gaussian sketch of l > k columns (range(delta Omega) = range(delta) with
    probability 1), so the SVD runs on the (l, d_in) projection Q^T delta: ~25x faster than a full SVD of a
    ViT-B MLP layer (0.3 s against 7 s for 3072 x 768). A sketch the rank fills is doubled; at the layer's width,
    or when the residual shows the range was missed, the full SVD runs.
    """
    d = delta.to(torch.float64)
    eps = max(d.shape) * torch.finfo(torch.float64).eps
    generator = torch.Generator(device=d.device).manual_seed(0)
    width = min(sketch, *d.shape)
    while width < min(d.shape):
        Q, _ = torch.linalg.qr(d @ torch.randn(d.shape[1], width, generator=generator, dtype=d.dtype, device=d.device))
        U, S, Vh = torch.linalg.svd(Q.T @ d, full_matrices=False)
        k = int((S > S[0] * eps).sum())
        if k < width:
            B, A = (Q @ U[:, :k]) * S[:k].sqrt(), S[:k].sqrt()[:, None] * Vh[:k]
            if k and torch.linalg.norm(B @ A - d) <= 1e3 * eps * torch.linalg.norm(d):
                return B, A
            break
        width *= 2
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    k = max(int((S > S[0] * eps).sum()), 1)
    root = S[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def low_rank_layers(deltas: Mapping[str, Tensor]) -> tuple[dict[str, tuple[Tensor, Tensor]], int, float]:
    """``low_rank`` of every layer, zero-padded to one rank R (the largest): ({name: (B (d_out, R), A (R, d_in))},
    R, the largest relative error ||B A - delta|| / ||delta|| (Frobenius) over the layers).

    Padding adds zero columns to B and zero rows to A, so B A is unchanged.
    """
    factors = {name: low_rank(d) for name, d in deltas.items()}
    rank = max(b.shape[1] for b, _ in factors.values())
    padded = {
        name: (nn.functional.pad(b, (0, rank - b.shape[1])), nn.functional.pad(a, (0, 0, 0, rank - a.shape[0])))
        for name, (b, a) in factors.items()
    }
    error = max(
        float(torch.linalg.norm(b @ a - deltas[n].to(b)) / torch.linalg.norm(deltas[n].to(b)).clamp(min=1e-300))
        for n, (b, a) in factors.items()
    )
    return padded, rank, error


# ------------------------------------------------------------------------------------------------- timm networks


def timm_network(spec: BackboneSpec, num_classes: int, state: Mapping[str, Tensor] | None = None) -> nn.Module:
    """timm's network for ``spec`` with a ``num_classes`` classifier, in eval mode; ``state`` loaded strictly
    (a missing, unexpected or mis-shaped key raises, naming it)."""
    net = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, **dict(spec.timm_args))
    if state is not None:
        net.load_state_dict(dict(state), strict=True)
    return net.eval()


def classifier_name(spec: BackboneSpec) -> str:
    """The module path of the timm network's classifier ("head" for a ViT, "classifier" for an EfficientNet)."""
    return timm.models.get_pretrained_cfg(spec.timm_name).classifier


def network_state(
    backbone_state: Mapping[str, Tensor],
    deltas: Mapping[str, Tensor],
    head_weight: Tensor,
    head_bias: Tensor,
    classifier: str,
) -> dict[str, Tensor]:
    """timm's state dict of the whole network: the backbone's tensors (keys of the plain timm backbone, W0 in
    the adapted layers), each adapted weight plus its delta, and the head under ``classifier``.

    ``deltas``: backbone layer path -> (d_out, d_in); W0 + delta is computed in float32 exactly as evaluation's
    set_deltas computes it, so the exported network gives the evaluated model's predictions.
    """
    state = {key: t.detach().cpu().clone() for key, t in backbone_state.items()}
    for name, delta in deltas.items():
        w0 = state[f"{name}.weight"]
        matrix = w0 if w0.ndim == 2 else w0[:, :, 0, 0]
        state[f"{name}.weight"] = (matrix + delta.to(w0.dtype).cpu()).reshape(w0.shape).contiguous()
    state[f"{classifier}.weight"] = head_weight.detach().to(torch.float32).cpu().contiguous()
    state[f"{classifier}.bias"] = head_bias.detach().to(torch.float32).cpu().contiguous()
    return state


def pretrained_network(backbone: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """The run's pre-trained network as timm builds it: W0 of ``backbone`` (its default weights, or the file
    ``weights``) and a zero classifier of ``num_classes`` rows: the base the exported peft adapter loads onto."""
    spec = backbone_spec(backbone)
    zeros = torch.zeros(num_classes, spec.num_features)
    state = network_state(spec.build(weights).state_dict(), {}, zeros, zeros[:, 0], classifier_name(spec))
    return timm_network(spec, num_classes, state)


def data_config(spec: BackboneSpec, img_size: int, augment: Augment | None) -> dict:
    """timm's data config of the run's test view: input size, mean/std, the central fraction kept (crop_pct)."""
    return dict(
        input_size=(3, img_size, img_size), mean=tuple(spec.mean), std=tuple(spec.std),
        crop_pct=augment.test_crop if augment else 1.0, crop_mode="center", interpolation="bilinear",
    )


def test_view(image: Image.Image, config: Mapping) -> Tensor:
    """An image as the model's input: (3, S, S) float32, through the streams' own code (common/data/): RGB,
    resized to S x S (bilinear, antialiased; nothing happens at S), the central ``crop_pct`` kept and resized back
    (bicubic) when below 1, normalised by mean/std. ``config``: a data config (``data_config``, or timm's
    pretrained_cfg from config.json)."""
    size = int(config["input_size"][-1])
    rgb = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)[None]
    view = ImageArrayDataset(rgb, np.zeros(1, dtype=np.int64), img_size=size, mean=config["mean"], std=config["std"])
    crop = float(config.get("crop_pct") or 1.0)
    if crop < 1.0:
        view = EvalView(view, Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, test_crop=crop))
    return view[0][0]


def timm_config(spec: BackboneSpec, network: nn.Module, class_names: list[str], data: Mapping) -> dict:
    """config.json in the layout of timm's Hugging Face configs (what timm.models.save_config_for_hf writes in
    recent timm, whose ``create_model("local-dir:<folder>", pretrained=True)`` reads it): the architecture, the
    arguments it is built with, the class names, and the pre-trained config with the run's data config in it."""
    cfg = {k: v for k, v in network.pretrained_cfg.items() if v is not None and k not in _SOURCE_KEYS}
    cfg |= {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    cfg |= {"num_classes": len(class_names), "custom_load": False}  # a ViT's pre-trained file may be a .npz; ours is not
    return {
        "architecture": network.pretrained_cfg.get("architecture", spec.timm_name),
        "num_classes": len(class_names),
        "num_features": spec.num_features,
        "label_names": list(class_names),
        "model_args": {"num_classes": len(class_names), **dict(spec.timm_args)},
        "pretrained_cfg": cfg,
    }


# Where timm's own weights come from, and what describes them but not ours (their licence, their pooling at 224 px).
_SOURCE_KEYS = (
    "url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "architecture", "tag", "license",
    "pool_size", "test_input_size", "test_crop_pct",
)


# ------------------------------------------------------------------------------------------------ the model folder


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: its entries are then on disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``target``; on a clean exit its files are fsynced and it replaces
    ``target`` in one step (readers see the old folder or the new one, never a mix), on an exception it is removed
    and ``target`` stays as it was. Where the kernel cannot swap two folders, the old one is renamed away first
    (a moment with no folder, never a half-written one). Temporary folders a dead writer left are removed: one
    process at a time writes a run folder (server/report.py: RunReport.locked)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*target.parent.glob(f".{target.name}.*.tmp"), *target.parent.glob(f".{target.name}.*.old")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a writer that died (the run folder has one writer)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for path in [*sorted(tmp.rglob("*"), reverse=True), tmp]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)  # as plain files (safetensors writes 0600)
            _fsync(path)
        if target.exists():
            if not _exchange(tmp, target):
                old = target.with_name(f".{target.name}.{os.getpid()}.old")
                os.replace(target, old)
                os.replace(tmp, target)
                tmp = old
        else:
            os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(
    folder: Path, spec: BackboneSpec, base: nn.Module, factors: Mapping[str, tuple[Tensor, Tensor]], rank: int
) -> None:
    """The delta as a peft LoRA adapter of rank ``rank`` (lora_alpha = rank: B A exactly) on ``base`` (the
    pre-trained timm network whose classifier already holds the head), the classifier saved whole
    (modules_to_save). ``factors``: timm layer path -> (B, A). ``base`` is changed in place (peft wraps it)."""
    from peft import get_peft_model

    from common.lora import ADAPTER, factor_matrix, lora_config, lora_layers

    classifier = classifier_name(spec)
    with torch.random.fork_rng(devices=[]):  # peft's fresh layers draw from the global generator
        model = get_peft_model(base, lora_config(spec.lora_pattern, rank, modules_to_save=[classifier]))
    layers = {name.removeprefix("base_model.model."): layer for name, layer in lora_layers(model).items()}
    if set(layers) != set(factors):
        raise ExportError(f"peft adapted {sorted(set(layers) ^ set(factors))[:3]} differently from the run's layers")
    with torch.no_grad():
        for name, (B, A) in factors.items():
            factor_matrix(layers[name], "A").copy_(A)
            factor_matrix(layers[name], "B").copy_(B)
    model.save_pretrained(str(folder), selected_adapters=[ADAPTER])
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty card template; the model card is one level up


def write_model_folder(
    target: Path,
    spec: BackboneSpec,
    backbone_state: Mapping[str, Tensor],
    deltas: Mapping[str, Tensor],
    head_weight: Tensor,
    head_bias: Tensor,
    class_names: list[str],
    tasks: list[list[int]],
    data: Mapping,
    card: Callable[[dict], str],
) -> dict:
    """Write the model folder (see the module docstring) atomically; returns {"classes": C, "adapter_rank": R,
    "max_rel_error": the adapter's largest relative error on a layer's delta}.

    ``backbone_state``: the plain timm backbone's tensors with W0 (keys without "backbone."), ``deltas``: layer
    path in that backbone -> (d_out, d_in); ``head_*``: rows of the classes seen (C = len(class_names));
    ``tasks``: global class ids per task seen; ``data``: ``data_config``'s dict; ``card``: the model card's text
    from the returned dict.
    """
    num_classes = len(class_names)
    if head_weight.shape[0] != num_classes or head_bias.shape[0] != num_classes:
        raise ExportError(f"head has {head_weight.shape[0]} rows for {num_classes} classes")
    classifier = classifier_name(spec)
    network = timm_network(spec, num_classes, network_state(backbone_state, deltas, head_weight, head_bias, classifier))
    base = timm_network(spec, num_classes, network_state(backbone_state, {}, head_weight, head_bias, classifier))
    factors, rank, error = low_rank_layers(deltas)
    info = {"classes": num_classes, "adapter_rank": rank, "max_rel_error": error}
    with atomic_folder(target) as tmp:
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        config = timm_config(spec, network, class_names, data)
        (tmp / TIMM_CONFIG).write_text(json.dumps(config, indent=2))
        adapter = tmp / ADAPTER_DIR
        adapter.mkdir()
        save_adapter(adapter, spec, base, factors, rank)
        (tmp / CLASSES_FILE).write_text(
            f'{{\n "classes": {json.dumps(list(class_names))},\n "tasks": {json.dumps(tasks)}\n}}\n'
        )
        (tmp / CARD_FILE).write_text(card(info))
    return info


# ---------------------------------------------------------------------------------------------------- reading it


def model_folder(path: str | Path) -> Path:
    """The model folder of a run folder (``<run>/model``), or ``path`` itself when it is one."""
    path = Path(path)
    for folder in (path / MODEL_DIR, path):
        if (folder / WEIGHTS_FILE).is_file() and (folder / TIMM_CONFIG).is_file():
            return folder
    raise ExportError(
        f"{path} holds no exported model ({MODEL_DIR}/{WEIGHTS_FILE}); a run writes it at every task end"
    )


def load_network(folder: Path, device: str = "cpu") -> tuple[nn.Module, dict, list[str]]:
    """(the timm network in eval mode, its data config, class names) of a model folder, loaded by timm itself:
    ``timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=C),
    num_classes=C, **model_args)``. The overlay needs num_classes too: timm drops a classifier whose size differs
    from the pre-trained config's (and loads the rest non-strictly)."""
    config = json.loads((folder / TIMM_CONFIG).read_text())
    args = dict(config["model_args"])
    overlay = dict(config["pretrained_cfg"]) | {"file": str(folder / WEIGHTS_FILE)}
    net = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **args)
    classes = json.loads((folder / CLASSES_FILE).read_text())["classes"]
    return net.eval().to(device), overlay, classes
