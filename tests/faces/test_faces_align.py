"""Umeyama similarity: a known transform is recovered exactly; the warp puts points where M
says; templates."""

from __future__ import annotations

import math

import pytest
import torch

from tripletlab.errors import InputError
from tripletlab.faces import (
    align_face,
    apply_transform,
    similarity_transform,
    template_points,
    warp_affine,
)


def _sim(c, theta, tx, ty):
    R = torch.tensor(
        [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
        dtype=torch.float64,
    )
    return torch.cat([c * R, torch.tensor([[tx], [ty]], dtype=torch.float64)], 1)


@pytest.mark.parametrize("c,theta,tx,ty", [(1, 0, 0, 0), (2.5, 0.3, -4, 7), (0.2, -2.9, 50, 1)])
def test_known_similarity_recovered_exactly(c, theta, tx, ty):
    g = torch.Generator().manual_seed(0)
    src = torch.rand(5, 2, generator=g, dtype=torch.float64) * 100
    M = _sim(c, theta, tx, ty)
    dst = apply_transform(M, src)
    got = similarity_transform(src, dst)
    assert torch.allclose(got, M, atol=1e-9)
    assert got.dtype == torch.float64


def test_least_squares_with_noise_beats_perturbations():
    g = torch.Generator().manual_seed(1)
    src = torch.rand(5, 2, generator=g, dtype=torch.float64) * 50
    dst = apply_transform(_sim(1.3, 0.4, 3, 2), src) + torch.randn(5, 2, generator=g).double()
    M = similarity_transform(src, dst)

    def err(m):
        return float(((apply_transform(m, src) - dst) ** 2).sum())

    base = err(M)
    for c, th, tx, ty in [(1.01, 0, 0, 0), (1, 0.01, 0, 0), (1, 0, 0.05, 0), (1, 0, 0, -0.05)]:
        P = _sim(c, th, tx, ty)
        A = torch.cat([M, torch.tensor([[0.0, 0, 1]], dtype=torch.float64)])
        assert err(P @ A) > base


def test_reflection_is_not_used():
    src = torch.tensor([[0.0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.2]], dtype=torch.float64)
    dst = src * torch.tensor([-1.0, 1.0], dtype=torch.float64)  # a mirror image
    M = similarity_transform(src, dst)
    assert torch.det(M[:, :2]) > 0


def test_similarity_bad_input():
    with pytest.raises(InputError, match="coincide"):
        similarity_transform(torch.ones(5, 2), torch.rand(5, 2))
    with pytest.raises(InputError, match=r"\(n, 2\)"):
        similarity_transform(torch.ones(5, 3), torch.rand(5, 3))
    with pytest.raises(InputError, match="NaN"):
        similarity_transform(torch.tensor([[0.0, 0], [float("nan"), 1]]), torch.rand(2, 2))


def test_warp_puts_a_point_where_M_says():
    ys, xs = torch.meshgrid(torch.arange(60) + 0.5, torch.arange(80) + 0.5, indexing="ij")
    img = torch.exp(-((xs - 30.5) ** 2 + (ys - 20.5) ** 2) / (2 * 2.0**2))[None]
    M = _sim(1.5, 0.5, 5, -3).float()
    out = warp_affine(img, M, (60, 80))[0]
    q = apply_transform(M, torch.tensor([30.5, 20.5]))
    cx, cy = float((out * xs).sum() / out.sum()), float((out * ys).sum() / out.sum())
    assert cx == pytest.approx(float(q[0]), abs=0.05)
    assert cy == pytest.approx(float(q[1]), abs=0.05)
    assert float(out.sum()) == pytest.approx(1.5**2 * float(img.sum()), rel=0.02)


def test_identity_warp_and_fill():
    img = torch.rand(3, 10, 12)
    eye = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    assert torch.allclose(warp_affine(img, eye, (10, 12)), img, atol=1e-6)
    shifted = warp_affine(img, torch.tensor([[1.0, 0, 100], [0, 1, 0]]), (10, 12), fill=7.0)
    assert torch.allclose(shifted, torch.full_like(img, 7.0))


@pytest.mark.parametrize("template", ["arcface", "head"])
def test_align_face_maps_landmarks_onto_template(template):
    ref = template_points(template, 96)
    pts = apply_transform(_sim(2.0, 0.2, 40, 30).float(), ref / 2)
    crop, M = align_face(torch.rand(3, 200, 200), pts, template=template, size=96)
    assert crop.shape == (3, 96, 96)
    assert torch.allclose(apply_transform(M, pts), ref, atol=1e-3)


def test_templates():
    a, h = template_points("arcface", 112), template_points("head", 112)
    assert a[0].tolist() == pytest.approx([38.7946, 52.1963], abs=1e-4)
    assert torch.allclose(template_points("arcface", 224), 2 * a)
    # the head template is the looser crop: eyes closer together, face smaller
    assert (h[1, 0] - h[0, 0]) < (a[1, 0] - a[0, 0])
    with pytest.raises(InputError, match="template"):
        template_points("loose")
    with pytest.raises(InputError, match="size"):
        template_points("arcface", 4)
