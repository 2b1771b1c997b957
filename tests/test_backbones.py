"""Backbone registry: real packaged EfficientNet-Lite0 weights, local ViT weight files, the seeded test ViT."""

from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_sample_images
from torch import Tensor

from common.backbones import (
    BACKBONES,
    efficientnet_lite0,
    packaged_efficientnet_lite0_weights,
    vit_base_in21k,
    vit_tiny_test,
)

PALACE, DAISY = 698, 985  # ImageNet-1k class indices
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _sample_photos(size: int = 224) -> Tensor:
    """scikit-learn's china.jpg and flower.jpg: (2, 3, size, size) in [0, 1], resized (short side 256) + centre crop."""
    images = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).float() / 255
    h, w = images.shape[-2:]
    short = round(size / 0.875)
    images = F.interpolate(images, size=(short, round(w * short / h)), mode="bilinear", antialias=True)
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    return images[..., top : top + size, left : left + size]


def _normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    return efficientnet_lite0(keep_classifier=True).eval()


def test_efficientnet_lite0_real_weights_recognise_photos(imagenet_lite0):
    spec = BACKBONES["efficientnet_lite0"]
    photos = _sample_photos(spec.default_img_size)
    with torch.no_grad():
        probs = imagenet_lite0(_normalise(photos, spec.mean, spec.std)).softmax(-1)
        probs_imagenet_norm = imagenet_lite0(_normalise(photos, IMAGENET_MEAN, IMAGENET_STD)).softmax(-1)
    assert probs.argmax(-1).tolist() == [PALACE, DAISY]
    # The registry's normalisation is the one these weights were trained with: ImageNet mean/std fits worse.
    assert probs[0, PALACE] > probs_imagenet_norm[0, PALACE]
    assert probs[1, DAISY] > probs_imagenet_norm[1, DAISY]


def test_efficientnet_lite0_backbone_is_the_classifier_trunk(imagenet_lite0):
    spec = BACKBONES["efficientnet_lite0"]
    backbone = spec.build(None).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = backbone(x)
        logits = imagenet_lite0(x)
    assert feats.shape == (2, spec.num_features)
    torch.testing.assert_close(imagenet_lite0.classifier(feats), logits)
    assert not any(k.startswith("classifier") for k in backbone.state_dict())


def test_efficientnet_lite0_broken_file_names_the_key(tmp_path):
    state = torch.load(packaged_efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    missing = dict(state)
    del missing["_blocks.3._bn1.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=re.escape("blocks.2.0.bn2.running_var")):
        efficientnet_lite0(str(tmp_path / "missing.pth"))
    renamed = dict(state)
    renamed["_blocks.3._squeeze.weight"] = renamed.pop("_blocks.3._bn1.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match="_blocks.3._squeeze.weight"):
        efficientnet_lite0(str(tmp_path / "renamed.pth"))
    reshaped = dict(state)
    reshaped["_conv_head.weight"] = reshaped["_conv_head.weight"][:10]
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match="conv_head.weight"):
        efficientnet_lite0(str(tmp_path / "reshaped.pth"))
    with pytest.raises(ValueError, match="does not exist"):
        efficientnet_lite0(str(tmp_path / "nope.pth"))


def test_efficientnet_lite0_timm_named_file(tmp_path, imagenet_lite0):
    torch.save(imagenet_lite0.state_dict(), tmp_path / "timm.pth")
    again = efficientnet_lite0(str(tmp_path / "timm.pth"), keep_classifier=True)
    for key, value in imagenet_lite0.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_vit_base_from_local_files(tmp_path):
    source = timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=False, num_classes=0)
    state = source.state_dict()
    pattern = re.compile(BACKBONES["vit_base_patch16_224.augreg_in21k"].lora_pattern)
    assert sum(1 for name, _ in source.named_modules() if pattern.fullmatch(name)) == 48
    # A classifier in the file (here a 21k-class one, as in the in21k release) is dropped.
    with_head = state | {"head.weight": torch.zeros(21843, 768), "head.bias": torch.zeros(21843)}
    torch.save(with_head, tmp_path / "vit.pth")
    save_file(state, str(tmp_path / "vit.safetensors"))
    for name in ("vit.pth", "vit.safetensors"):
        built = BACKBONES["vit_base_patch16_224.augreg_in21k"].build(str(tmp_path / name))
        assert built.num_features == 768
        got = built.state_dict()
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], v) for k, v in state.items()), name
    truncated = {k: v for k, v in state.items() if not k.startswith("blocks.11.")}
    torch.save(truncated, tmp_path / "truncated.pth")
    with pytest.raises(ValueError, match=re.escape("blocks.11.")):
        vit_base_in21k(str(tmp_path / "truncated.pth"))


def test_vit_tiny_test_seeded_and_rng_untouched(tmp_path):
    rng = torch.get_rng_state()
    a, b = vit_tiny_test(), vit_tiny_test()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    torch.nn.init.ones_(a.blocks[0].mlp.fc1.weight)
    torch.save(a.state_dict(), tmp_path / "tiny.pth")
    assert torch.equal(vit_tiny_test(str(tmp_path / "tiny.pth")).blocks[0].mlp.fc1.weight, a.blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "vit_tiny_test"])
def test_spec_matches_model(name):
    spec = BACKBONES[name]
    model = spec.build(None).eval()
    x = torch.zeros(2, 3, spec.default_img_size, spec.default_img_size)
    with torch.no_grad():
        assert model(x).shape == (2, spec.num_features)
    assert spec.name == name and len(spec.mean) == len(spec.std) == 3
