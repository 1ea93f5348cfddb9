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

from .errors import InputError
from .validation import check_distance, check_embedding_pair

__all__ = [
    "DISTANCES",
    "block_scores",
    "distance_matrix",
    "iter_score_blocks",
    "normalize_rows",
    "rowwise_distance",
    "cosine_distance",
    "euclidean_distance",
    "paired_distance",
    "pairwise_distance",
    "sqeuclidean_distance",
]

# pairs recomputed directly per chunk (bounds the memory of the exact recomputation)
_RECOMPUTE_CHUNK = 1 << 16


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


class _GemmDistance(torch.autograd.Function):
    """Euclidean (``squared=False``) or squared euclidean distances with GEMM gradients."""

    @staticmethod
    def forward(ctx, x, y, squared: bool):  # noqa: D102
        out = _sq_forward(x, y)
        if not squared:
            out.sqrt_()
        ctx.save_for_backward(x, y, out)
        ctx.same, ctx.squared = y is None, squared
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, y, out = ctx.saved_tensors
        if ctx.squared:  # clamped entries (GEMM rounding below 0) have zero gradient
            w = grad.masked_fill(out <= 0, 0.0)
        else:  # d ||x-y|| = d ||x-y||^2 / (2 ||x-y||); defined as 0 at d = 0 (subgradient 0)
            w = grad.div(out).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(0.5)
        gx, gy = _sq_input_grads(w, x, None if ctx.same else y)
        return gx, gy, None


def sqeuclidean_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Squared euclidean distances ``||x_i - y_j||^2`` (B, R), exact 0 for identical rows."""
    check_embedding_pair(x, y)
    return _GemmDistance.apply(x, y, True)


def euclidean_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distances ``||x_i - y_j||_2`` (B, R); exactly 0 with gradient 0 at d = 0."""
    check_embedding_pair(x, y)
    return _GemmDistance.apply(x, y, False)


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt with value 0 and gradient 0 where the argument is 0 (no Inf/NaN)."""
    zero = sq <= 0
    safe = torch.where(zero, torch.ones_like(sq), sq)
    return torch.where(zero, torch.zeros_like(sq), safe.sqrt())


def cosine_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine distances ``1 - cos(x_i, y_j)`` in [0, 2] (B, R); the diagonal of d(x, x) is 0."""
    check_embedding_pair(x, y)
    same = y is None
    xh = normalize_rows(x)
    yh = xh if same else normalize_rows(y)
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
    return check_distance(distance, sorted(DISTANCES))


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
        return (1.0 - (normalize_rows(x) * normalize_rows(y)).sum(dim=1)).clamp(0.0, 2.0)
    diff = x - y
    sq = (diff * diff).sum(dim=1)
    return sq if distance == "sqeuclidean" else _safe_sqrt(sq)


# ------------------------------------------------------------------ evaluation side (no grad)
# One blocked, no-grad distance used wherever embeddings are compared after training: the
# retrieval and few-shot metrics, verification pair distances, the index's exact search and
# tripletlab.inference. Values follow the definitions above; memory is bounded by blocks.

_BLOCK_ELEMS = 1 << 24  # query rows x references per block
_PAIR_BLOCK_ELEMS = 1 << 22  # pairs x dimensions per block


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; a zero row stays zero. The one normalisation floor of the
    library is the dtype's smallest normal number (``torch.finfo(dtype).tiny``).

    Example:
        >>> normalize_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


@torch.no_grad()
def block_scores(
    q: torch.Tensor, ref: torch.Tensor, distance: str, ref_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Non-negative scores (Q, R) ordered like the distances, without the final square root:
    squared euclidean for ``euclidean``/``sqeuclidean`` (one ``addmm``), ``1 - <q, r>`` for
    ``cosine`` (rows must already be L2-normalised, see :func:`normalize_rows`).
    ``ref_sq``: the precomputed squared norms of ``ref`` rows (reused across blocks)."""
    if distance == "cosine":
        return torch.mm(q, ref.t()).neg_().add_(1.0).clamp_min_(0.0)
    ref_sq = (ref * ref).sum(1) if ref_sq is None else ref_sq
    sc = torch.addmm(ref_sq[None, :], q, ref.t(), alpha=-2.0)
    return sc.add_((q * q).sum(1, keepdim=True)).clamp_min_(0.0)


def scores_to_distances(scores: torch.Tensor, distance: str) -> torch.Tensor:
    """Distances from :func:`block_scores` values (square root for ``euclidean``)."""
    return scores.sqrt() if distance == "euclidean" else scores


@torch.no_grad()
def iter_score_blocks(q: torch.Tensor, ref: torch.Tensor, distance: str, block_elems: int = 0):
    """Yield ``(start, stop, scores)`` for consecutive query blocks of at most ``block_elems``
    scores each (memory bounded for any number of queries). Rows must be normalised for
    cosine, as in :func:`block_scores`."""
    nq, nr = q.shape[0], ref.shape[0]
    ref_sq = None if distance == "cosine" else (ref * ref).sum(1)
    block = max(1, min(nq, (block_elems or _BLOCK_ELEMS) // max(nr, 1)))
    for s in range(0, nq, block):
        e = min(nq, s + block)
        yield s, e, block_scores(q[s:e], ref, distance, ref_sq)


@torch.no_grad()
def distance_matrix(q: torch.Tensor, ref: torch.Tensor, distance: str) -> torch.Tensor:
    """The (Q, R) distance matrix without autograd, computed in blocks.

    Example:
        >>> distance_matrix(torch.tensor([[0.0, 3.0]]), torch.tensor([[4.0, 0.0]]), "euclidean")
        tensor([[5.]])
    """
    check_distance_name(distance)
    if distance == "cosine":
        q, ref = normalize_rows(q), normalize_rows(ref)
    out = torch.empty(q.shape[0], ref.shape[0], dtype=q.dtype)
    for s, e, sc in iter_score_blocks(q, ref, distance):
        out[s:e] = scores_to_distances(sc, distance)
    return out


@torch.no_grad()
def rowwise_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Distances ``d(a_i, b_i)`` of the row pairs (N,) without autograd, in blocks (bounded
    memory for millions of pairs); identical rows have euclidean distance exactly 0.

    Example:
        >>> a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> rowwise_distance(a, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), "cosine")
        tensor([1., 0.])
    """
    out = torch.empty(a.shape[0], dtype=a.dtype)
    step = max(1, _PAIR_BLOCK_ELEMS // max(a.shape[1] if a.dim() == 2 else 1, 1))
    for s in range(0, a.shape[0], step):
        out[s : s + step] = paired_distance(a[s : s + step], b[s : s + step], distance)
    return out
