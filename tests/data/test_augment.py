"""One augmentation spec (AugmentSpec, AUGMENT_PRESETS) and its two executors: the batch
executor (Augment) and the per-sample executor (SampleAugment)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tripletlab.data.augment import (
    AUGMENT_PRESETS,
    Augment,
    AugmentSpec,
    SampleAugment,
    build_augment,
    default_augment,
)
from tripletlab.errors import InputError

BOTH = ("degrees", "translate", "scale", "crop_pad", "hflip")


def _fields(obj) -> dict:
    return {f.name: getattr(obj.spec, f.name) for f in dataclasses.fields(AugmentSpec)}


@pytest.mark.parametrize("preset", ["flip", "light", "faces", "strokes", "strokes-elastic"])
def test_same_preset_same_fields_in_both_executors(preset):
    batch = build_augment(preset, seed=0)
    sample = SampleAugment.from_config(preset)
    assert _fields(batch) == _fields(sample)
    assert batch.spec == sample.spec == AugmentSpec.from_config(preset)


def test_same_dict_same_fields_and_missing_fields_are_off():
    d = {"hflip": True}
    spec = AugmentSpec.from_config(d)
    assert spec == AugmentSpec(hflip=True) and spec.flips and spec.flips_only
    sample = SampleAugment.from_config(d)
    assert _fields(build_augment(d)) == _fields(sample)
    # flip only in the per-sample executor too: each image is itself or its mirror image
    x = torch.rand(1, 3, 9, 7)
    outs = [sample(x[0], s) for s in range(20)]
    assert all(
        torch.allclose(o, x[0], atol=1e-6) or torch.allclose(o, x[0].flip(2), atol=1e-6)
        for o in outs
    )
    assert any(torch.allclose(o, x[0].flip(2), atol=1e-6) for o in outs)


def test_alias_and_spec_round_trip():
    assert AugmentSpec.from_config({"affine_degrees": 5}) == AugmentSpec(degrees=5.0)
    for name in AUGMENT_PRESETS:
        spec = AugmentSpec.from_config(name)
        assert spec is None or AugmentSpec.from_config(spec.to_dict()) == spec
    with pytest.raises(InputError, match="repeats"):
        AugmentSpec.from_config({"affine_degrees": 5, "degrees": 6})


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"sharpen": 1}, r"unknown augmentation keys: \['sharpen'\]"),
        ("wild", "unknown augmentation preset 'wild'"),
        ({"degrees": -2}, "degrees must be >= 0"),
        ({"translate": 1.5}, "translate"),
        ({"scale": 1.1}, "scale must be a range"),
        ({"crop_scale": [0.5, 1.5]}, "crop_scale"),
        ({"crop_ratio": [2, 1]}, "crop_ratio"),
        ({"jitter": 1.0}, "jitter"),
        ({"crop_pad": 1.5}, "crop_pad"),
        ({"hflip": "yes"}, "hflip"),
        ({"degrees": "ten"}, "degrees must be a number"),
    ],
)
def test_bad_spec_names_the_key_or_value(cfg, match):
    with pytest.raises(InputError, match=match):
        AugmentSpec.from_config(cfg)


@pytest.mark.parametrize("cfg", ["crop", "faces-crop", "natural", {"jitter": 0.2}])
def test_batch_executor_does_crops_and_jitter_too(cfg):
    x = torch.rand(6, 3, 16, 14)
    a, b = build_augment(cfg, seed=0), build_augment(cfg, seed=0)
    y = a(x)
    assert torch.equal(y, b(x)) and not torch.equal(y, x) and y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1
    assert a.spec == SampleAugment.from_config(cfg).spec


def test_full_crop_is_identity_in_the_batch_executor():
    x = torch.rand(4, 3, 10, 8)
    aug = Augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), seed=0)  # off: draws nothing
    before = aug.get_state().clone()
    assert torch.equal(aug(x), x) and torch.equal(aug.get_state(), before)


def test_zero_fields_draw_nothing():
    x = torch.rand(6, 1, 8, 8)
    off = Augment(seed=3)
    before = off.get_state().clone()
    assert torch.equal(off(x), x) and torch.equal(off.get_state(), before)
    flip = Augment(hflip=True, seed=3)
    flip(x)
    ref = torch.Generator().manual_seed(3)
    torch.rand(6, generator=ref)  # the flip draws one number per image, nothing else
    assert torch.equal(flip.get_state(), ref.get_state())
    # fields the per-sample executor gained (translate, scale, crop_pad) draw only when on:
    # today's specs give the same images as before
    base = SampleAugment(crop_scale=(0.8, 1.0), degrees=10.0)
    same = SampleAugment(crop_scale=(0.8, 1.0), degrees=10.0, translate=0.0, scale=(1, 1))
    img = torch.rand(3, 12, 10)
    assert torch.equal(base(img, 11), same(img, 11))


def test_per_sample_executor_does_the_batch_fields():
    img = torch.zeros(1, 21, 21)
    img[:, 10, 10] = 1.0
    shift = SampleAugment.from_config({"crop_pad": 2})
    for s in range(8):  # a whole-pixel shift within the pad: the dot moves, stays one pixel
        out = shift(img, s)[0]
        r, c = divmod(int(out.argmax()), 21)
        assert abs(r - 10) <= 2 and abs(c - 10) <= 2 and torch.isclose(out.sum(), torch.tensor(1.0))
    light = SampleAugment.from_config("light")
    assert light.translate == 0.05 and light.scale == (0.95, 1.05)
    x = torch.rand(3, 16, 16)
    assert not torch.equal(light(x, 1), light(x, 2)) and torch.equal(light(x, 1), light(x, 1))


def test_default_augment_keeps_each_path_s_default():
    assert default_augment("image", streamed=False) == "light"
    assert default_augment("image", streamed=True) == "crop"
    assert default_augment("vector", streamed=False) is None
    assert default_augment("text", streamed=True) is None
    assert AugmentSpec.from_config("crop") == AugmentSpec(
        crop_scale=(0.85, 1.0), crop_ratio=(3 / 4, 4 / 3), degrees=8.0
    )


def test_streaming_still_exports_sample_augment():
    from tripletlab.data.streaming import SampleAugment as Streamed

    assert Streamed is SampleAugment
