"""Small batches: the miners on whole (B, R) masks, in a few kernels per call.

For ``B x R <= tripletlab.functional._SMALL_ELEMS`` (B = 64-256, the common training case on
one device) the per-call cost is the number of small kernels, not the B² passes: the row-chunk
loop and the slot table (:mod:`~tripletlab.functional.slots`), built to keep big matrices in
bounded memory, cost more than the mining itself there. The functions here make the same
choices with one (B, R) label mask and a handful of whole-matrix reductions:

* per anchor (``hard``, ``easy-positive``): one masked ``max``/``min`` over the positives, one
  masked ``argmin`` over the negatives;
* per positive pair (``hardest-negative``, ``semihard``, ``random``, ``distance-weighted``):
  the pairs are the positive mask's nonzeros in row-major order (the slot table's order), and
  semi-hard searches the (pairs, R) rows of those pairs at once; the two sampling strategies
  run their chunked chooser on the whole matrix (same generator calls: same triplets for a
  seed). These read (pairs, R) matrices, so they stay dense up to a quarter of
  ``_SMALL_ELEMS`` (B = 128) and while pairs x R <= :data:`_PAIR_ROWS_FACTOR` x
  ``_SMALL_ELEMS``; beyond, the chunked path's P passes over (B, R) are faster.

Selection is identical to the chunked path's: masked entries are ``±inf``, so real (finite)
distances keep their exact values; ``argmax``/``argmin`` return the first extremum, i.e. the
lowest column on ties (the slot table lists positives in ascending column order); semi-hard's
"found" test is ``min < float max``, as in :func:`~tripletlab.functional.semihard.semihard_slots`.
The oracle tests run both paths (``_SMALL_ELEMS`` patched to 0 forces the chunked one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .. import functional as _knobs  # tuning knobs are read from the package at call time
from .mining import (
    IndexTuple,
    MineOptions,
    NegativeChooser,
    PairChunk,
    _uniform_negative,
    _weighted_negative,
    empty_triplets,
)

_INF = float("inf")
# the per-pair miners that read a (pairs, R) matrix (semi-hard's search, the sampling ones'
# tables) stay dense while pairs x R <= this factor x _SMALL_ELEMS (many positives per anchor:
# the chunked path's P passes over (B, R) are faster; measured 1.7x at 3 x 256 x 256)
_PAIR_ROWS_FACTOR = 2


class DenseLabels(NamedTuple):
    """Label structure of a whole small batch."""

    same: torch.Tensor  # (B, R) y_a == y_r, the anchor itself included
    pos: torch.Tensor  # (B, R) positives (``same`` without (i, i) when exclude_self)
    has_pos: torch.Tensor  # (B,) the row has a positive
    has_neg: torch.Tensor  # (B,) the row has a negative


DenseMiner = Callable[[torch.Tensor, DenseLabels, MineOptions], "IndexTuple | None"]


def is_small(b: int, r: int) -> bool:
    """Whether a (b, r) problem takes the dense small-batch path."""
    return b * r <= _knobs._SMALL_ELEMS


def dense_labels(labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool) -> DenseLabels:
    """The masks of :class:`DenseLabels` (counts as int32 sums, no bool ``any``)."""
    same = labels[:, None] == ref_labels[None, :]
    n_same = same.sum(dim=1, dtype=torch.int32)
    if not exclude_self or not same.numel():
        return DenseLabels(same, same, n_same > 0, n_same < same.shape[1])
    pos = same.clone().fill_diagonal_(False)  # (i, i) for i < min(B, R)
    if ref_labels is labels:  # the batch against itself: a row's own column is in ``same``
        has_pos = n_same > 1
    else:
        has_pos = pos.sum(dim=1, dtype=torch.int32) > 0
    return DenseLabels(same, pos, has_pos, n_same < same.shape[1])


def _closest_negative_per_row(dist: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    return torch.where(same, _INF, dist).argmin(dim=1)


def _per_anchor(dist: torch.Tensor, dl: DenseLabels, farthest_positive: bool) -> IndexTuple:
    if farthest_positive:
        p = torch.where(dl.pos, dist, -_INF).argmax(dim=1)
    else:
        p = torch.where(dl.pos, dist, _INF).argmin(dim=1)
    n = _closest_negative_per_row(dist, dl.same)
    a = (dl.has_pos & dl.has_neg).nonzero().squeeze(1)
    if a.numel() == p.numel():  # every row is an anchor (the usual PK batch)
        return a, p, n
    return a, p.index_select(0, a), n.index_select(0, a)


def _pairs(dl: DenseLabels) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor, positive) of every positive pair whose anchor has a negative, row-major."""
    pa, pp = (dl.pos & dl.has_neg[:, None]).nonzero(as_tuple=True)
    return pa, pp


