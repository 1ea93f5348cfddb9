"""One call from a photo to aligned face crops: :func:`detect_and_align`.

Detection (:class:`~.detect.MTCNN`) then, per face, the least-squares similarity of its 5
landmarks onto a template (:mod:`.align`, Umeyama 1991), warped with ``grid_sample``. Each crop
is read from the full-resolution image, but only from the region the crop covers (downscaled
when that region is much larger than the crop), so a huge photo never becomes one huge tensor.

Example:
    >>> faces = detect_and_align("photo.jpg", template="arcface", size=112)  # doctest: +SKIP
    >>> crop, box, score, landmarks = faces[0]  # doctest: +SKIP
    >>> crop.shape, crop.dtype  # doctest: +SKIP
    (torch.Size([3, 112, 112]), torch.uint8)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .align import apply_transform, similarity_transform, template_points, warp_affine
from .detect import MTCNN, Detections, detect_faces
from .image import load_image, to_rgb_tensor

__all__ = ["AlignedFace", "align_detections", "detect_and_align"]


class AlignedFace(NamedTuple):
    """One face: ``crop`` uint8 (3, size, size) RGB, ``box`` (4,) ``(x1, y1, x2, y2)``,
    ``score`` (O-Net probability), ``landmarks`` (5, 2), in the input image's coordinates."""

    crop: torch.Tensor
    box: torch.Tensor
    score: float
    landmarks: torch.Tensor


def _is_pil(image) -> bool:
    return hasattr(image, "mode") and hasattr(image, "convert")


def _region(image, x0: int, y0: int, x1: int, y1: int, max_side: int):
    """Pixels ``[x0, x1) x [y0, y1)`` of ``image`` (PIL or a (3, H, W) float tensor) as a float
    (3, h, w) tensor, downscaled so its longer side is at most ``max_side``; and that scale."""
    w, h = x1 - x0, y1 - y0
    r = min(1.0, max_side / max(w, h))
    if _is_pil(image):
        from PIL import Image

        part = image.crop((x0, y0, x1, y1))
        if r < 1.0:
            size = (max(1, round(w * r)), max(1, round(h * r)))
            part = part.resize(size, Image.BILINEAR, reducing_gap=2.0)
        t = to_rgb_tensor(part)
    else:
        t = image[:, y0:y1, x0:x1].float()
        if r < 1.0:
            size = (max(1, round(h * r)), max(1, round(w * r)))
            t = torch.nn.functional.interpolate(t[None], size=size, mode="area")[0]
    return t, (t.shape[-1] / w, t.shape[-2] / h)


def align_detections(
    image, det: Detections, template: str = "arcface", size: int = 112, faces: str = "all"
) -> list[AlignedFace]:
    """Aligned crops of the detections ``det`` of ``image`` (PIL image or a (3, H, W) RGB
    tensor with values in [0, 255], e.g. uint8); ``faces``: ``"all"`` (by
    decreasing score) or ``"largest"`` (the largest box only)."""
    ref = template_points(template, size)
    order = list(range(len(det)))
    if faces == "largest":
        order = [det.largest()] if len(det) else []
    W, H = (image.width, image.height) if _is_pil(image) else (image.shape[-1], image.shape[-2])
    out = []
    for i in order:
        pts = det.landmarks[i]
        M = similarity_transform(pts, ref)  # image -> crop
        A = torch.cat([M.double(), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
        inv = torch.linalg.inv(A)[:2].float()
        corners = torch.tensor([[0.0, 0.0], [size, 0.0], [0.0, size], [size, size]])
        src = apply_transform(inv, corners)
        x0 = max(0, math.floor(float(src[:, 0].min())) - 2)
        y0 = max(0, math.floor(float(src[:, 1].min())) - 2)
        x1 = min(W, math.ceil(float(src[:, 0].max())) + 2)
        y1 = min(H, math.ceil(float(src[:, 1].max())) + 2)
        if x1 <= x0 or y1 <= y0:  # the crop lies outside the image (should not happen)
            crop = torch.zeros(3, size, size)
        else:
            part, (sx, sy) = _region(image, x0, y0, x1, y1, max_side=4 * size)
            # crop coords from region coords: M applied to (p / s + offset)
            S = torch.tensor([[1 / sx, 0.0, x0], [0.0, 1 / sy, y0], [0.0, 0.0, 1.0]])
            Mr = (A.float() @ S)[:2]
            crop = warp_affine(part, Mr, (size, size))
        crop_u8 = crop.round().clamp(0, 255).to(torch.uint8)
        out.append(AlignedFace(crop_u8, det.boxes[i], float(det.scores[i]), pts))
    return out


def detect_and_align(
    image,
    template: str = "arcface",
    size: int = 112,
    faces: str = "all",
    detector: MTCNN | None = None,
) -> list[AlignedFace]:
    """Detect the faces of ``image`` (PIL image, array, tensor or path) and align each onto
    ``template`` (``"arcface"`` or ``"head"``) in a ``size`` x ``size`` crop: a list of
    ``(crop, box, score, landmarks)`` (:class:`AlignedFace`); empty when there is no face.
    ``faces``: ``"all"`` or ``"largest"``; ``detector``: an :class:`MTCNN` with other options.

    Example:
        >>> import torch
        >>> detect_and_align(torch.zeros(3, 1, 1))  # doctest: +SKIP
        []
    """
    if isinstance(image, str) or hasattr(image, "__fspath__"):
        image = load_image(image)
    if not _is_pil(image):  # uint8 (3, H, W): a quarter of the memory, read as such by detect
        image = to_rgb_tensor(image).round().to(torch.uint8)
    det = detector.detect(image) if detector is not None else detect_faces(image)
    return align_detections(image, det, template=template, size=size, faces=faces)
