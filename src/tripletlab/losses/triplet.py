"""``TripletLoss``: distance + online mining + margin / soft margin + reduction + stats."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as Fn
from ..distances import check_distance_name

__all__ = ["TripletLoss"]


class TripletLoss(nn.Module):
    """Triplet loss with exact online mining inside the batch.

    For mined triplets (a, p, n) with ``y_a == y_p != y_n`` and ``a != p``::

        l(a, p, n) = max(0, d(a, p) - d(a, n) + margin)      (hinge)
        l(a, p, n) = softplus(d(a, p) - d(a, n))             (soft_margin=True)

    reduced by ``mean`` (over mined triplets), ``mean_active`` (over triplets with l > 0) or
    ``sum``. Negatives relative to (a, p) are *hard* if ``d(a,n) < d(a,p)``, *semi-hard* if
    ``d(a,p) < d(a,n) < d(a,p) + margin`` and *easy* otherwise.

    Strategies: ``all`` (batch-all; exact in O(B²) memory), ``hard`` (batch-hard, Hermans et al.
    2017, "In Defense of the Triplet Loss for Person Re-Identification"), ``semihard`` (FaceNet,
    Schroff et al. 2015; ``semihard_fallback`` = ``"easiest"`` as in TF-Addons or ``"drop"``),
    ``hardest-negative``, ``easy-positive`` (Xuan et al. 2020), ``distance-weighted`` (Wu et al.
    2017, "Sampling Matters in Deep Embedding Learning"), ``random``. See
    :mod:`tripletlab.functional` for the exact definitions.

    Requirements: integer labels; at least two samples of a class for any positive pair and at
    least two classes for any negative (use :class:`tripletlab.samplers.PKSampler`). Embeddings
    are not renormalised by the loss (the model head L2-normalises them).

    Index tuples ``(anchors, positives, negatives)`` follow pytorch-metric-learning, so its miners
    can feed this loss (``indices_tuple=``) and :func:`tripletlab.mine_triplets` can feed its
    losses.

    After each call, :attr:`stats` holds a dict: ``n_triplets``, ``n_active``, ``active_fraction``,
    ``mean_d_ap``, ``mean_d_an``, ``mean_distance`` (collapse signal), ``batch_size``,
    ``n_classes``, and ``reason`` when the loss is zero because nothing could be mined.

    Args:
        margin: hinge margin (>= 0).
        strategy: one of :data:`tripletlab.functional.STRATEGIES`.
        distance: ``euclidean``, ``sqeuclidean`` or ``cosine``.
        reduction: ``mean``, ``mean_active``, ``sum``; ``None`` = ``mean_active`` for ``all``,
            ``mean`` otherwise.
        soft_margin: use ``softplus(d_ap - d_an)`` instead of the hinge.
        semihard_fallback: for ``semihard`` when a pair has no semi-hard negative.
        seed: seeds the generator of the ``random`` and ``distance-weighted`` strategies.

    Example:
        >>> import torch
        >>> from tripletlab import TripletLoss
        >>> emb = torch.nn.functional.normalize(torch.randn(16, 8, requires_grad=True), dim=1)
        >>> labels = torch.arange(4).repeat_interleave(4)
        >>> loss_fn = TripletLoss(margin=0.2, strategy="semihard")
        >>> loss = loss_fn(emb, labels)
        >>> loss.backward()
        >>> sorted(loss_fn.stats)[:3]
        ['active_fraction', 'batch_size', 'mean_d_an']
    """

    def __init__(
        self,
        margin: float = 0.2,
        strategy: str = "semihard",
        distance: str = "euclidean",
        reduction: str | None = None,
        soft_margin: bool = False,
        semihard_fallback: str = "easiest",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_distance_name(distance)
        resolved = reduction or Fn.default_reduction(strategy)
        Fn.check_options(strategy, margin, soft_margin, resolved, semihard_fallback)
        self.margin = float(margin)
        self.strategy = strategy
        self.distance = distance
        self.reduction = resolved
        self.soft_margin = bool(soft_margin)
        self.semihard_fallback = semihard_fallback
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(int(seed))
        self._stats: Fn.TripletStats | None = None

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of the batch (online mining), of given triplets, or mined against a bank."""
        loss, stats = Fn.triplet_loss(
            embeddings,
            labels,
            strategy=self.strategy,
            margin=self.margin,
            distance=self.distance,
            soft_margin=self.soft_margin,
            reduction=self.reduction,
            semihard_fallback=self.semihard_fallback,
            indices_tuple=indices_tuple,
            ref_embeddings=ref_embeddings,
            ref_labels=ref_labels,
            generator=self.generator,
        )
        self._stats = stats
        return loss

    @property
    def stats(self) -> dict[str, float | int | str]:
        """Statistics of the last call as plain Python values (empty before the first call)."""
        return {} if self._stats is None else self._stats.as_dict()

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, strategy={self.strategy!r}, distance={self.distance!r}, "
            f"reduction={self.reduction!r}, soft_margin={self.soft_margin}"
        )
