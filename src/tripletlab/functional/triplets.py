"""Triplet losses on explicit triplets: index tuples on a distance matrix, or (N, D) tensors."""

from __future__ import annotations

from typing import NamedTuple

import torch

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

    def __call__(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``d(embeddings[rows], ref[cols])`` (N,)."""
        ref = self.embeddings if self.ref is None else self.ref
        return paired_distance(self.embeddings[rows], ref[cols], self.distance)


def loss_on_indices(
    dist: torch.Tensor,
    indices: IndexTuple,
    margin: float,
    soft_margin: bool,
    reduction: str,
    paired: PairedDistances | None = None,
) -> tuple[torch.Tensor, TripletStats]:
    """:func:`triplet_loss_on_indices` on checked (long, in-range) indices. With ``paired`` the
    distances of the triplets are recomputed from the embeddings (``dist`` may then be a
    no-grad matrix: it only served the mining)."""
    a, p, n = indices
    if paired is None:
        d_ap, d_an = dist[a, p], dist[a, n]
    else:  # one paired computation for both (fewer small kernels per call)
        both = paired(a.repeat(2), torch.cat([p, n]))
        d_ap, d_an = both[: a.numel()], both[a.numel() :]
    losses = triplet_terms(d_ap, d_an, margin, soft_margin)
    stats = TripletStats(
        n_triplets=a.numel(),
        n_active=(losses > 0).sum(),
        sum_d_ap=d_ap.detach().sum(),
        sum_d_an=d_an.detach().sum(),
        n_anchors=int(torch.unique(a).numel()),
    )
    return reduce_triplet_losses(losses, reduction), stats


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
