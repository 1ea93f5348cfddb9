"""Batch-wise image augmentation in plain torch (no torchvision)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

__all__ = ["AUGMENT_PRESETS", "Augment", "build_augment", "zoom"]


class Augment(nn.Module):
    """Random affine (rotation, translation, scale), padded random crop and horizontal flip.

    Applied to a batch (N, C, H, W) with its own seeded generator; ``get_state``/``set_state``
    make resumed training bit-identical. Use it in training only.

    Example:
        >>> aug = Augment(affine_degrees=10, translate=0.05, hflip=True, seed=0)
        >>> aug(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 1, 28, 28])
    """

    def __init__(
        self,
        affine_degrees: float = 0.0,
        translate: float = 0.0,
        scale=(1.0, 1.0),
        hflip: bool = False,
        crop_pad: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if affine_degrees < 0 or translate < 0 or crop_pad < 0:
            raise InputError("augmentation amounts must be >= 0")
        if translate > 1:
            raise InputError(f"translate is a fraction of the image size (<= 1), got {translate}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise InputError(f"scale must be a range (lo, hi) with 0 < lo <= hi, got {scale!r}")
        self.affine_degrees = float(affine_degrees)
        self.translate = float(translate)
        self.scale = (float(scale[0]), float(scale[1]))
        self.hflip = bool(hflip)
        self.crop_pad = int(crop_pad)
        self.generator = torch.Generator().manual_seed(0 if seed is None else int(seed))

    def _u(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.crop_pad:
            p = self.crop_pad
            padded = F.pad(x, (p, p, p, p), mode="replicate")
            dx = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
            dy = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
            h, w = x.shape[2], x.shape[3]
            x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
        if self.affine_degrees or self.translate or self.scale != (1.0, 1.0):
            ang = self._u(n, -self.affine_degrees, self.affine_degrees) * math.pi / 180
            s = self._u(n, *self.scale)
            tx = self._u(n, -self.translate, self.translate) * 2
            ty = self._u(n, -self.translate, self.translate) * 2
            cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
            theta = torch.stack(
                [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
            ).to(x.dtype)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.hflip:
            flip = torch.rand(n, generator=self.generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def zoom(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Zoom a batch (N, C, H, W) about its centre: ``scale`` > 1 enlarges the content, < 1
    shrinks it (border pixels fill the margin). ``scale == 1`` returns ``x`` unchanged."""
    if scale == 1.0:
        return x
    theta = torch.tensor([[1.0 / scale, 0.0, 0.0], [0.0, 1.0 / scale, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


AUGMENT_PRESETS: dict[str, dict] = {
    "none": {},
    "flip": {"hflip": True},  # mirror images only: frozen stages stay cacheable
    "light": {"affine_degrees": 8.0, "translate": 0.05, "scale": [0.95, 1.05]},
    "faces": {"affine_degrees": 10.0, "translate": 0.06, "scale": [0.9, 1.1], "hflip": True},
    "strokes": {"affine_degrees": 10.0, "translate": 0.08, "scale": [0.9, 1.1]},
}


def build_augment(config: dict | str | None, seed: int | None = None) -> Augment | None:
    """An :class:`Augment` from a preset name or a dict of its arguments (None/"none": off)."""
    if config is None or config == "none" or config == {}:
        return None
    if isinstance(config, str):
        if config not in AUGMENT_PRESETS:
            raise InputError(
                f"unknown augmentation preset {config!r}; choose one of {sorted(AUGMENT_PRESETS)}"
            )
        config = AUGMENT_PRESETS[config]
    allowed = {"affine_degrees", "translate", "scale", "hflip", "crop_pad"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise InputError(f"unknown augmentation keys: {unknown}")
    try:
        return Augment(**config, seed=seed)
    except (TypeError, ValueError) as e:  # e.g. "scale": 1.1 instead of a range
        raise InputError(f"invalid augmentation options {config!r}: {e}") from None
