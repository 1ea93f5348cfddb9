"""Triplet losses on explicit triplets: index tuples on a distance matrix, or (N, D) tensors."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..distances import paired_distance
from ..errors import InputError
from .checks import check_embeddings, check_indices, check_options
from .mining import IndexTuple
from .reductions import reduce_triplet_losses, triplet_terms
from .stats import TripletStats


class PairedDistances(NamedTuple):
    """The embeddings a loss reads its d(a, p) and d(a, n) from, instead of a distance matrix.

    ``ref`` is None when the batch is its own reference set. The distances are computed directly
    from the row differences (:func:`~tripletlab.distances.paired_distance`), so the backward
    costs O(T * D) for T triplets instead of a dense (B, R) gradient through the whole matrix.
    """

    embeddings: torch.Tensor
    ref: torch.Tensor | None
    distance: str

    def terms(
        self, indices: IndexTuple, margin: float, soft_margin: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-triplet losses and d(a, p), d(a, n) (detached) of the triplets ``indices``."""
        a, p, n = indices
        if self.distance in ("euclidean", "sqeuclidean"):
            losses, d = _IndexedTripletTerms.apply(
                self.embeddings,
                self.ref,
                a,
                torch.cat([p, n]),
                None if soft_margin else margin,
                self.distance == "sqeuclidean",
            )
            return losses, d[0], d[1]
        ref = self.embeddings if self.ref is None else self.ref
        ea = self.embeddings.index_select(0, a)
        d_ap = paired_distance(ea, ref.index_select(0, p), self.distance)
        d_an = paired_distance(ea, ref.index_select(0, n), self.distance)
        return triplet_terms(d_ap, d_an, margin, soft_margin), d_ap.detach(), d_an.detach()


class _IndexedTripletTerms(torch.autograd.Function):
    """Triplet terms ``l(d(x_a, y_p), d(x_a, y_n))`` straight from the embeddings, with a
    hand-written backward: one autograd node and two ``index_add_`` instead of a dozen small
    nodes (gathers, differences, square root, hinge), which is most of the per-call cost at
    small B. Euclidean (or squared) distances from the row differences, as
    :func:`~tripletlab.distances.paired_distance` (no eps: identical rows give distance 0 and
    gradient 0); the hinge ``max(0, d_ap - d_an + margin)`` (``margin=None``: the soft margin
    ``softplus(d_ap - d_an)``) with torch's own ``relu``/``softplus`` derivatives.
    Returns the losses (T,) and the distances (2, T) (not differentiable: for the stats)."""

    @staticmethod
    def forward(ctx, x, y, a, pn, margin, squared: bool):  # noqa: D102
        yy = x if y is None else y
        t = a.shape[0]
        diff = x.index_select(0, a)[None] - yy.index_select(0, pn).view(2, t, x.shape[1])
        d = (diff * diff).sum(dim=2)  # (2, T): d_ap, d_an
        if not squared:
            d = d.sqrt_()
        z = d[0] - d[1]
        losses = torch.relu(z + margin) if margin is not None else F.softplus(z)
        ctx.save_for_backward(diff, d, z, losses, a, pn)
        ctx.margin, ctx.squared, ctx.same = margin, squared, y is None
        ctx.shapes = (x.shape, yy.shape)
        ctx.mark_non_differentiable(d)
        return losses, d

    @staticmethod
    def backward(ctx, grad, _grad_d):  # noqa: D102
        diff, d, z, losses, a, pn = ctx.saved_tensors
        if ctx.margin is None:
            gz = torch.ops.aten.softplus_backward(grad, z, 1.0, 20.0)
        else:  # relu's derivative: 1 where the output is > 0
            gz = torch.where(losses > 0, grad, 0.0)
        coef = torch.stack([gz, -gz])  # d l / d d_ap, d l / d d_an
        if ctx.squared:
            coef = coef.mul_(2.0)
        else:  # d ||v|| / dv = v / ||v||, defined as 0 at v = 0
            coef = torch.where(d > 0, coef / d, 0.0)
        g_pair = diff * coef[:, :, None]  # (2, T, D): d l / d (x_a - y_c)
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = g_pair.new_zeros(ctx.shapes[0]).index_add_(0, a, g_pair.sum(dim=0))
            if ctx.same:
                gx.index_add_(0, pn, g_pair.view(-1, diff.shape[2]), alpha=-1)
        if not ctx.same and ctx.needs_input_grad[1]:
            gy = g_pair.new_zeros(ctx.shapes[1])
            gy.index_add_(0, pn, g_pair.view(-1, diff.shape[2]), alpha=-1)
        return gx, gy, None, None, None, None


