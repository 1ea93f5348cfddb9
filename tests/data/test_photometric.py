"""Photometric augmentation fields (gamma, brightness, contrast, illumination ramp, blur,
JPEG) of the one AugmentSpec, and the --equalize (CLAHE) preprocessing shared by training and
inference."""

from __future__ import annotations

import pytest
import torch

from tripletlab import InputError
from tripletlab.data.augment import (
    AUGMENT_PRESETS,
    AugmentSpec,
    SampleAugment,
    build_augment,
    equalize,
    photometric,
    preprocess,
)
from tripletlab.data.open import open_data
from tripletlab.data.streaming import ImageFiles

from helpers import make_folder

FIELDS = [
    {"gamma": [0.5, 2.0]},
    {"brightness": 0.4},
    {"contrast": 0.4},
    {"illumination": 0.8},
    {"blur": 1.5},
    {"jpeg": 20},
]


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: next(iter(f)))
def test_each_photometric_field_changes_pixels_on_both_executors_within_range(field):
    x = torch.rand(3, 1, 24, 20) * 0.6 + 0.2
    spec = AugmentSpec.from_config(field)
    assert spec.photometric and not spec.flips_only and spec.to_dict() == field
    batch = build_augment(field, seed=0)(x)
    sample = SampleAugment.from_config(field).apply_batch(x, [1, 2, 3])
    for out in (batch, sample):
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
        assert not torch.allclose(out, x, atol=1e-3)
        assert torch.isfinite(out).all()
    # the per-sample executor is a function of the seed
    again = SampleAugment.from_config(field).apply_batch(x, [1, 2, 3])
    assert torch.equal(sample, again)


def test_the_illumination_ramp_is_linear_in_one_direction():
    x = torch.full((1, 1, 8, 8), 0.5)
    params = {"angle": torch.tensor([0.0]), "strength": torch.tensor([0.5])}
    out = photometric(x, params)[0, 0]
    assert torch.allclose(out[0], out[-1])  # constant along y (light from the side)
    d = out[0, 1:] - out[0, :-1]
    assert (d > 0).all() and torch.allclose(d, d[0].expand_as(d), atol=1e-6)
    assert abs(float(out.mean()) - 0.5) < 1e-6  # the ramp averages to 1


def test_blur_of_sigma_zero_is_the_image_and_blur_smooths():
    x = torch.rand(2, 1, 16, 16)
    same = photometric(x, {"sigma": torch.tensor([0.0, 2.0])})
    assert torch.allclose(same[0], x[0], atol=1e-6)
    assert same[1].std() < 0.6 * x[1].std()


def test_photometric_options_are_validated():
    for bad, match in (
        ({"gamma": [2, 1]}, "gamma"),
        ({"brightness": 1.5}, "brightness"),
        ({"blur": -1}, "blur"),
        ({"jpeg": 99}, "jpeg"),
    ):
        with pytest.raises(InputError, match=match):
            AugmentSpec.from_config(bad)


def test_specs_without_photometric_fields_draw_what_they_drew_before():
    # "faces" is unchanged (the lighting preset is a new name) and draws no extra numbers
    assert AUGMENT_PRESETS["faces"] == {
        "degrees": 10.0,
        "translate": 0.06,
        "scale": [0.9, 1.1],
        "hflip": True,
    }
    a, b = build_augment("faces", seed=3), build_augment("faces", seed=3)
    x = torch.rand(4, 1, 16, 16)
    a(x)
    b(x)
    assert torch.equal(a.get_state(), b.get_state())
    lighting = AugmentSpec.from_config("faces-lighting")
    assert lighting.photometric and lighting.hflip and lighting.degrees == 10.0


def test_equalize_spreads_a_dark_low_contrast_image():
    ramp = torch.linspace(0.05, 0.25, 32).expand(1, 1, 32, 32).clone()
    out = equalize(ramp)
    assert out.shape == ramp.shape and out.max() - out.min() > 0.3  # from a range of 0.2
    assert torch.equal(preprocess(ramp, "none"), ramp)
    rgb = torch.rand(1, 3, 24, 24) * 0.3
    assert equalize(rgb).shape == rgb.shape
    with pytest.raises(InputError, match="unknown preprocessing"):
        preprocess(ramp, "hist")


def test_equalize_gives_the_same_pixels_in_memory_and_streamed(tmp_path):
    root = make_folder(tmp_path / "imgs", n_classes=2, per_class=2, size=(24, 20))
    ds, _, _ = open_data(str(root))
    files = ImageFiles(ds.paths, ds.y.tolist(), (24, 20), 1, preprocess="clahe")
    streamed = torch.stack([files[i][0] for i in range(len(files))])
    assert torch.equal(streamed, preprocess(ds.x, "clahe"))
