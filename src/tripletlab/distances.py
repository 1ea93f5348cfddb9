"""Pairwise distance matrices that are exact where it matters and safe at d = 0.

All functions take ``x`` of shape (B, D) and optionally ``y`` of shape (R, D) and return the
(B, R) matrix ``dist[i, j] = d(x_i, y_j)``; with ``y=None`` the reference set is ``x`` itself and
the diagonal is exactly 0.

* ``euclidean``   d(x, y) = ||x - y||_2
* ``sqeuclidean`` d(x, y) = ||x - y||_2^2
* ``cosine``      d(x, y) = 1 - <x, y> / (||x|| ||y||)   (a zero vector has cosine distance 1)

The squared distance is computed with one GEMM (``||x||^2 + ||y||^2 - 2 x.y``), which is fast but
loses precision for nearly identical rows (catastrophic cancellation). Pairs whose GEMM value is
below a small relative tolerance are therefore recomputed directly as ``sum((x_i - y_j)^2)``, so two
identical rows get a distance of exactly 0 and near-duplicates get an accurate one. The square root
is taken only where the squared distance is positive, so the gradient of ``euclidean`` at d = 0 is
0 instead of the NaN/Inf a naive ``sqrt`` gives.

Example:
    >>> import torch
    >>> from tripletlab.distances import pairwise_distance
    >>> x = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    >>> pairwise_distance(x, distance="euclidean")[0, 1].item()
    0.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import InputError, InputTypeError

__all__ = [
    "DISTANCES",
    "cosine_distance",
    "euclidean_distance",
    "paired_distance",
    "pairwise_distance",
    "sqeuclidean_distance",
]

# pairs recomputed directly per chunk (bounds the memory of the exact recomputation)
_RECOMPUTE_CHUNK = 1 << 16


def _check_pair(x: torch.Tensor, y: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"embeddings must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise InputError(f"embeddings must be 2-D (B, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputTypeError(f"embeddings must be a floating-point tensor, got dtype {x.dtype}")
    if y is not None:
        if not isinstance(y, torch.Tensor):
            raise InputTypeError(f"reference embeddings must be a torch.Tensor, got {type(y)}")
        if y.dim() != 2:
            raise InputError(f"reference embeddings must be 2-D (R, D), got {tuple(y.shape)}")
        if y.shape[1] != x.shape[1]:
            raise InputError(
                f"embedding dimensions differ: embeddings have D={x.shape[1]}, "
                f"reference embeddings have D={y.shape[1]}"
            )
        if y.dtype != x.dtype:
            raise InputTypeError(f"dtype mismatch: embeddings {x.dtype}, reference {y.dtype}")


def _recompute_tolerance(dtype: torch.dtype) -> float:
    # GEMM-based squared distances carry an absolute error of roughly eps * (|x|^2 + |y|^2);
    # below 8 * sqrt(eps) of that scale the relative error of the result becomes large.
    return 8.0 * torch.finfo(dtype).eps ** 0.5


def _sq_forward(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Squared distances without autograd: one GEMM, in-place clamp, exact near-zero pairs."""
    same = y is None
    yy = x if same else y
    xn = (x * x).sum(dim=1)
    yn = xn if same else (yy * yy).sum(dim=1)
    # ||x||^2 + ||y||^2 - 2 x.y in one fused GEMM
    sq = torch.addmm(yn[None, :], x, yy.t(), beta=1.0, alpha=-2.0)
    sq.add_(xn[:, None]).clamp_min_(0.0)
    if sq.numel() == 0:
        return sq
    tol = _recompute_tolerance(x.dtype)
    # pairs small relative to the norms involved lose precision in the GEMM: recompute them
    scale = (xn + yn.max()).mul_(tol)
    near = sq <= scale[:, None]
    if same:
        near.fill_diagonal_(False)
        sq.fill_diagonal_(0.0)
    idx = near.nonzero()
    del near
    for start in range(0, idx.shape[0], _RECOMPUTE_CHUNK):
        i, j = idx[start : start + _RECOMPUTE_CHUNK].unbind(1)
        diff = x[i] - yy[j]
        sq[i, j] = (diff * diff).sum(dim=1)
    return sq


