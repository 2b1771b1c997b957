"""Train-time views: seeded and reproducible, fresh on every read, inside the image; the Gram passes see them."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.data.augment import AUGMENTS, Augment, EvalView, TrainViews, crop_box
from common.lora import lora_layers
from common.model import build_model
from common.training import gram_pass, make_loader


def _images(n: int = 6, size: int = 32) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, size, size, generator=gen), torch.arange(n))


def _read(data, n: int) -> torch.Tensor:
    return torch.stack([data[i][0] for i in range(n)])


def test_views_are_reproducible_by_seed_fresh_on_every_read_and_leave_the_global_rng_alone():
    base = _images()
    torch.manual_seed(9)
    before = torch.rand(2)
    torch.manual_seed(9)
    first, again = _read(TrainViews(base, AUGMENTS["paper"], 1), 6), _read(TrainViews(base, AUGMENTS["paper"], 1), 6)
    assert torch.equal(torch.rand(2), before)
    assert torch.equal(first, again)
    views = TrainViews(base, AUGMENTS["paper"], 1)
    assert not torch.equal(_read(views, 6), _read(views, 6))  # the next epoch or pass reads other views
    assert not torch.equal(first, _read(TrainViews(base, AUGMENTS["paper"], 2), 6))
    assert first.shape == base.tensors[0].shape and [views[i][1] for i in range(6)] == list(range(6))


def test_crops_stay_inside_the_image_with_the_drawn_area():
    gen = torch.Generator().manual_seed(3)
    aug = AUGMENTS["light"]
    for h, w in ((28, 28), (48, 48), (30, 50)):
        for _ in range(200):
            top, left, ch, cw = crop_box(h, w, aug, gen)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
            assert aug.scale[0] * h * w * 0.8 <= ch * cw <= h * w  # rounding moves the area a little
    # no crop of that aspect fits: the central crop
    tall = Augment(scale=(1.0, 1.0), ratio=(3.0, 3.0), flip=False, test_crop=1.0)
    assert crop_box(10, 10, tall, gen) == (3, 0, 3, 10)


def test_the_test_view_keeps_the_centre():
    x = torch.zeros(1, 3, 16, 16)
    x[..., 2:14, 2:14] = 1.0  # the central 12 x 12 of the image
    view = EvalView(TensorDataset(x, torch.zeros(1)), Augment((1, 1), (1, 1), False, test_crop=0.75))
    out = view[0][0]
    assert out.shape == (3, 16, 16) and float(out.mean()) > 0.95  # the border is cropped away


def test_two_gram_passes_over_random_views_differ_from_one_pass_twice():
    model = build_model("vit_tiny_test", num_classes=3, rank=2)
    alpha = {name: 0.0 for name in lora_layers(model)}
    base = _images(8)
    idx = np.arange(8)

    def grams(data, passes):
        return gram_pass(model, make_loader(data, idx, 4, shuffle=False, seed=0), alpha, passes=passes, device="cpu")[0]

    plain_one, plain_two = grams(base, 1), grams(base, 2)
    assert all(torch.allclose(plain_two[n], 2 * plain_one[n]) for n in alpha)  # no views: a second pass repeats
    views_one = grams(TrainViews(base, AUGMENTS["paper"], 5), 1)
    views_two = grams(TrainViews(base, AUGMENTS["paper"], 5), 2)
    assert all(torch.equal(grams(TrainViews(base, AUGMENTS["paper"], 5), 1)[n], views_one[n]) for n in alpha)
    assert not any(torch.allclose(views_two[n], 2 * views_one[n]) for n in alpha)  # the second pass saw new views
