"""Miners: ``nn.Module`` wrappers that return ``(anchors, positives, negatives)`` index tensors."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as Fn
from ..distances import check_distance_name

__all__ = ["TripletMiner"]


class TripletMiner(nn.Module):
    """Online triplet miner (pytorch-metric-learning's index-tuple convention).

    The returned indices can be passed to :class:`tripletlab.TripletLoss` (``indices_tuple=``) or
    to any pytorch-metric-learning loss. For ``strategy="all"`` only the triplets with a positive
    hinge loss (``d(a,n) < d(a,p) + margin``) are returned, like pml's
    ``TripletMarginMiner(type_of_triplets="all")``; pass ``margin=None`` for every valid triplet.
    Batch-all can yield O(B³) triplets: ``max_triplets`` caps the output with a uniform random
    subset (seeded by ``seed``).

    Example:
        >>> import torch
        >>> from tripletlab.losses.miners import TripletMiner
        >>> miner = TripletMiner(strategy="semihard", margin=0.2)
        >>> emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
        >>> a, p, n = miner(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    """

    def __init__(
        self,
        strategy: str = "semihard",
        margin: float | None = 0.2,
        distance: str = "euclidean",
        semihard_fallback: str = "easiest",
        max_triplets: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_distance_name(distance)
        Fn.check_options(strategy, margin or 0.0, False, "mean", semihard_fallback)
        self.strategy = strategy
        self.margin = margin
        self.distance = distance
        self.semihard_fallback = semihard_fallback
        self.max_triplets = max_triplets
        self.generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mine triplets; anchors index ``embeddings``, positives/negatives the reference set."""
        return Fn.mine_triplets(
            embeddings,
            labels,
            strategy=self.strategy,
            margin=self.margin,
            distance=self.distance,
            semihard_fallback=self.semihard_fallback,
            ref_embeddings=ref_embeddings,
            ref_labels=ref_labels,
            max_triplets=self.max_triplets,
            generator=self.generator,
        )