def loss_on_indices(
    dist: torch.Tensor,
    indices: IndexTuple,
    margin: float,
    soft_margin: bool,
    reduction: str,
    paired: PairedDistances | None = None,
    anchors_sorted: bool = False,
) -> tuple[torch.Tensor, TripletStats]:
    """:func:`triplet_loss_on_indices` on checked (long, in-range) indices. With ``paired`` the
    distances of the triplets are recomputed from the embeddings (``dist`` may then be a
    no-grad matrix: it only served the mining). ``anchors_sorted``: the anchors come in
    ascending order (as every miner returns them), so they are counted without a sort."""
    a, p, n = indices
    if paired is None:
        d_ap, d_an = dist[a, p], dist[a, n]
        losses = triplet_terms(d_ap, d_an, margin, soft_margin)
        d_ap, d_an = d_ap.detach(), d_an.detach()
    else:
        losses, d_ap, d_an = paired.terms(indices, margin, soft_margin)
    unique = torch.unique_consecutive if anchors_sorted else torch.unique
    n_active = (losses > 0).sum()
    stats = TripletStats(
        n_triplets=a.numel(),
        n_active=n_active,
        sum_d_ap=d_ap.sum(),
        sum_d_an=d_an.sum(),
        n_anchors=unique(a).numel(),
    )
    return reduce_triplet_losses(losses, reduction, n_active), stats


def triplet_loss_on_indices(
    dist: torch.Tensor,
    indices_tuple: IndexTuple,
    *,
    margin: float = 0.2,
    soft_margin: bool = False,
    reduction: str = "mean",
) -> tuple[torch.Tensor, TripletStats]:
    """Loss of the given triplets, reading d(a, p) and d(a, n) from a (B, R) distance matrix.

    ``L = reduce(max(0, dist[a, p] - dist[a, n] + margin))`` (or ``softplus(dist[a, p] -
    dist[a, n])``) over the triplets ``(a, p, n)`` of ``indices_tuple``; ``a`` indexes the rows,
    ``p`` and ``n`` the columns (pytorch-metric-learning's convention).

    Example:
        >>> import torch
        >>> from tripletlab.functional import triplet_loss_on_indices
        >>> dist = torch.tensor([[0.0, 0.5, 0.6], [0.5, 0.0, 1.0], [0.6, 1.0, 0.0]])
        >>> idx = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 2]))
        >>> loss, stats = triplet_loss_on_indices(dist, idx, margin=0.2)
        >>> round(loss.item(), 4)  # (0.5 - 0.6 + 0.2 + max(0, 0.5 - 1.0 + 0.2)) / 2
        0.05
    """
    check_options(None, margin, soft_margin, reduction)
    indices = check_indices(indices_tuple, dist.shape[0], dist.shape[1])
    return loss_on_indices(dist, indices, margin, soft_margin, reduction)


def triplet_margin_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    margin: float = 0.2,
    distance: str = "euclidean",
    soft_margin: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Triplet loss on explicit (N, D) anchor, positive and negative tensors.

    ``l_i = max(0, d(a_i, p_i) - d(a_i, n_i) + margin)`` (or ``softplus(d_ap - d_an)``), reduced.
    What ``torch.nn.TripletMarginLoss`` computes, with tripletlab's distances and without its
    ``eps`` added to the difference (identical rows are at distance exactly 0). The loss of
    Schroff et al. 2015 (FaceNet) on triplets chosen beforehand.

    Example:
        >>> import torch
        >>> from tripletlab.functional import triplet_margin_loss
        >>> a = torch.tensor([[0.0, 0.0]])
        >>> p, n = torch.tensor([[0.3, 0.4]]), torch.tensor([[0.6, 0]])
        >>> round(triplet_margin_loss(a, p, n, margin=0.2).item(), 4)  # 0.5 - 0.6 + 0.2
        0.1
    """
    check_options(None, margin, soft_margin, reduction)
    for name, t in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        check_embeddings(t, name)
    if not (anchor.shape == positive.shape == negative.shape):
        raise InputError(
            f"anchor, positive and negative must have equal shapes, got {tuple(anchor.shape)}, "
            f"{tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    d_ap = paired_distance(anchor, positive, distance)  # checks the distance name
    d_an = paired_distance(anchor, negative, distance)
    return reduce_triplet_losses(triplet_terms(d_ap, d_an, margin, soft_margin), reduction)