def _too_many_pairs(pa: torch.Tensor, dist: torch.Tensor) -> bool:
    return pa.numel() * dist.shape[1] > _PAIR_ROWS_FACTOR * _knobs._SMALL_ELEMS


def _mine_hard_dense(dist, dl: DenseLabels, opts: MineOptions) -> IndexTuple:
    return _per_anchor(dist, dl, farthest_positive=True)


def _mine_easy_positive_dense(dist, dl: DenseLabels, opts: MineOptions) -> IndexTuple:
    return _per_anchor(dist, dl, farthest_positive=False)


def _mine_hardest_negative_dense(dist, dl: DenseLabels, opts: MineOptions) -> IndexTuple:
    pa, pp = _pairs(dl)
    return pa, pp, _closest_negative_per_row(dist, dl.same).index_select(0, pa)


def _mine_semihard_dense(dist, dl: DenseLabels, opts: MineOptions) -> IndexTuple | None:
    pa, pp = _pairs(dl)
    if _too_many_pairs(pa, dist):
        return None  # the chunked per-slot search
    rows = dist.index_select(0, pa)  # (T, R): the anchor row of every pair
    d_ap = rows.gather(1, pp[:, None])
    # excluded: not a negative, or not farther than the positive
    excl = torch.le(rows, d_ap).logical_or_(dl.same.index_select(0, pa))
    val, nn = torch.where(excl, _INF, rows).min(dim=1)
    found = val < torch.finfo(dist.dtype).max
    if opts.semihard_fallback == "drop":
        return pa[found], pp[found], nn[found]
    far = torch.where(dl.same, -_INF, dist).argmax(dim=1)  # the anchor's farthest negative
    return pa, pp, torch.where(found, nn, far.index_select(0, pa))


def _sampled_per_pair(chooser: NegativeChooser) -> DenseMiner:
    """A sampling strategy's chunked chooser on the whole matrix as one chunk: it draws a
    (B, P) table of negatives exactly as the chunked path does for one chunk (same generator
    calls, same shapes), and each pair takes the draw of its slot (its positive's rank in the
    row), so the triplets equal the chunked path's for the same generator state."""

    def miner(dist, dl: DenseLabels, opts: MineOptions) -> IndexTuple | None:
        pa, pp = _pairs(dl)
        if _too_many_pairs(pa, dist):
            return None  # before any draw: the chunked path then draws the same
        p = int(dl.pos.sum(dim=1).max())
        if p == 0:  # no positive pair: the chunked path draws nothing either
            return pa, pp, pp.clone()
        slots = torch.empty(dist.shape[0], p, dtype=torch.long, device=dist.device)  # shape only
        chunk = PairChunk(dist, ~dl.same, dl.has_neg[:, None], slots, slots.bool())
        nn, _ = chooser(chunk, opts)
        rank = dl.pos.cumsum(dim=1).sub_(1)[pa, pp]
        return pa, pp, nn[pa, rank]

    return miner


#: strategy name -> dense miner (None from a miner: use the chunked path after all)
DENSE_MINERS: dict[str, DenseMiner] = {
    "hard": _mine_hard_dense,
    "easy-positive": _mine_easy_positive_dense,
    "hardest-negative": _mine_hardest_negative_dense,
    "semihard": _mine_semihard_dense,
    "random": _sampled_per_pair(_uniform_negative),
    "distance-weighted": _sampled_per_pair(_weighted_negative),
}


# the per-pair miners that read (pairs, R) matrices: dense up to _SMALL_ELEMS >> 2 only
_PAIR_MATRIX_MINERS = ("semihard", "random", "distance-weighted")


def dense_miner(strategy: str, b: int, r: int) -> DenseMiner | None:
    """The dense miner of ``strategy`` if a (b, r) problem is small enough for it, else None."""
    limit = _knobs._SMALL_ELEMS >> (2 if strategy in _PAIR_MATRIX_MINERS else 0)
    return DENSE_MINERS.get(strategy) if b * r <= limit else None


def mine_dense(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    exclude_self: bool,
    strategy: str,
    opts: MineOptions,
    dense: DenseLabels | None = None,
) -> IndexTuple | None:
    """The dense miner's triplets for a small ``dist``, or None (not small, no dense miner).
    ``dense``: the masks of :func:`dense_labels`, when the caller has them already."""
    miner = dense_miner(strategy, *dist.shape)
    if miner is None:
        return None
    if dist.numel() == 0:  # no rows, or no columns: no pair at all
        return empty_triplets(dist.device)
    if dense is None:
        dense = dense_labels(labels, ref_labels, exclude_self)
    return miner(dist, dense, opts)
