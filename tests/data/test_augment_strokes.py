"""The stroke fields of the augmentation spec (issue 23): ``thickness`` (stroke width, a grey
min/max filter) and ``elastic`` (a smooth random warp), against brute-force references, in both
executors."""

from __future__ import annotations

import pytest
import torch

from tripletlab.data.augment import (
    ELASTIC_GRID,
    Augment,
    AugmentSpec,
    SampleAugment,
    build_augment,
    draw_strokes,
    strokes,
)
from tripletlab.errors import InputError


def _filter_loop(img: torch.Tensor, radius: int, op) -> torch.Tensor:
    """A (2r+1)-square min or max filter by loops (the border replicated)."""
    c, h, w = img.shape
    out = torch.empty_like(img)
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                rows = [min(max(i + d, 0), h - 1) for d in range(-radius, radius + 1)]
                cols = [min(max(j + d, 0), w - 1) for d in range(-radius, radius + 1)]
                out[ch, i, j] = op(img[ch][rows][:, cols])
    return out


@pytest.mark.parametrize("width", [1.0, 2.0, -1.0, -2.0])
def test_thickness_is_a_min_or_max_filter_by_polarity(width):
    g = torch.Generator().manual_seed(0)
    ink = (torch.rand(2, 1, 11, 9, generator=g) > 0.8).double()  # sparse ink pixels
    dark_on_light = 1 - ink * 0.9  # mean > 1/2: dark strokes
    light_on_dark = ink * 0.9  # mean < 1/2: light strokes (MNIST)
    x = torch.cat([dark_on_light, light_on_dark])
    out = strokes(x, {"width": torch.full((4,), width, dtype=torch.float64)})
    r = int(abs(width))
    for i, img in enumerate(x):
        dark = i < 2
        thicken = width > 0
        op = torch.amin if thicken == dark else torch.amax
        assert torch.equal(out[i], _filter_loop(img, r, op)), (i, width)


def test_fractional_width_blends_the_two_whole_pixel_filters_and_zero_is_identity():
    x = 1 - (torch.rand(3, 1, 10, 10, generator=torch.Generator().manual_seed(1)) > 0.85).double()
    w = torch.tensor([0.0, 0.25, 1.5], dtype=torch.float64)
    out = strokes(x, {"width": w})
    assert torch.equal(out[0], x[0])
    f1 = _filter_loop(x[1], 1, torch.amin)
    assert torch.allclose(out[1], 0.75 * x[1] + 0.25 * f1)
    f1, f2 = _filter_loop(x[2], 1, torch.amin), _filter_loop(x[2], 2, torch.amin)
    assert torch.allclose(out[2], 0.5 * f1 + 0.5 * f2)


def test_elastic_zero_offsets_are_identity_and_constant_offsets_a_shift():
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    k = ELASTIC_GRID
    zero = torch.zeros(2, 2, k, k, dtype=torch.float64)
    assert torch.allclose(strokes(x, {"offsets": zero}), x, atol=1e-12)
    shift = zero.clone()
    shift[:, 0] = 1 / 16  # x offset: 1/16 of the width = one pixel
    out = strokes(x, {"offsets": shift})
    # output pixel j reads input pixel j + 1 (border replicated at the last column)
    assert torch.allclose(out[..., :-1], x[..., 1:], atol=1e-9)
    assert torch.allclose(out[..., -1], x[..., -1], atol=1e-9)


def test_elastic_is_smooth_and_bounded():
    spec = AugmentSpec(elastic=0.05)
    p = draw_strokes(spec, torch.Generator().manual_seed(0), 3)
    assert p["offsets"].shape == (3, 2, ELASTIC_GRID, ELASTIC_GRID)
    assert p["offsets"].abs().max() <= 0.05
    # a vertical bar stays one connected, slightly bent bar: displacement <= ~0.05 * 32 px
    x = torch.ones(3, 1, 32, 32, dtype=torch.float64)
    x[..., 15:17] = 0.0
    out = strokes(x, p)
    cols = (out < 0.5).double().mul(torch.arange(32.0, dtype=torch.float64)).sum(-1)
    cols = cols / (out < 0.5).double().sum(-1).clamp_min(1)
    assert (cols[..., 4:-4] - 15.5).abs().max() < 0.05 * 32 * 1.5 + 1
    assert not torch.allclose(out, x)


def test_both_executors_do_the_stroke_fields_deterministically():
    x = 1 - (torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2)) > 0.9).float()
    a, b = build_augment("strokes-elastic", seed=4), build_augment("strokes-elastic", seed=4)
    ya = a(x)
    assert torch.equal(ya, b(x)) and not torch.equal(ya, x) and torch.isfinite(ya).all()
    state = a.get_state().clone()
    y2 = a(x)
    a.set_state(state)
    assert torch.equal(a(x), y2)  # resumable
    sample = SampleAugment.from_config("strokes-elastic")
    assert sample.spec == a.spec and sample.elastic == 0.04 and sample.thickness == 0.7
    s1, s2 = sample.apply_batch(x, range(5)), sample.apply_batch(x, range(5))
    assert torch.equal(s1, s2) and not torch.equal(s1, x)
    assert torch.equal(sample(x[3], 3), s1[3])  # one image = its row of the batch call
    assert not a.spec.flips_only and a.spec.strokes


def test_stroke_fields_off_draw_nothing_more():
    """Specs without the stroke fields draw what they drew before the fields existed."""
    x = torch.rand(4, 1, 12, 12)
    light = Augment(spec=AugmentSpec.from_config("light"), seed=5)
    same = Augment(spec=AugmentSpec(**AugmentSpec.from_config("light").__dict__), seed=5)
    assert torch.equal(light(x), same(x))
    assert torch.equal(light.get_state(), same.get_state())
    only = Augment(thickness=1.0, seed=5)  # draws one width per image, nothing else
    only(x)
    ref = torch.Generator().manual_seed(5)
    torch.rand(4, generator=ref, dtype=torch.float64)
    assert torch.equal(only.get_state(), ref.get_state())


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"elastic": 0.5}, "elastic is the largest warp offset"),
        ({"elastic": -0.1}, "elastic"),
        ({"thickness": 4}, "thickness is a stroke width change"),
        ({"thickness": "thick"}, "thickness must be a number"),
    ],
)
def test_bad_stroke_fields_are_named(cfg, match):
    with pytest.raises(InputError, match=match):
        AugmentSpec.from_config(cfg)
