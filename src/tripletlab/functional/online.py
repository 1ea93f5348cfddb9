"""Online mining and the whole loss: the public entry points on embeddings or a distance matrix.

Each public function checks its inputs once (:mod:`~tripletlab.functional.checks`), then calls the
unchecked internals: :func:`~tripletlab.functional.strategies.mine` (the strategy table),
:func:`~tripletlab.functional.batch_all.batch_all_loss` and
:func:`~tripletlab.functional.triplets.loss_on_indices`.
"""

from __future__ import annotations

import torch

from ..distances import check_distance_name, pairwise_distance
from .batch_all import batch_all_loss
from .checks import check_distances, check_indices, check_inputs, check_options
from .dense import dense_labels, dense_miner
from .mining import IndexTuple, MineOptions
from .slots import resolve_ref
from .stats import TripletStats, batch_facts, count_positive_pairs, pair_facts, zero_reason
from .strategies import STRATEGY_TABLE, default_reduction, mine
from .triplets import PairedDistances, loss_on_indices


def loss_from_distances(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None,
    exclude_self: bool | None,
    strategy: str,
    soft_margin: bool,
    reduction: str,
    opts: MineOptions,
    indices_tuple: IndexTuple | None,
    paired: PairedDistances | None = None,
) -> tuple[torch.Tensor, TripletStats]:
    """:func:`triplet_loss_from_distances` after its option and tensor checks: checks only the
    user's ``indices_tuple`` (None: mine with ``strategy``). The margin is ``opts.margin``.
    ``paired``: read the triplets' distances from the embeddings (``dist`` is then no-grad)."""
    margin = opts.margin
    indices = None
    if indices_tuple is not None:
        indices = check_indices(indices_tuple, dist.shape[0], dist.shape[1])
    ref_labels, exclude_self = resolve_ref(labels, ref_labels, exclude_self)
    if indices is None and strategy == "all":  # batch-all never enumerates its triplets
        return batch_all_loss(
            dist, labels, ref_labels, exclude_self, margin, soft_margin, reduction
        )
    facts = batch_facts(dist, labels, ref_labels, exclude_self)
    mined = indices is None
    dense = None
    if mined and dense_miner(strategy, *dist.shape) is not None:
        dense = dense_labels(labels, ref_labels, exclude_self)  # shared with the stats
    if mined:
        indices = mine(dist, labels, ref_labels, exclude_self, strategy, opts, dense)
    loss, stats = loss_on_indices(
        dist, indices, margin, soft_margin, reduction, paired, anchors_sorted=mined
    )
    stats.mean_distance = facts.mean_distance
    stats.batch_size, stats.n_classes = facts.batch_size, facts.n_classes
    if dense is not None:
        stats.n_positive_pairs = dense.pos.sum()
    else:
        stats.n_positive_pairs = count_positive_pairs(labels, ref_labels, exclude_self)
    if stats.n_triplets == 0:
        n_pos, has_both = pair_facts(labels, ref_labels, exclude_self)
        stats.n_positive_pairs = n_pos
        stats.reason = zero_reason(stats, n_pos, has_both) or STRATEGY_TABLE[strategy].empty_reason
    return loss, stats


