"""Miners that return explicit ``(anchors, positives, negatives)`` index tensors.

Every ``_mine_<strategy>`` function has the signature of :data:`Miner`: a detached (B, R) distance
matrix, the row and column labels, whether the pairs (i, i) are excluded, and the
:class:`MineOptions`. They are registered by name in :mod:`tripletlab.functional.strategies`.
Inputs are checked at the public boundary (:func:`tripletlab.functional.mine_from_distances`),
not here. Two loops share the row chunking and the slot table:

* :func:`per_anchor` — one triplet per anchor (``hard``, ``easy-positive``);
* :func:`per_pair` — one negative per positive pair (``semihard``, ``hardest-negative``,
  ``random``, ``distance-weighted``), chosen by a :data:`NegativeChooser` on each row chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import InputError
from .slots import float_mask, iter_label_slots

IndexTuple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_INF = float("inf")


@dataclass(frozen=True)
class MineOptions:
    """Options a strategy may read (each reads only its own)."""

    margin: float | None = 0.2
    semihard_fallback: str = "easiest"
    generator: torch.Generator | None = None
    dim: int | None = None
    cutoff: float = 0.5
    nonzero_loss_cutoff: float = 1.4
    max_triplets: int | None = None


Miner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, MineOptions], IndexTuple]


class PairChunk(NamedTuple):
    """One row chunk as a per-pair chooser sees it."""

    d: torch.Tensor  # (rows, R) distances
    neg: torch.Tensor  # (rows, R) negatives
    has_neg: torch.Tensor  # (rows, 1) whether the row has a negative
    slots: torch.Tensor  # (rows, P) positive columns
    valid: torch.Tensor  # (rows, P) real slots
    same: torch.Tensor | None = None  # (rows, R) the anchor's own class (~neg), when built


# chunk -> (negative column per slot (rows, P), extra keep mask or None)
NegativeChooser = Callable[[PairChunk, MineOptions], tuple[torch.Tensor, torch.Tensor | None]]


def empty_triplets(device: torch.device) -> IndexTuple:
    """Three empty long tensors."""
    e = torch.empty(0, dtype=torch.long, device=device)
    return e, e.clone(), e.clone()


def _cat_triplets(out_a: list, out_p: list, out_n: list, device: torch.device) -> IndexTuple:
    if not out_a:
        return empty_triplets(device)
    return torch.cat(out_a), torch.cat(out_p), torch.cat(out_n)


def per_pair(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    exclude_self: bool,
    opts: MineOptions,
    choose: NegativeChooser,
) -> IndexTuple:
    """One negative per positive pair, chosen by ``choose`` (row chunks, O(B²) memory)."""
    out_a, out_p, out_n = [], [], []
    for s in iter_label_slots(labels, ref_labels, exclude_self):
        if not bool(s.valid.any()):
            continue
        rows = s.rows
        same = s.same
        has_neg = s.n_same[:, None] < same.shape[1]
        chunk = PairChunk(dist[rows], ~same, has_neg, s.slots, s.valid, same)
        nn, extra = choose(chunk, opts)
        keep = s.valid & has_neg
        if extra is not None:
            keep = keep & extra
        ri, qi = keep.nonzero(as_tuple=True)  # row-major: anchors ascending, then columns
        out_a.append(ri + rows.start)
        out_p.append(s.slots[ri, qi])
        out_n.append(nn[ri, qi])
    return _cat_triplets(out_a, out_p, out_n, dist.device)


def per_anchor(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    exclude_self: bool,
    farthest_positive: bool,
) -> IndexTuple:
    """Per anchor its farthest (or closest) positive and its closest negative.

    Ties go to the lowest column (``argmax``/``argmin`` return the first extremum).
    """
    out_a, out_p, out_n = [], [], []
    for s in iter_label_slots(labels, ref_labels, exclude_self):
        d = dist[s.rows]
        # the positive from the slot table (ascending columns: ties go to the lowest column)
        d_ap = d.gather(1, s.slots)
        if farthest_positive:
            q = d_ap.masked_fill_(~s.valid, -_INF).argmax(dim=1, keepdim=True)
        else:
            q = d_ap.masked_fill_(~s.valid, _INF).argmin(dim=1, keepdim=True)
        p = s.slots.gather(1, q).squeeze(1)
        # closest negative: same-label columns pushed out by + float max (an add, not a bool
        # masked_fill, which costs ~25x more on CPU); real distances keep their exact values
        n = torch.add(d, float_mask(s.same, d.dtype), alpha=torch.finfo(d.dtype).max)
        n = n.argmin(dim=1)
        keep = (s.n_pos > 0) & (s.n_same < d.shape[1])
        a = torch.arange(s.rows.start, s.rows.stop, device=dist.device)
        out_a.append(a[keep])
        out_p.append(p[keep])
        out_n.append(n[keep])
    return _cat_triplets(out_a, out_p, out_n, dist.device)


def _mine_hard(dist, labels, ref_labels, exclude_self, opts: MineOptions) -> IndexTuple:
    """Batch-hard (Hermans et al. 2017): per anchor, farthest positive and closest negative."""
    return per_anchor(dist, labels, ref_labels, exclude_self, farthest_positive=True)


def _mine_easy_positive(dist, labels, ref_labels, exclude_self, opts: MineOptions) -> IndexTuple:
    """Easy-positive (Xuan et al. 2020): per anchor, closest positive and closest negative."""
    return per_anchor(dist, labels, ref_labels, exclude_self, farthest_positive=False)


def _closest_negative(c: PairChunk, opts: MineOptions) -> tuple[torch.Tensor, None]:
    return c.d.masked_fill(~c.neg, _INF).argmin(dim=1, keepdim=True).expand_as(c.slots), None


def _mine_hardest_negative(dist, labels, ref_labels, exclude_self, opts) -> IndexTuple:
    """Per positive pair, the closest negative of the anchor."""
    return per_pair(dist, labels, ref_labels, exclude_self, opts, _closest_negative)


def _uniform_negative(c: PairChunk, opts: MineOptions) -> tuple[torch.Tensor, None]:
    # the k-th negative of a row (1-based) is the first column whose running count is k
    cum = c.neg.cumsum(dim=1)
    n_neg = cum[:, -1:]
    u = torch.rand(*c.slots.shape, generator=opts.generator, dtype=torch.float64)
    k = (u.to(c.d.device) * n_neg).long().clamp_max((n_neg - 1).clamp_min(0)) + 1
    return torch.searchsorted(cum, k).clamp_max(c.d.shape[1] - 1), None


def _mine_random(dist, labels, ref_labels, exclude_self, opts: MineOptions) -> IndexTuple:
    """Per positive pair, one negative drawn uniformly (``opts.generator``)."""
    return per_pair(dist, labels, ref_labels, exclude_self, opts, _uniform_negative)


def _weighted_negative(c: PairChunk, opts: MineOptions) -> tuple[torch.Tensor, None]:
    if opts.dim is None:
        raise InputError("distance-weighted sampling needs the embedding dimension")
    w = _weights64(c.d, c.neg, opts.dim, opts.cutoff, opts.nonzero_loss_cutoff)
    safe = w.masked_fill_(~c.has_neg, 1.0).cpu()
    nn = torch.multinomial(safe, c.slots.shape[1], replacement=True, generator=opts.generator)
    return nn.to(c.d.device), None


def _mine_distance_weighted(dist, labels, ref_labels, exclude_self, opts) -> IndexTuple:
    """Per positive pair, one negative drawn by :func:`distance_weighted_probabilities`."""
    return per_pair(dist, labels, ref_labels, exclude_self, opts, _weighted_negative)


def distance_weighted_probabilities(
    dist: torch.Tensor,
    neg_mask: torch.Tensor,
    *,
    dim: int | None,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> torch.Tensor:
    """Sampling probabilities of Wu et al. (2017) for each anchor row over its negatives.

    Wu, Manmatha, Smola & Krähenbühl 2017, "Sampling Matters in Deep Embedding Learning": a
    negative at distance ``d`` is drawn with weight ``q(d)^-1``, where
    ``q(d) ∝ d^(D-2) (1 - d²/4)^((D-3)/2)`` is the density of distances between points uniform on
    the unit sphere in D dimensions, so

    ``log w(d) = (2 - D) log d - (D - 3)/2 log(1 - d²/4)`` with ``d`` clipped to ``>= cutoff``;
    negatives with ``d >= nonzero_loss_cutoff`` (and non-negatives) get 0; rows are normalised to
    sum to 1, and a row whose weights are all 0 becomes uniform over its negatives. Meant for
    euclidean distances between L2-normalised embeddings (distances in [0, 2]).

    Example:
        >>> import torch
        >>> from tripletlab.functional import distance_weighted_probabilities
        >>> d = torch.tensor([[0.0, 0.6, 1.0, 1.5]])
        >>> neg = torch.tensor([[False, True, True, True]])
        >>> w = distance_weighted_probabilities(d, neg, dim=8)
        >>> [round(v, 3) for v in w[0].tolist()]  # closer negatives weigh more; 1.5 >= 1.4
        [0.0, 0.93, 0.07, 0.0]
    """
    if dim is None:
        raise InputError("distance-weighted sampling needs the embedding dimension")
    return _weights64(dist, neg_mask, dim, cutoff, nonzero_loss_cutoff).to(dist.dtype)


@torch.no_grad()
def _weights64(
    dist: torch.Tensor, neg_mask: torch.Tensor, dim: int, cutoff: float, nonzero_loss_cutoff: float
) -> torch.Tensor:
    """:func:`distance_weighted_probabilities` in float64, in place on one float64 copy of
    ``dist`` (each step is one pass over the (rows, R) matrix; no further temporaries)."""
    dist = dist.detach()
    ok = neg_mask & (dist < nonzero_loss_cutoff)
    d = dist.to(torch.float64, copy=True).clamp_min_(cutoff)  # never in place on the input
    one_minus = (d * d).mul_(-0.25).add_(1.0).clamp_min_(1e-8).log_()
    log_w = d.log_().mul_(2.0 - dim).sub_(one_minus, alpha=(dim - 3) / 2.0)
    del one_minus
    log_w.masked_fill_(~ok, -_INF)
    row_max = log_w.max(dim=1, keepdim=True).values
    row_max.masked_fill_(~torch.isfinite(row_max), 0.0)
    w = log_w.sub_(row_max).exp_()
    s = w.sum(dim=1, keepdim=True)
    empty = (s <= 0).squeeze(1)
    w.div_(s.clamp_min_(1e-300))
    if bool(empty.any()):  # rows without a weighted negative: uniform over their negatives
        uniform = neg_mask[empty].double()
        w[empty] = uniform / uniform.sum(1, True).clamp_min(1)
    return w
