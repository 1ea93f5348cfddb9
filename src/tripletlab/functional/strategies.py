"""The strategy table: name -> how it mines, its default reduction, why it may mine nothing.

:data:`STRATEGIES` (the CLI's choices, the config check, the tests' parametrisation) is the list
of its keys. To add a strategy, write a ``_mine_<name>`` function with the :data:`Miner` signature
(most are a :func:`~tripletlab.functional.mining.per_pair` chooser or a
:func:`~tripletlab.functional.mining.per_anchor` call) and add one row here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dense import DenseLabels, mine_dense
from .mine_all import _mine_all
from .mining import (
    IndexTuple,
    MineOptions,
    Miner,
    _mine_distance_weighted,
    _mine_easy_positive,
    _mine_hard,
    _mine_hardest_negative,
    _mine_random,
)
from .semihard import SEMIHARD_EMPTY_REASON, _mine_semihard


@dataclass(frozen=True)
class Strategy:
    """One row of the table."""

    mine: Miner
    paper: str = ""
    default_reduction: str = "mean"
    # the loss's stats reason when the batch has pairs and negatives but nothing was mined
    empty_reason: str = "no triplets"
    # False for the strategies that draw negatives at random (they read ``opts.generator``)
    deterministic: bool = True


STRATEGY_TABLE: dict[str, Strategy] = {
    "all": Strategy(_mine_all, "FaceNet-style batch-all", default_reduction="mean_active"),
    "hard": Strategy(_mine_hard, "Hermans, Beyer & Leibe 2017"),
    "semihard": Strategy(
        _mine_semihard, "Schroff, Kalenichenko & Philbin 2015", empty_reason=SEMIHARD_EMPTY_REASON
    ),
    "hardest-negative": Strategy(_mine_hardest_negative),
    "easy-positive": Strategy(_mine_easy_positive, "Xuan, Stylianou, Liu & Pless 2020"),
    "distance-weighted": Strategy(
        _mine_distance_weighted, "Wu, Manmatha, Smola & Krähenbühl 2017", deterministic=False
    ),
    "random": Strategy(_mine_random, deterministic=False),
}
STRATEGIES: tuple[str, ...] = tuple(STRATEGY_TABLE)


def default_reduction(strategy: str) -> str:
    """The reduction ``reduction=None`` means: ``mean_active`` for ``all``, else ``mean``.

    An unknown name gets ``mean`` too; :func:`~tripletlab.functional.check_options` reports it.

    Example:
        >>> from tripletlab.functional import default_reduction
        >>> default_reduction("all"), default_reduction("hard")
        ('mean_active', 'mean')
    """
    row = STRATEGY_TABLE.get(strategy)
    return "mean" if row is None else row.default_reduction


def mine(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    exclude_self: bool,
    strategy: str,
    opts: MineOptions,
    dense: DenseLabels | None = None,
) -> IndexTuple:
    """Dispatch to the strategy's miner on a distance matrix (no checks, no gradient); a small
    matrix goes to the dense miner of :mod:`~tripletlab.functional.dense` when there is one
    (``dense``: its label masks, if the caller built them already)."""
    with torch.no_grad():
        dist = dist.detach()
        out = mine_dense(dist, labels, ref_labels, exclude_self, strategy, opts, dense)
        if out is not None:
            return out
        return STRATEGY_TABLE[strategy].mine(dist, labels, ref_labels, exclude_self, opts)
