"""Face alignment: a least-squares similarity transform of the 5 landmarks onto a template,
then a ``grid_sample`` warp.

Umeyama (1991), "Least-squares estimation of transformation parameters between two point
patterns", IEEE TPAMI 13(4). For points ``x_i`` (source) and ``y_i`` (template), ``n`` of them,
the scale ``c``, rotation ``R`` and translation ``t`` minimising ``sum_i |y_i - (c R x_i + t)|^2``
are, with the means ``mu_x, mu_y``, ``sigma_x^2 = mean |x_i - mu_x|^2`` and the covariance
``S = mean (y_i - mu_y)(x_i - mu_x)^T = U D V^T`` (SVD):

    R = U E V^T,  E = diag(1, det(U) det(V)),  c = tr(D E) / sigma_x^2,  t = mu_y - c R mu_x.

Templates (in a ``size`` x ``size`` crop, continuous coordinates: the crop spans ``[0, size]``):

* ``"arcface"``: the 112x112 five-point template of ArcFace / InsightFace (Deng et al. 2019),
  scaled to ``size`` (tight: eyes to mouth, as face-recognition models expect);
* ``"head"``: the same points shrunk by 0.6 about ``(0.5, 0.58) * size``: the whole head with
  hair and chin and some margin (for models trained on loose crops such as AT&T's).

Example:
    >>> import torch
    >>> src = torch.tensor([[0., 0], [1, 0], [0, 1]])
    >>> M = similarity_transform(src, 2 * src + 3)
    >>> [[round(float(v), 6) + 0.0 for v in row] for row in M]
    [[2.0, 0.0, 3.0], [0.0, 2.0, 3.0]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = [
    "ARCFACE_112",
    "TEMPLATES",
    "align_face",
    "apply_transform",
    "similarity_transform",
    "template_points",
    "warp_affine",
]

#: ArcFace's 112x112 template (insightface, pixel-centre-at-integer coordinates as in OpenCV):
#: left eye, right eye, nose tip, left and right mouth corner
ARCFACE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)
TEMPLATES = ("arcface", "head")
_HEAD_SHRINK = 0.6
_HEAD_CENTRE = (0.5, 0.58)


def template_points(template: str = "arcface", size: int = 112) -> torch.Tensor:
    """The template's 5 points (5, 2) in a ``size`` x ``size`` crop (continuous coordinates).

    Example:
        >>> [round(float(v), 2) for v in template_points("arcface", 112)[0]]
        [38.79, 52.2]
    """
    if template not in TEMPLATES:
        raise InputError(f"template must be one of {TEMPLATES}, got {template!r}")
    if not isinstance(size, int) or size < 8:
        raise InputError(f"crop size must be an integer >= 8, got {size!r}")
    unit = (torch.tensor(ARCFACE_112, dtype=torch.float64) + 0.5) / 112.0
    if template == "head":
        c = torch.tensor(_HEAD_CENTRE, dtype=torch.float64)
        unit = c + _HEAD_SHRINK * (unit - c)
    return (unit * size).float()


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The (2, 3) matrix ``[c R | t]`` of the least-squares similarity ``dst ~ c R src + t``
    (Umeyama 1991; reflections excluded); ``src``, ``dst``: (n, 2) with n >= 2.

    Example:
        >>> import math, torch
        >>> a = torch.tensor([[0., 0], [2, 0], [0, 1]])
        >>> th = math.pi / 6
        >>> R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        >>> M = similarity_transform(a, 3 * a @ R.T + torch.tensor([1., 2]))
        >>> torch.allclose(M[:, :2], 3 * R, atol=1e-5), M[:, 2].round(decimals=4).tolist()
        (True, [1.0, 2.0])
    """
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise InputError(
            f"src and dst must both be (n, 2) with n >= 2, got {tuple(src.shape)} and "
            f"{tuple(dst.shape)}"
        )
    x, y = src.double(), dst.double()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise InputError("landmarks hold NaN or Inf")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    var = (xc**2).sum(1).mean()
    if var <= 1e-12:
        raise InputError("the source points coincide: no similarity transform")
    cov = yc.T @ xc / x.shape[0]
    U, D, Vt = torch.linalg.svd(cov)
    E = torch.ones(2, dtype=torch.float64)
    if torch.det(U) * torch.det(Vt) < 0:
        E[1] = -1
    R = U @ torch.diag(E) @ Vt
    c = (D * E).sum() / var
    t = my - c * R @ mx
    return torch.cat([c * R, t[:, None]], dim=1).to(
        src.dtype if src.is_floating_point() else torch.float32
    )


def apply_transform(M: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``points`` (..., 2) mapped by the (2, 3) affine matrix ``M``: ``A p + t``."""
    return points @ M[:, :2].T + M[:, 2]


def warp_affine(
    image: torch.Tensor, M: torch.Tensor, size: tuple[int, int], fill: float = 0.0
) -> torch.Tensor:
    """The (C, h, w) image whose pixel at continuous point ``q`` is ``image`` at ``M^-1 q``
    (bilinear, ``fill`` outside), like OpenCV's ``warpAffine`` but in continuous coordinates;
    ``image``: (C, H, W) float, ``M``: (2, 3) from image to output coordinates.

    Example:
        >>> import torch
        >>> img = torch.arange(16.).reshape(1, 4, 4)
        >>> I = torch.tensor([[1., 0, 0], [0, 1, 0]])
        >>> torch.allclose(warp_affine(img, I, (4, 4)), img)
        True
    """
    if image.ndim != 3:
        raise InputError(f"image must be (C, H, W), got {tuple(image.shape)}")
    h, w = size
    H, W = image.shape[-2:]
    A = torch.cat([M.double(), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
    inv = torch.linalg.inv(A)[:2]
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    q = torch.stack([gx, gy], dim=-1)  # (h, w, 2) output points
    p = q @ inv[:, :2].T + inv[:, 2]  # source points
    grid = torch.stack([2 * p[..., 0] / W - 1, 2 * p[..., 1] / H - 1], dim=-1)
    img = image.float()[None]
    if fill != 0.0:
        img = img - fill
    out = F.grid_sample(
        img, grid[None].float(), mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]
    return out + fill if fill != 0.0 else out


def align_face(
    image: torch.Tensor,
    landmarks: torch.Tensor,
    template: str = "arcface",
    size: int = 112,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(crop (C, size, size), M (2, 3))``: ``image`` (C, H, W) warped so that the 5
    ``landmarks`` (5, 2) land on :func:`template_points` by the least-squares similarity ``M``.

    Example:
        >>> import torch
        >>> img = torch.rand(3, 100, 100)
        >>> crop, M = align_face(img, template_points("arcface", 112) * 0.5 + 20)
        >>> tuple(crop.shape)
        (3, 112, 112)
    """
    if landmarks.shape != (5, 2):
        raise InputError(f"landmarks must be (5, 2), got {tuple(landmarks.shape)}")
    M = similarity_transform(landmarks.float(), template_points(template, size))
    return warp_affine(image, M, (size, size)), M
