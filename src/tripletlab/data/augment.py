"""Image augmentation in plain torch (no torchvision): one spec, two executors.

* :class:`AugmentSpec` — *what* to do: one vocabulary, one validation, one preset table
  (:data:`AUGMENT_PRESETS`), read from a preset name, a dict or None by
  :meth:`AugmentSpec.from_config`. Every field left out of a dict is off, so a dict means the
  same augmentation wherever it is used (``{"hflip": true}`` mirrors images and nothing else).
* :class:`Augment` — the batch executor: a batch (N, C, H, W) of in-memory images with its own
  seeded generator (``get_state`` / ``set_state`` for bit-identical resumes).
* :class:`SampleAugment` — the per-sample executor: one image at a time in DataLoader workers,
  each seeded by its own per-sample seed (streamed images, :mod:`tripletlab.data.streaming`).

Fields (all off by default):

========================  ===============================================  =========  ==========
field                     what                                             batch      per sample
========================  ===============================================  =========  ==========
``degrees``               rotation within ±degrees                         yes        yes
``translate``             shift, a fraction of the image size (<= 1)       yes        yes
``scale``                 zoom range ``[lo, hi]`` about the centre         yes        yes
``crop_pad``              pad (replicated border) and random crop, pixels  yes        yes
``crop_scale``            random resized crop: area range in (0, 1]        yes        yes
``crop_ratio``            random resized crop: aspect range                yes        yes
``hflip``                 horizontal flip with chance 1/2                  yes        yes
``jitter``                brightness/contrast/saturation in [1-j, 1+j]     yes (RGB)  yes (RGB)
``gamma``                 gamma range ``[lo, hi]`` (log-uniform), x**g      yes        yes
``brightness``            brightness factor in [1-b, 1+b] (grey too)       yes        yes
``contrast``              contrast about the image mean, [1-c, 1+c]        yes        yes
``illumination``          a linear light ramp in a random direction,       yes        yes
                          multiplied in: x * (1 + s * ramp), s in [0, i]
``blur``                  Gaussian blur, sigma in [0, blur] pixels         yes        yes
``jpeg``                  JPEG round trip (PIL), quality in [jpeg, 95];    yes        yes
                          0 = off
``elastic``               a smooth random warp: offsets on a 4x4 grid,     yes        yes
                          each within ±elastic of the image size,
                          upsampled bicubically (<= 0.25)
``thickness``             strokes thicker or thinner by up to ±thickness   yes        yes
                          pixels (grey min/max filter, <= 3)
========================  ===============================================  =========  ==========

The stroke fields (``elastic``, ``thickness``: handwriting, Simard et al., "Best Practices for
Convolutional Neural Networks Applied to Visual Document Analysis", ICDAR 2003) run after the
other geometry and before the photometric fields (:func:`draw_strokes`, :func:`strokes`). A
stroke is the darker side of an image whose mean is above 1/2 (dark ink on light paper, as
Omniglot) and the lighter side otherwise (MNIST); a fractional width blends the two nearest
whole-pixel filters.

The photometric fields (``gamma`` .. ``jpeg``: lighting, the variation between face sets) run
after the geometry, in one shared function (:func:`photometric`), with one draw per image and
field that is on, in the order of the table. Preprocessing that must be the same in training
and use (local histogram equalisation, ``--equalize clahe``) is not augmentation: see
:func:`equalize`.

Both executors do every field (the batch executor in steps: padded crop, affine, flip, resized
crop, jitter; the per-sample one in a single ``grid_sample``), so the same spec draws from the
same distribution on both paths, not the same numbers. ``affine_degrees`` is an alias of
``degrees`` (older configs and ``tripletlab tune``).

Random numbers: an executor draws nothing for a field that is off, so specs of earlier versions
draw exactly what they drew before (the batch executor draws its four affine numbers whenever
any of ``degrees`` / ``translate`` / ``scale`` is on, then four per image for a resized crop and
three for jitter when those are on; the per-sample executor draws its eight
crop/flip/rotation numbers, one more for ``jitter``, then only what ``translate``, ``scale`` and
``crop_pad`` need when they are on); the photometric and then the stroke fields draw last, and
only when on.

Default augmentation (:func:`default_augment`): ``"light"`` for images in memory; streamed images
default to ``"crop"`` (a random resized crop and rotation: what streamed runs have always used
by default). Before 0.2 the streamed presets were a vocabulary of their own, in which ``light``,
``faces`` and ``strokes`` named crops; they now name the same augmentation as in memory. The old
streamed ``light`` is ``crop``, the old streamed ``faces`` is ``faces-crop``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

__all__ = [
    "AUGMENT_PRESETS",
    "Augment",
    "AugmentSpec",
    "SampleAugment",
    "build_augment",
    "default_augment",
    "PREPROCESSING",
    "draw_photometric",
    "equalize",
    "equalize_u8",
    "photometric",
    "preprocess",
    "zoom",
]

_ALIASES = {"affine_degrees": "degrees"}
_GREY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])


def _pair(name: str, value) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise InputError(f"{name} must be a range [lo, hi], got {value!r}")
    try:
        return (float(value[0]), float(value[1]))
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a range [lo, hi] of numbers, got {value!r}") from None


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class AugmentSpec:
    """What an augmentation does (see the module docstring for the fields); all off by
    default. Validated on construction (an :class:`InputError` names the bad field and value).

    Example:
        >>> spec = AugmentSpec.from_config({"hflip": True})
        >>> spec.flips, spec.flips_only
        (True, True)
        >>> AugmentSpec.from_config("light").degrees
        8.0
    """

    degrees: float = 0.0
    translate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    crop_pad: int = 0
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    hflip: bool = False
    jitter: float = 0.0
    gamma: tuple[float, float] = (1.0, 1.0)
    brightness: float = 0.0
    contrast: float = 0.0
    illumination: float = 0.0
    blur: float = 0.0
    jpeg: int = 0
    elastic: float = 0.0
    thickness: float = 0.0

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        put("elastic", _number("elastic", self.elastic))
        if not 0 <= self.elastic <= 0.25:
            raise InputError(
                f"elastic is the largest warp offset as a fraction of the image size, in "
                f"[0, 0.25], got {self.elastic}"
            )
        put("thickness", _number("thickness", self.thickness))
        if not 0 <= self.thickness <= 3:
            raise InputError(
                f"thickness is a stroke width change in pixels in [0, 3], got {self.thickness}"
            )
        put("gamma", _pair("gamma", self.gamma))
        if not 0 < self.gamma[0] <= self.gamma[1]:
            raise InputError(f"gamma must be a range (lo, hi) with 0 < lo <= hi, got {self.gamma}")
        for name in ("brightness", "contrast", "illumination"):
            put(name, _number(name, getattr(self, name)))
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        put("blur", _number("blur", self.blur))
        if not 0 <= self.blur <= 10:
            raise InputError(f"blur is a sigma in pixels in [0, 10], got {self.blur}")
        if isinstance(self.jpeg, bool) or int(self.jpeg) != self.jpeg or not 0 <= self.jpeg <= 95:
            raise InputError(
                f"jpeg is the lowest JPEG quality in [1, 95] (0 = off), got {self.jpeg!r}"
            )
        put("jpeg", int(self.jpeg))
        put("degrees", _number("degrees", self.degrees))
        put("translate", _number("translate", self.translate))
        if self.degrees < 0:
            raise InputError(f"degrees must be >= 0, got {self.degrees}")
        if not 0 <= self.translate <= 1:
            raise InputError(
                f"translate is a fraction of the image size (>= 0 and <= 1), got {self.translate}"
            )
        if isinstance(self.crop_pad, bool) or int(self.crop_pad) != self.crop_pad:
            raise InputError(f"crop_pad must be a whole number of pixels, got {self.crop_pad!r}")
        put("crop_pad", int(self.crop_pad))
        if self.crop_pad < 0:
            raise InputError(f"crop_pad must be >= 0, got {self.crop_pad}")
        put("scale", _pair("scale", self.scale))
        if not 0 < self.scale[0] <= self.scale[1]:
            raise InputError(f"scale must be a range (lo, hi) with 0 < lo <= hi, got {self.scale}")
        put("crop_scale", _pair("crop_scale", self.crop_scale))
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise InputError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {lo, hi}")
        put("crop_ratio", _pair("crop_ratio", self.crop_ratio))
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise InputError(
                f"crop_ratio must be (lo, hi) with 0 < lo <= hi, got {self.crop_ratio}"
            )
        if not isinstance(self.hflip, (bool, int)):
            raise InputError(f"hflip must be true or false, got {self.hflip!r}")
        put("hflip", bool(self.hflip))
        put("jitter", _number("jitter", self.jitter))
        if not 0 <= self.jitter < 1:
            raise InputError(f"jitter must be in [0, 1), got {self.jitter}")

    @classmethod
    def from_config(cls, cfg: AugmentSpec | dict | str | None) -> AugmentSpec | None:
        """A spec from a preset name (:data:`AUGMENT_PRESETS`), a dict of its fields (missing
        ones off; ``affine_degrees`` accepted for ``degrees``) or None / ``"none"`` / ``{}``
        (None: no augmentation)."""
        if isinstance(cfg, AugmentSpec):
            return cfg
        if cfg is None or cfg == "none" or cfg == {}:
            return None
        if isinstance(cfg, str):
            if cfg not in AUGMENT_PRESETS:
                raise InputError(
                    f"unknown augmentation preset {cfg!r}; choose one of {sorted(AUGMENT_PRESETS)}"
                )
            cfg = AUGMENT_PRESETS[cfg]
        if not isinstance(cfg, dict):
            raise InputError(f"an augmentation is a preset name or a dict of options, got {cfg!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if _ALIASES.get(k, k) not in fields)
        if unknown:
            raise InputError(
                f"unknown augmentation keys: {unknown} (known: {sorted(fields | set(_ALIASES))})"
            )
        kw: dict = {}
        for k, v in cfg.items():
            name = _ALIASES.get(k, k)
            if name in kw:
                raise InputError(f"augmentation key {k!r} repeats {name!r}")
            kw[name] = v
        try:
            return cls(**kw)
        except InputError as e:
            raise InputError(f"invalid augmentation options {cfg!r}: {e}") from None

    # ----------------------------------------------------------------- what it does
    @property
    def affine(self) -> bool:
        """Rotation, shift or zoom (the batch executor's affine block)."""
        return bool(self.degrees or self.translate or self.scale != (1.0, 1.0))

    @property
    def crops(self) -> bool:
        """A random resized crop (``crop_scale`` / ``crop_ratio``)."""
        return self.crop_scale != (1.0, 1.0) or self.crop_ratio != (1.0, 1.0)

    @property
    def flips(self) -> bool:
        """Mirrors images (cached features then need the mirror images' too)."""
        return self.hflip

    @property
    def photometric(self) -> bool:
        """Changes pixel values (gamma, brightness, contrast, illumination, blur, JPEG)."""
        return bool(
            self.gamma != (1.0, 1.0)
            or self.brightness
            or self.contrast
            or self.illumination
            or self.blur
            or self.jpeg
        )

    @property
    def strokes(self) -> bool:
        """Warps or changes the width of strokes (``elastic``, ``thickness``)."""
        return bool(self.elastic or self.thickness)

    @property
    def flips_only(self) -> bool:
        """At most horizontal flips: cached feature maps of images and their mirror images
        reproduce it."""
        return not (
            self.affine
            or self.crops
            or self.crop_pad
            or self.jitter
            or self.photometric
            or self.strokes
        )

    def to_dict(self) -> dict:
        """The fields that are on (``from_config`` of it gives this spec back)."""
        off = AugmentSpec()
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != getattr(off, f.name):
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    # ----------------------------------------------------------------- executors
    def batch(self, seed: int | None = None) -> Augment:
        """The batch executor of this spec (in-memory images)."""
        return Augment(spec=self, seed=seed)

    def per_sample(self) -> SampleAugment:
        """The per-sample executor of this spec (streamed images, DataLoader workers)."""
        return SampleAugment(**dataclasses.asdict(self))


AUGMENT_PRESETS: dict[str, dict] = {
    "none": {},
    "flip": {"hflip": True},  # mirror images only: frozen stages stay cacheable
    "light": {"degrees": 8.0, "translate": 0.05, "scale": [0.95, 1.05]},
    "faces": {"degrees": 10.0, "translate": 0.06, "scale": [0.9, 1.1], "hflip": True},
    "strokes": {"degrees": 10.0, "translate": 0.08, "scale": [0.9, 1.1]},
    # handwriting (issue 23): the geometry of ``strokes`` plus a smooth warp and stroke width
    "strokes-elastic": {
        "degrees": 10.0,
        "translate": 0.08,
        "scale": [0.9, 1.1],
        "elastic": 0.04,
        "thickness": 0.7,
    },
    # random resized crops (``crop``: the streamed default)
    "crop": {"crop_scale": [0.85, 1.0], "crop_ratio": [3 / 4, 4 / 3], "degrees": 8.0},
    "faces-crop": {
        "crop_scale": [0.75, 1.0],
        "crop_ratio": [0.9, 1.1],
        "hflip": True,
        "degrees": 10.0,
    },
    # lighting (issue 23): the geometry of ``faces`` plus gamma, brightness/contrast, a
    # directional light ramp and blur; ``faces`` itself is unchanged
    "faces-lighting": {
        "degrees": 10.0,
        "translate": 0.06,
        "scale": [0.9, 1.1],
        "hflip": True,
        "gamma": [0.5, 2.0],
        "brightness": 0.3,
        "contrast": 0.3,
        "illumination": 0.7,
        "blur": 1.0,
    },
    "lighting": {  # photometric only (no geometry)
        "gamma": [0.5, 2.0],
        "brightness": 0.3,
        "contrast": 0.3,
        "illumination": 0.7,
        "blur": 1.0,
    },
    "natural": {
        "crop_scale": [0.5, 1.0],
        "crop_ratio": [3 / 4, 4 / 3],
        "hflip": True,
        "degrees": 10.0,
        "jitter": 0.2,
    },
}


def default_augment(kind: str, streamed: bool) -> str | None:
    """The preset a training run uses when none is given: ``"light"`` for images in memory,
    ``"crop"`` for streamed images (the random resized crop streamed runs have always used by
    default: training weights stay what they were), None for vectors and texts.

    Example:
        >>> default_augment("image", streamed=False), default_augment("image", streamed=True)
        ('light', 'crop')
        >>> default_augment("vector", streamed=False) is None
        True
    """
    if kind != "image":
        return None
    return "crop" if streamed else "light"


# ------------------------------------------------------------------------ batch executor


class Augment(nn.Module):
    """The batch executor: random padded crop (``crop_pad``), affine (rotation, translation,
    zoom), horizontal flip, random resized crop (``crop_scale`` / ``crop_ratio``) and colour
    jitter (RGB) of a batch (N, C, H, W), with its own seeded generator; ``get_state`` /
    ``set_state`` make resumed training bit-identical. Use it in training only. Built from an
    :class:`AugmentSpec` (``spec``) or its fields as keywords.

    Example:
        >>> aug = Augment(affine_degrees=10, translate=0.05, hflip=True, seed=0)
        >>> aug(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 1, 28, 28])
    """

    def __init__(
        self, spec: AugmentSpec | None = None, *, seed: int | None = None, **fields
    ) -> None:
        super().__init__()
        if spec is None:
            spec = AugmentSpec.from_config(fields) or AugmentSpec()
        elif fields:
            raise InputError("give an AugmentSpec or its fields, not both")
        self.spec = spec
        self.affine_degrees = spec.degrees
        self.translate = spec.translate
        self.scale = spec.scale
        self.hflip = spec.hflip
        self.crop_pad = spec.crop_pad
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
        if self.spec.affine:  # four draws whenever any affine field is on (as ever)
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
        if self.spec.crops:  # random resized crop (as the per-sample executor draws it)
            lo, hi = self.spec.crop_scale
            area = self._u(n, lo, hi)
            lr0, lr1 = math.log(self.spec.crop_ratio[0]), math.log(self.spec.crop_ratio[1])
            ratio = torch.exp(self._u(n, lr0, lr1))
            sw = torch.sqrt(area * ratio).clamp(max=1.0)
            sh = torch.sqrt(area / ratio).clamp(max=1.0)
            tx = (1 - sw) * self._u(n, -1.0, 1.0)
            ty = (1 - sh) * self._u(n, -1.0, 1.0)
            zero = torch.zeros(n)
            theta = torch.stack(
                [torch.stack([sw, zero, tx], 1), torch.stack([zero, sh, ty], 1)], 1
            ).to(x.dtype)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.spec.jitter and x.shape[1] == 3:  # colour jitter (RGB only, as per sample)
            j = self.spec.jitter
            b, k, sat = (self._u(n, 1 - j, 1 + j).to(x.dtype)[:, None, None, None] for _ in "bks")
            mean = x.mean(dim=(1, 2, 3), keepdim=True) * b
            x = torch.addcmul(mean * (1 - k), x, b * k)
            grey = torch.tensordot(_GREY_WEIGHTS.to(x.dtype), x, dims=([0], [1]))[:, None]
            x = torch.lerp(grey, x, sat).clamp(0, 1)
        photo = draw_photometric(self.spec, self.generator, n) if self.spec.photometric else {}
        if self.spec.strokes:  # drawn after the photometric fields, applied before them
            x = strokes(x, draw_strokes(self.spec, self.generator, n))
        if photo:
            x = photometric(x, photo)
        return x

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def build_augment(
    config: AugmentSpec | dict | str | None, seed: int | None = None
) -> Augment | None:
    """The batch executor (:class:`Augment`) of a preset name, a dict or a spec (None/"none":
    off)."""
    spec = AugmentSpec.from_config(config)
    return None if spec is None else Augment(spec=spec, seed=seed)


def zoom(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Zoom a batch (N, C, H, W) about its centre: ``scale`` > 1 enlarges the content, < 1
    shrinks it (border pixels fill the margin). ``scale == 1`` returns ``x`` unchanged."""
    if scale == 1.0:
        return x
    theta = torch.tensor([[1.0 / scale, 0.0, 0.0], [0.0, 1.0 / scale, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ------------------------------------------------------------------- photometric fields


def draw_photometric(spec: AugmentSpec, g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    """The photometric parameters of ``n`` images (one (n,) tensor per field that is on, drawn
    in the order gamma, brightness, contrast, illumination (angle, strength), blur, jpeg)."""
    out: dict[str, torch.Tensor] = {}

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    if spec.gamma != (1.0, 1.0):
        out["gamma"] = torch.exp(u(math.log(spec.gamma[0]), math.log(spec.gamma[1])))
    if spec.brightness:
        out["brightness"] = u(1 - spec.brightness, 1 + spec.brightness)
    if spec.contrast:
        out["contrast"] = u(1 - spec.contrast, 1 + spec.contrast)
    if spec.illumination:
        out["angle"] = u(0.0, 2 * math.pi)
        out["strength"] = u(0.0, spec.illumination)
    if spec.blur:
        out["sigma"] = u(0.0, spec.blur)
    if spec.jpeg:
        out["quality"] = torch.randint(spec.jpeg, 96, (n,), generator=g).double()
    return out


def photometric(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply photometric parameters (:func:`draw_photometric`) to a batch (N, C, H, W) in
    [0, 1]: the light ramp ``x * (1 + s * r)`` (``r`` in [-1, 1] along the direction ``angle``),
    gamma ``x ** g``, brightness ``x * b``, contrast ``(x - mean) * c + mean``, Gaussian blur,
    JPEG round trip; clamped to [0, 1].

    Example:
        >>> x = torch.full((1, 1, 4, 4), 0.25)
        >>> photometric(x, {"gamma": torch.tensor([0.5])})[0, 0, 0, 0].item()
        0.5
    """
    n, c, h, w = x.shape
    dt = x.dtype

    def col(v: torch.Tensor) -> torch.Tensor:
        return v.to(dt).view(n, 1, 1, 1)

    if "angle" in params:
        xs, ys = _base_coords(h, w, torch.float64)
        ca, sa = torch.cos(params["angle"]), torch.sin(params["angle"])
        ramp = ca.view(n, 1, 1) * xs.view(1, 1, w) + sa.view(n, 1, 1) * ys.view(1, h, 1)
        ramp = ramp / (ca.abs() + sa.abs()).clamp_min(1e-6).view(n, 1, 1)  # in [-1, 1]
        light = 1 + params["strength"].view(n, 1, 1) * ramp
        x = x * light.to(dt)[:, None]
    if "gamma" in params:
        x = x.clamp(0, 1).pow(col(params["gamma"]))
    if "brightness" in params:
        x = x * col(params["brightness"])
    if "contrast" in params:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * col(params["contrast"]) + mean
    x = x.clamp(0, 1)
    if "sigma" in params:
        x = _gaussian_blur(x, params["sigma"])
    if "quality" in params:
        x = _jpeg(x, params["quality"])
    return x


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each image with its own sigma (0: unchanged)."""
    n, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    s = sigma.clamp_min(1e-3).view(n, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    k = torch.where(sigma.view(n, 1) < 1e-3, (t == 0).double().expand(n, -1), k).to(x.dtype)
    k = k.repeat_interleave(c, 0)  # (N*C, 2r+1), one kernel per image and channel
    z = x.reshape(1, n * c, h, w)
    z = F.pad(z, (radius, radius, radius, radius), mode="replicate")
    z = F.conv2d(z, k.view(n * c, 1, 1, -1), groups=n * c)
    z = F.conv2d(z, k.view(n * c, 1, -1, 1), groups=n * c)
    return z.view(n, c, h, w)


def _jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """A JPEG round trip (PIL) of each image at its quality."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for img, q in zip(x, quality.tolist(), strict=True):
        a = (img.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        arr = a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=int(q))
        buf.seek(0)
        back = np.asarray(Image.open(buf).convert("L" if a.shape[0] == 1 else "RGB"))
        t = torch.from_numpy(back.copy())
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
        out.append(t.to(x.dtype) / 255)
    return torch.stack(out).to(x.device)


# ------------------------------------------------------------------------ stroke fields

#: the side of the grid of random offsets behind ``elastic`` (a smooth warp of the whole image)
ELASTIC_GRID = 4


def draw_strokes(spec: AugmentSpec, g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    """The stroke parameters of ``n`` images, drawn in the order elastic (``(n, 2, 4, 4)``
    offsets in [-1, 1]), thickness (``(n,)`` in [-1, 1]), each only when on; scaled by the
    spec: ``elastic`` (a fraction of the image size) and ``thickness`` (pixels)."""
    out: dict[str, torch.Tensor] = {}
    k = ELASTIC_GRID
    if spec.elastic:
        u = torch.rand(n * 2 * k * k, generator=g, dtype=torch.float64).view(n, 2, k, k)
        out["offsets"] = (2 * u - 1) * spec.elastic
    if spec.thickness:
        out["width"] = (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) * spec.thickness
    return out


def strokes(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply stroke parameters (:func:`draw_strokes`) to a batch (N, C, H, W) in [0, 1]: the
    smooth warp (each output pixel ``p`` reads ``x`` at ``p + 2 e(p)`` in ``[-1, 1]``
    coordinates, ``e`` the bicubic upsampling of the offsets: a displacement of at most about
    ``elastic`` of the image size), then the stroke width (``w`` > 0 thickens: a grey-level
    erosion (min filter) of dark ink on a light image, dilation otherwise; ``|w|`` whole pixels
    of 3x3 filtering, the fraction blended linearly).

    Example:
        >>> x = torch.ones(1, 1, 9, 9); x[0, 0, 4, 4] = 0.0  # one dark dot on white
        >>> int((strokes(x, {"width": torch.tensor([1.0])}) < 0.5).sum())
        9
        >>> int((strokes(x, {"width": torch.tensor([-1.0])}) < 0.5).sum())
        0
    """
    n, c, h, w = x.shape
    if "offsets" in params:
        e = F.interpolate(params["offsets"], size=(h, w), mode="bicubic", align_corners=True)
        xs, ys = _base_coords(h, w, torch.float64)
        grid = torch.stack([xs.expand(h, w), ys.expand(h, w)], -1)  # (H, W, 2): x, y
        grid = grid + 2 * e.permute(0, 2, 3, 1)  # offsets are fractions of the size
        x = F.grid_sample(x, grid.to(x.dtype), "bilinear", "border", align_corners=False)
    if "width" in params:
        width = params["width"].to(x.dtype)
        steps = int(math.ceil(float(width.abs().max())))
        if steps:
            light = x.mean(dim=(1, 2, 3)) > 0.5  # dark ink on light paper
            thicker = (width > 0) == light  # min filter (else max filter)
            sign = torch.where(thicker, -1.0, 1.0).to(x.dtype).view(n, 1, 1, 1)
            levels = [x]
            z = x * sign  # a max filter of sign * x is the min (or max) filter of x
            for _ in range(steps):
                z = F.max_pool2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
                levels.append(z * sign)
            stack = torch.stack(levels)  # (steps + 1, N, C, H, W)
            a = width.abs()
            lo = a.floor().long().clamp(max=steps)
            hi = (lo + 1).clamp(max=steps)
            idx = torch.arange(n)
            frac = (a - lo.to(a.dtype)).view(n, 1, 1, 1)
            x = torch.lerp(stack[lo, idx], stack[hi, idx], frac)
    return x


# ------------------------------------------------------------------- per-sample executor


@functools.lru_cache(maxsize=16)
def _base_coords(h: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (W,) and y (H, 1) of pixel centres in [-1, 1] (``align_corners=False``)."""
    xs = (torch.arange(w, dtype=torch.float64) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=torch.float64) * 2 + 1) / h - 1
    return xs.to(dtype), ys[:, None].to(dtype)


@dataclass
class SampleAugment:
    """The per-sample executor: random resized crop (area ``crop_scale``, aspect
    ``crop_ratio``), horizontal flip, rotation within ±``degrees``, shift (``translate``), zoom
    (``scale``), padded crop (``crop_pad``, as a whole-pixel shift with the border replicated)
    and for RGB colour jitter (brightness/contrast/saturation factors in [1 - ``jitter``,
    1 + ``jitter``]). All geometry is one affine ``grid_sample`` (border padding). Deterministic
    given the per-sample seed, so results do not depend on the worker.

    The keyword defaults are a ready-made crop + flip + rotation (as before 0.2); a preset or a
    dict goes through :class:`AugmentSpec` (:meth:`from_config`), where a missing field is off.

    Example:
        >>> aug = SampleAugment(degrees=10, hflip=True)
        >>> aug(torch.rand(3, 32, 32), seed=1).shape
        torch.Size([3, 32, 32])
    """

    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    degrees: float = 10.0
    jitter: float = 0.0
    translate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    crop_pad: int = 0
    gamma: tuple[float, float] = (1.0, 1.0)
    brightness: float = 0.0
    contrast: float = 0.0
    illumination: float = 0.0
    blur: float = 0.0
    jpeg: int = 0
    elastic: float = 0.0
    thickness: float = 0.0

    def __post_init__(self) -> None:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        spec = AugmentSpec(**fields)  # the one validation
        for k in fields:
            setattr(self, k, getattr(spec, k))

    @property
    def spec(self) -> AugmentSpec:
        return AugmentSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def _params(self, seed: int, h: int = 0, w: int = 0) -> tuple[list[float], list[float]]:
        """The affine matrix (row-major 2x3) and the jitter factors (brightness, contrast,
        saturation) drawn from ``seed`` (``h``, ``w``: the image size, for ``crop_pad``)."""
        return self._draw(seed, h, w)[:2]

    def _draw(self, seed: int, h: int = 0, w: int = 0) -> tuple[list, list, dict, dict]:
        """:meth:`_params`, then the photometric parameters (:func:`draw_photometric`) and the
        stroke parameters (:func:`draw_strokes`), each empty when none of its fields is on."""
        g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        u = torch.rand(8, generator=g).tolist()
        area = self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * u[0]
        lr0, lr1 = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = math.exp(lr0 + (lr1 - lr0) * u[1])
        sw = min(1.0, math.sqrt(area * ratio))  # crop size as a fraction of width / height
        sh = min(1.0, math.sqrt(area / ratio))
        tx = (1 - sw) * (2 * u[2] - 1)  # crop centre in [-1, 1] coordinates
        ty = (1 - sh) * (2 * u[3] - 1)
        ang = math.radians(self.degrees * (2 * u[4] - 1))
        flip = -1.0 if self.hflip and u[5] < 0.5 else 1.0
        c, s = math.cos(ang), math.sin(ang)
        j = self.jitter
        jit = [1.0, 1.0, 1.0]
        if j:
            sat = 1 + j * (2 * float(torch.rand(1, generator=g)) - 1)
            jit = [1 + j * (2 * u[6] - 1), 1 + j * (2 * u[7] - 1), sat]
        # the fields of the batch executor, drawn (after the above) only when they are on
        z = 1.0
        if self.scale != (1.0, 1.0):
            z = self.scale[0] + (self.scale[1] - self.scale[0]) * float(torch.rand(1, generator=g))
        if self.translate:
            d = torch.rand(2, generator=g).tolist()
            tx += 2 * self.translate * (2 * d[0] - 1)
            ty += 2 * self.translate * (2 * d[1] - 1)
        if self.crop_pad:
            p = self.crop_pad
            d = torch.randint(0, 2 * p + 1, (2,), generator=g).tolist()
            tx += 2 * (d[0] - p) / max(w, 1)
            ty += 2 * (d[1] - p) / max(h, 1)
        if z != 1.0:
            sw, sh = sw / z, sh / z
        theta = [sw * c * flip, -sh * s, tx, sw * s * flip, sh * c, ty]
        spec = self.spec
        photo = draw_photometric(spec, g, 1) if spec.photometric else {}
        stroke = draw_strokes(spec, g, 1) if spec.strokes else {}
        return theta, jit, photo, stroke  # photometric, then strokes: drawn last, when on

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return self.apply_batch(x[None], [seed])[0]

    def apply_batch(self, x: torch.Tensor, seeds) -> torch.Tensor:
        """Augment each image of ``x`` (N, C, H, W) with its own seed, in one ``grid_sample``
        (the same values as one call per image; workers call it per image, which keeps the
        working set in cache and measured faster than whole batches)."""
        n, _, h, w = x.shape
        drawn = [self._draw(s, h, w) for s in seeds]
        params = [d[:2] for d in drawn]
        photo = [d[2] for d in drawn if d[2]]
        stroke = [d[3] for d in drawn if d[3]]
        theta = torch.tensor([p[0] for p in params], dtype=x.dtype).view(-1, 2, 3)
        # F.affine_grid(theta, x.shape, align_corners=False), from cached pixel-centre coordinates:
        # 22 µs instead of 88 µs for one 112x112 image
        xs, ys = _base_coords(h, w, x.dtype)
        t = theta[:, :, :, None, None]  # (N, 2, 3, 1, 1)
        grid = torch.addcmul(t[:, :, 2] + t[:, :, 0] * xs, t[:, :, 1], ys)  # (N, 2, H, W)
        grid = grid.permute(0, 2, 3, 1)
        out = F.grid_sample(x, grid, "bilinear", "border", align_corners=False)
        if self.jitter and out.shape[1] == 3:
            jit = torch.tensor([p[1] for p in params], dtype=x.dtype)
            b, k, sat = jit.T[:, :, None, None, None]
            # brightness b then contrast k about the mean: x*b*k + mean(x*b)*(1-k), one pass
            mean = out.mean(dim=(1, 2, 3), keepdim=True) * b
            out = torch.addcmul(mean * (1 - k), out, b * k)
            grey = torch.tensordot(_GREY_WEIGHTS.to(out.dtype), out, dims=([0], [1]))[:, None]
            out = torch.lerp(grey, out, sat).clamp_(0, 1)  # saturation: (x - grey) * sat + grey
        if stroke:
            out = strokes(out, {k: torch.cat([p[k] for p in stroke]) for k in stroke[0]})
        if photo:
            out = photometric(out, {k: torch.cat([p[k] for p in photo]) for k in photo[0]})
        return out

    @classmethod
    def from_config(cls, cfg: AugmentSpec | dict | str | None) -> SampleAugment | None:
        """The per-sample executor of a preset name (:data:`AUGMENT_PRESETS`), a dict of
        :class:`AugmentSpec` fields (missing ones off) or a spec; None / ``"none"``: off."""
        spec = AugmentSpec.from_config(cfg)
        return None if spec is None else spec.per_sample()


# ------------------------------------------------------------------------- preprocessing

#: image preprocessing a run applies alike in training and use (``--equalize``)
PREPROCESSING = ("none", "clahe")


def equalize_u8(img, tiles: int = 8, clip: float = 3.0):
    """CLAHE-like local histogram equalisation (Zuiderveld, "Contrast Limited Adaptive
    Histogram Equalization", Graphics Gems IV, 1994) of one uint8 image (C, H, W) (numpy or
    torch): per tile of a ``tiles`` x ``tiles`` grid (fewer on small images: tiles of >= 16
    pixels a side, so a 56x46 face has 3x2), the histogram clipped at ``clip`` x its mean count
    (the excess spread over every level; the mapping's slope is at most ``clip``) gives a
    mapping (its CDF); each pixel takes the bilinear blend of the mappings of the four nearest
    tile centres. RGB images equalise their luma (the channels scaled by it).

    Example:
        >>> import numpy as np
        >>> img = np.tile(np.arange(32, 96, dtype=np.uint8), (1, 64, 1))  # (1, 64, 64)
        >>> out = equalize_u8(img)
        >>> out.dtype, out.shape, int(out.max()) - int(out.min()) > 64
        (dtype('uint8'), (1, 64, 64), True)
    """
    import numpy as np

    a = img.numpy() if torch.is_tensor(img) else np.asarray(img)
    was_tensor = torch.is_tensor(img)
    c, h, w = a.shape
    if c == 3:
        y = (0.299 * a[0] + 0.587 * a[1] + 0.114 * a[2]).round().clip(0, 255).astype(np.uint8)
    else:
        y = a[0]
    ty, tx = max(1, min(tiles, h // 16)), max(1, min(tiles, w // 16))
    ys = np.linspace(0, h, ty + 1).round().astype(int)
    xs = np.linspace(0, w, tx + 1).round().astype(int)
    luts = np.empty((ty, tx, 256), dtype=np.float64)
    for i in range(ty):
        for j in range(tx):
            tile = y[ys[i] : ys[i + 1], xs[j] : xs[j + 1]]
            hist = np.bincount(tile.ravel(), minlength=256).astype(np.float64)
            limit = max(1.0, clip * tile.size / 256)
            excess = np.maximum(hist - limit, 0).sum()
            hist = np.minimum(hist, limit) + excess / 256
            cdf = np.cumsum(hist)
            luts[i, j] = 255 * (cdf - cdf[0]) / max(cdf[-1] - cdf[0], 1e-9)
    # tile-centre coordinates of each pixel; bilinear weights between neighbouring tiles
    cy = (np.arange(h) + 0.5) / (h / ty) - 0.5
    cx = (np.arange(w) + 0.5) / (w / tx) - 0.5
    y0 = np.clip(np.floor(cy).astype(int), 0, ty - 1)
    x0 = np.clip(np.floor(cx).astype(int), 0, tx - 1)
    y1, x1 = np.minimum(y0 + 1, ty - 1), np.minimum(x0 + 1, tx - 1)
    wy = np.clip(cy - y0, 0, 1)[:, None]
    wx = np.clip(cx - x0, 0, 1)[None, :]
    v = y.astype(np.intp)
    Y0, X0, Y1, X1 = y0[:, None], x0[None, :], y1[:, None], x1[None, :]
    top = luts[Y0, X0, v] * (1 - wx) + luts[Y0, X1, v] * wx
    bottom = luts[Y1, X0, v] * (1 - wx) + luts[Y1, X1, v] * wx
    eq = top * (1 - wy) + bottom * wy
    if c == 3:
        scale = (eq + 1) / (y.astype(np.float64) + 1)
        out = (a.astype(np.float64) * scale[None]).round().clip(0, 255).astype(np.uint8)
    else:
        out = eq.round().clip(0, 255).astype(np.uint8)[None]
    return torch.from_numpy(out) if was_tensor else out


def equalize(x: torch.Tensor, tiles: int = 8, clip: float = 3.0) -> torch.Tensor:
    """:func:`equalize_u8` of float images (N, C, H, W) or (C, H, W) in [0, 1] (read as the
    uint8 values they were decoded from, so the same file gives the same pixels in memory and
    streamed)."""
    single = x.dim() == 3
    b = x[None] if single else x
    u8 = (b.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    out = torch.stack([equalize_u8(im, tiles, clip) for im in u8]).to(x.dtype).div_(255)
    out = out.to(x.device)
    return out[0] if single else out


def preprocess(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """The run's preprocessing ``name`` (:data:`PREPROCESSING`; None / ``"none"``: unchanged)
    of float images (N, C, H, W) in [0, 1].

    Example:
        >>> x = torch.rand(2, 1, 16, 16)
        >>> preprocess(x, "none") is x, preprocess(x, "clahe").shape
        (True, torch.Size([2, 1, 16, 16]))
    """
    if name in (None, "none"):
        return x
    if name not in PREPROCESSING:
        raise InputError(f"unknown preprocessing {name!r}; choose one of {list(PREPROCESSING)}")
    return equalize(x)