def _sq_input_grads(
    w: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of sum(w * ||x_i - y_j||^2) w.r.t. x and y (two GEMMs)."""
    # a column of ones appended to the GEMM operand yields the row/column sums of w for free
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    if y is None:  # x appears on both sides: rows and columns of w both contribute
        x1 = torch.cat([x, ones], dim=1)
        both = (w @ x1).add_(w.t() @ x1)
        return 2.0 * (both[:, -1:] * x - both[:, :-1]), None
    y1 = torch.cat([y, torch.ones(y.shape[0], 1, dtype=y.dtype, device=y.device)], dim=1)
    x1 = torch.cat([x, ones], dim=1)
    wy = w @ y1
    wx = w.t() @ x1
    gx = 2.0 * (wy[:, -1:] * x - wy[:, :-1])
    gy = 2.0 * (wx[:, -1:] * y - wx[:, :-1])
    return gx, gy


class _SqEuclidean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):  # noqa: D102
        sq = _sq_forward(x, y)
        ctx.save_for_backward(x, y, sq)
        ctx.same = y is None
        return sq

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, y, sq = ctx.saved_tensors
        # clamped entries (GEMM rounding below 0) have zero gradient, like clamp_min
        w = grad.masked_fill(sq <= 0, 0.0)
        gx, gy = _sq_input_grads(w, x, None if ctx.same else y)
        return gx, gy


class _Euclidean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):  # noqa: D102
        d = _sq_forward(x, y).sqrt_()
        ctx.save_for_backward(x, y, d)
        ctx.same = y is None
        return d

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, y, d = ctx.saved_tensors
        # d ||x-y|| = d ||x-y||^2 / (2 ||x-y||); defined as 0 at d = 0 (subgradient 0)
        w = grad.div(d).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(0.5)
        gx, gy = _sq_input_grads(w, x, None if ctx.same else y)
        return gx, gy


def sqeuclidean_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Squared euclidean distances ``||x_i - y_j||^2`` (B, R), exact 0 for identical rows."""
    _check_pair(x, y)
    return _SqEuclidean.apply(x, y)


def euclidean_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distances ``||x_i - y_j||_2`` (B, R); exactly 0 with gradient 0 at d = 0."""
    _check_pair(x, y)
    return _Euclidean.apply(x, y)


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt with value 0 and gradient 0 where the argument is 0 (no Inf/NaN)."""
    zero = sq <= 0
    safe = torch.where(zero, torch.ones_like(sq), sq)
    return torch.where(zero, torch.zeros_like(sq), safe.sqrt())


def cosine_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine distances ``1 - cos(x_i, y_j)`` in [0, 2] (B, R); the diagonal of d(x, x) is 0."""
    _check_pair(x, y)
    same = y is None
    eps = torch.finfo(x.dtype).tiny
    xh = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    yh = xh if same else y / y.norm(dim=1, keepdim=True).clamp_min(eps)
    dist = (1.0 - xh @ yh.t()).clamp(0.0, 2.0)
    if same:
        dist.fill_diagonal_(0.0)
    return dist


DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "euclidean": euclidean_distance,
    "sqeuclidean": sqeuclidean_distance,
    "cosine": cosine_distance,
}


def check_distance_name(distance: str) -> str:
    """Return ``distance`` if it is a known distance name, else raise :class:`InputError`."""
    if distance not in DISTANCES:
        raise InputError(f"unknown distance {distance!r}; choose one of {sorted(DISTANCES)}")
    return distance


def pairwise_distance(
    x: torch.Tensor, y: torch.Tensor | None = None, distance: str = "euclidean"
) -> torch.Tensor:
    """Distance matrix (B, R) between the rows of ``x`` and ``y`` (``y=None``: ``x`` itself)."""
    return DISTANCES[check_distance_name(distance)](x, y)


def paired_distance(x: torch.Tensor, y: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """Row-wise distances ``d(x_i, y_i)`` (N,) computed directly from the differences.

    Unlike ``torch.nn.functional.pairwise_distance`` no ``eps`` is added to the difference, so
    identical rows have distance exactly 0 (and gradient 0).
    """
    check_distance_name(distance)
    if x.shape != y.shape or x.dim() != 2:
        raise InputError(
            f"paired inputs must both be (N, D) with equal shapes, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if distance == "cosine":
        eps = torch.finfo(x.dtype).tiny
        xh = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
        yh = y / y.norm(dim=1, keepdim=True).clamp_min(eps)
        return (1.0 - (xh * yh).sum(dim=1)).clamp(0.0, 2.0)
    diff = x - y
    sq = (diff * diff).sum(dim=1)
    return sq if distance == "sqeuclidean" else _safe_sqrt(sq)