def triplet_loss_from_distances(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    *,
    strategy: str = "semihard",
    margin: float = 0.2,
    soft_margin: bool = False,
    reduction: str | None = None,
    semihard_fallback: str = "easiest",
    exclude_self: bool | None = None,
    generator: torch.Generator | None = None,
    dim: int | None = None,
    indices_tuple: IndexTuple | None = None,
) -> tuple[torch.Tensor, TripletStats]:
    """Mine with ``strategy`` on a (B, R) distance matrix and return ``(loss, stats)``.

    ``L = reduce(l(a, p, n))`` over the mined triplets (or ``indices_tuple``), with
    ``l = max(0, d(a, p) - d(a, n) + margin)`` or ``softplus(d(a, p) - d(a, n))``; the strategies
    and their papers are listed in :mod:`tripletlab.functional`. ``reduction=None`` means
    ``mean_active`` for ``all`` and ``mean`` otherwise. ``dim`` (the embedding dimension) is
    needed by ``distance-weighted`` only.

    Example:
        >>> import torch
        >>> from tripletlab.functional import triplet_loss_from_distances
        >>> dist = torch.tensor([[0.0, 0.5, 0.6], [0.5, 0.0, 1.0], [0.6, 1.0, 0.0]])
        >>> labels = torch.tensor([0, 0, 1])
        >>> loss, stats = triplet_loss_from_distances(dist, labels, strategy="hard")
        >>> round(loss.item(), 4), stats.as_dict()["n_triplets"]  # (0.1 + 0) / 2 anchors
        (0.05, 2)
    """
    if reduction is None:
        reduction = default_reduction(strategy)
    check_options(strategy, margin, soft_margin, reduction, semihard_fallback)
    check_distances(dist, labels, ref_labels)
    opts = MineOptions(margin, semihard_fallback, generator, dim)
    return loss_from_distances(
        dist,
        labels,
        ref_labels,
        exclude_self,
        strategy,
        soft_margin,
        reduction,
        opts,
        indices_tuple,
    )


def batch_hard_triplet_loss(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    *,
    margin: float = 0.2,
    soft_margin: bool = False,
    reduction: str = "mean",
    exclude_self: bool | None = None,
) -> tuple[torch.Tensor, TripletStats]:
    """Batch-hard loss (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss"):
    ``mean_a l(max_p d(a,p), min_n d(a,n))``.

    Anchors without a positive or without a negative are left out.

    Example:
        >>> import torch
        >>> from tripletlab.functional import batch_hard_triplet_loss
        >>> dist = torch.tensor([[0.0, 0.5, 0.6], [0.5, 0.0, 1.0], [0.6, 1.0, 0.0]])
        >>> loss, _ = batch_hard_triplet_loss(dist, torch.tensor([0, 0, 1]), margin=0.2)
        >>> round(loss.item(), 4)
        0.05
    """
    return triplet_loss_from_distances(
        dist,
        labels,
        ref_labels,
        strategy="hard",
        margin=margin,
        soft_margin=soft_margin,
        reduction=reduction,
        exclude_self=exclude_self,
    )


def triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    strategy: str = "semihard",
    margin: float = 0.2,
    distance: str = "euclidean",
    soft_margin: bool = False,
    reduction: str | None = None,
    semihard_fallback: str = "easiest",
    indices_tuple: IndexTuple | None = None,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, TripletStats]:
    """Triplet loss with online mining on a batch of embeddings; returns ``(loss, stats)``.

    ``L = reduce(max(0, d(a, p) - d(a, n) + margin))`` over the triplets ``strategy`` mines (the
    strategies and their papers are listed in :mod:`tripletlab.functional`; the default,
    ``semihard``, is FaceNet's, Schroff et al. 2015). See :class:`tripletlab.TripletLoss` for the
    module form. With ``ref_embeddings``/``ref_labels`` the anchors come from ``embeddings`` and
    the positives and negatives from the reference set (a memory bank or a gathered global batch).

    Example:
        >>> import torch
        >>> from tripletlab.functional import triplet_loss
        >>> emb = torch.tensor([[0.0, 0.0], [0.3, 0.4], [0.6, 0.0], [1.0, 1.0]])
        >>> emb.requires_grad_(True)  # doctest: +ELLIPSIS
        tensor(...)
        >>> loss, stats = triplet_loss(emb, torch.tensor([0, 0, 1, 1]), strategy="hard")
        >>> loss.backward()
        >>> round(loss.item(), 3), stats.as_dict()["n_triplets"]  # (0.1 + 0.2 + 0.777 + 0.355) / 4
        (0.358, 4)
    """
    check_distance_name(distance)
    if reduction is None:
        reduction = default_reduction(strategy)
    check_options(strategy, margin, soft_margin, reduction, semihard_fallback)
    check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    opts = MineOptions(margin, semihard_fallback, generator, embeddings.shape[1])
    if strategy == "all" and indices_tuple is None:  # every pair has a gradient: dense backward
        dist = pairwise_distance(embeddings, ref_embeddings, distance)
        return loss_from_distances(
            dist, labels, ref_labels, None, strategy, soft_margin, reduction, opts, None
        )
    # Mining reads the matrix without gradient; the loss recomputes the 2 distances of each
    # mined triplet from the embeddings (O(T D) backward instead of a dense (B, R) one).
    with torch.no_grad():
        ref = None if ref_embeddings is None else ref_embeddings.detach()
        dist = pairwise_distance(embeddings.detach(), ref, distance)
    paired = PairedDistances(embeddings, ref_embeddings, distance)
    return loss_from_distances(
        dist,
        labels,
        ref_labels,
        None,
        strategy,
        soft_margin,
        reduction,
        opts,
        indices_tuple,
        paired,
    )


