"""Any image to the detector's input: an RGB float tensor (3, H, W) with values in [0, 255].

Accepted: a PIL image of any mode (grey ``L``/``1``, ``LA``, palette ``P`` (with transparency),
``RGBA`` (composited on white), ``CMYK``, ``YCbCr``, 16-bit / 32-bit grey ``I;16``/``I``/``F``
(min-max scaled), the first frame of an animated GIF), a numpy array (H, W), (H, W, 1), (H, W, 3)
or (H, W, 4) (uint8 in [0, 255]; floats in [0, 1]), a torch tensor (C, H, W) with C in 1, 3, 4
(uint8 in [0, 255]; floats in [0, 1], the torch convention), or a path to an image file.

Example:
    >>> import numpy as np
    >>> tuple(to_rgb_tensor(np.zeros((4, 5), np.uint8)).shape)
    (3, 4, 5)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import FileFormatError, InputError, InputTypeError, MissingFileError

__all__ = ["load_image", "to_rgb_tensor"]


def load_image(path: str | os.PathLike[str]):
    """A PIL image of ``path`` in RGB (first frame of an animation; transparency on white; turned
    upright by its EXIF orientation, as a phone photo is displayed, so boxes and landmarks refer
    to the upright image), or a :class:`FileFormatError` naming the file.

    Example:
        >>> load_image("photo.jpg").mode  # doctest: +SKIP
        'RGB'
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            im.seek(0)
            return _pil_to_rgb(ImageOps.exif_transpose(im) or im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise FileFormatError(f"cannot read image {p}: {e}") from None


def _pil_to_rgb(im):
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.round().astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    return im.convert("RGB") if im.mode != "RGB" else im.copy()


def to_rgb_tensor(image) -> torch.Tensor:
    """``image`` (see the module) as a float32 RGB tensor (3, H, W) in [0, 255].

    Example:
        >>> import torch
        >>> to_rgb_tensor(torch.ones(1, 2, 2)).tolist()[0]
        [[255.0, 255.0], [255.0, 255.0]]
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image
        a = np.asarray(_pil_to_rgb(image), dtype=np.uint8)
        return torch.from_numpy(a.copy()).permute(2, 0, 1).float()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise InputError(f"an image array is (H, W) or (H, W, C), got {image.shape}")
        a = np.ascontiguousarray(image)
        t = torch.from_numpy(a if a.flags.writeable else a.copy()).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3:
            raise InputError(f"an image tensor is (C, H, W), got {tuple(t.shape)}")
    else:
        raise InputTypeError(
            f"expected a PIL image, numpy array, torch tensor or path, got {type(image).__name__}"
        )
    if t.shape[0] not in (1, 3, 4):
        raise InputError(f"an image has 1, 3 or 4 channels, got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        x = t.float()
    elif t.is_floating_point():
        x = t.float() * 255.0
        if not torch.isfinite(x).all():
            raise InputError("the image holds NaN or Inf values")
        x = x.clamp(0, 255)
    else:
        raise InputTypeError(f"image dtype must be uint8 or floating point, got {t.dtype}")
    if x.shape[0] == 4:  # RGBA: on white
        alpha = x[3:4] / 255.0
        x = x[:3] * alpha + 255.0 * (1 - alpha)
    elif x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.contiguous()