def mine_from_distances(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    *,
    strategy: str = "semihard",
    margin: float | None = 0.2,
    semihard_fallback: str = "easiest",
    exclude_self: bool | None = None,
    max_triplets: int | None = None,
    generator: torch.Generator | None = None,
    dim: int | None = None,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> IndexTuple:
    """Mine ``(anchors, positives, negatives)`` index tensors from a distance matrix.

    Indices follow pytorch-metric-learning's convention: ``anchors`` index the rows (the batch),
    ``positives`` and ``negatives`` the columns (the batch itself, or the reference set). For
    ``all`` with a ``margin`` only triplets with loss > 0 (``d(a, n) < d(a, p) + margin``) are
    returned (as pytorch-metric-learning's ``TripletMarginMiner(type_of_triplets="all")`` does);
    ``margin=None`` returns every valid triplet. ``max_triplets`` caps the output with a uniform
    random subset (``all`` can produce O(B³) triplets; the loss itself never enumerates them).
    ``dim``, ``cutoff`` and ``nonzero_loss_cutoff`` are read by ``distance-weighted`` only.

    Example:
        >>> import torch
        >>> from tripletlab.functional import mine_from_distances
        >>> dist = torch.tensor([[0.0, 0.5, 0.6], [0.5, 0.0, 1.0], [0.6, 1.0, 0.0]])
        >>> a, p, n = mine_from_distances(dist, torch.tensor([0, 0, 1]), strategy="semihard")
        >>> a.tolist(), p.tolist(), n.tolist()
        ([0, 1], [1, 0], [2, 2])
    """
    check_options(strategy, margin or 0.0, False, "mean", semihard_fallback)
    check_distances(dist, labels, ref_labels)
    ref_l, excl = resolve_ref(labels, ref_labels, exclude_self)
    opts = MineOptions(
        margin, semihard_fallback, generator, dim, cutoff, nonzero_loss_cutoff, max_triplets
    )
    return mine(dist, labels, ref_l, excl, strategy, opts)


def mine_triplets(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    strategy: str = "semihard",
    margin: float | None = 0.2,
    distance: str = "euclidean",
    semihard_fallback: str = "easiest",
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    max_triplets: int | None = None,
    generator: torch.Generator | None = None,
) -> IndexTuple:
    """Mine ``(anchors, positives, negatives)`` index tensors from a batch of embeddings.

    The distances are computed without gradient; see :func:`mine_from_distances` for the
    conventions and :mod:`tripletlab.functional` for the strategies.

    Example:
        >>> import torch
        >>> from tripletlab import mine_triplets
        >>> emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
        >>> a, p, n = mine_triplets(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), strategy="hard")
        >>> a.shape
        torch.Size([8])
    """
    check_distance_name(distance)
    check_options(strategy, margin or 0.0, False, "mean", semihard_fallback)
    check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    with torch.no_grad():
        dist = pairwise_distance(
            embeddings.detach(),
            None if ref_embeddings is None else ref_embeddings.detach(),
            distance,
        )
    ref_l, excl = resolve_ref(labels, ref_labels, None)
    opts = MineOptions(
        margin, semihard_fallback, generator, embeddings.shape[1], max_triplets=max_triplets
    )
    return mine(dist, labels, ref_l, excl, strategy, opts)
