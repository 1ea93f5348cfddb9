"""Triplet losses and online triplet mining as pure functions on tensors.

Definitions (``../DESIGN.md`` §2). Embeddings ``E`` (B, D), integer labels ``y`` (B,), a distance
matrix ``dist`` (B, R) between the anchors (rows) and a reference set (columns; by default the batch
itself). A positive pair is (a, p) with a != p and y_a == y_p; a negative n has y_n != y_a.

* hinge loss of a triplet:       ``l(a, p, n) = max(0, d(a, p) - d(a, n) + margin)``
* soft-margin loss of a triplet: ``l(a, p, n) = softplus(d(a, p) - d(a, n))`` (Hermans et al. 2017)

Negatives relative to a positive pair (a, p) (Schroff et al. 2015):

* hard:      ``d(a, n) <  d(a, p)``
* semi-hard: ``d(a, p) <  d(a, n) < d(a, p) + margin``
* easy:      ``d(a, n) >= d(a, p) + margin``

Strategies (:data:`STRATEGIES`):

* ``all`` — batch-all: every valid triplet (FaceNet-style; averaged over active triplets by
  default).
* ``hard`` — batch-hard (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss"): per anchor,
  its farthest positive and its closest negative.
* ``semihard`` — FaceNet (Schroff, Kalenichenko & Philbin 2015): per positive pair, the closest
  negative with ``d(a, n) > d(a, p)``. When no such negative exists, ``semihard_fallback`` decides:
  ``"easiest"`` takes the farthest negative (TF-Addons' ``triplet_semihard_loss``), ``"drop"`` drops
  the pair.
* ``hardest-negative`` — per positive pair, the closest negative.
* ``easy-positive`` — (Xuan, Stylianou, Liu & Pless 2020, "Improved Embeddings with Easy Positive
  Triplet Mining"): per anchor, its closest positive with its closest (hardest) negative.
* ``distance-weighted`` — (Wu, Manmatha, Smola & Krähenbühl 2017, "Sampling Matters in Deep
  Embedding Learning"): per positive pair, one negative sampled with probability proportional to
  ``q(d)^-1`` where ``q(d) ∝ d^(D-2) (1 - d²/4)^((D-3)/2)`` is the density of distances between
  points uniform on the unit sphere in D dimensions; ``d`` is clipped below at ``cutoff`` (0.5) and
  negatives with ``d >= nonzero_loss_cutoff`` (1.4) get weight 0, as in the paper's reference code.
  If every weight of an anchor is 0, a negative is drawn uniformly.
* ``random`` — per positive pair, one negative drawn uniformly.

Exact batch-all without cubic memory (§3): for each anchor the negative distances are sorted once.
For a positive pair with threshold ``t = d(a, p) + margin`` the active negatives are the ``c``
smallest ones with ``d(a, n) < t`` (``c`` from ``searchsorted``), and their summed loss is
``c * t - prefix_sum[c]``. The gradient is exact too: ``∂L/∂d(a, p) = c(a, p)`` and
``∂L/∂d(a, n) = -#{p : d(a, n) < d(a, p) + margin}``, again a ``searchsorted`` on each anchor's
sorted thresholds. Time O(B² log B), memory O(B²); rows are processed in chunks so the temporaries
stay small. Prefix sums are accumulated in float64.

Reductions (:data:`REDUCTIONS`): ``mean`` over mined triplets, ``mean_active`` over triplets with
loss > 0, ``sum``. With no triplet (or no active one) the loss is 0 and still backpropagates
(zero gradients); the returned stats say why.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .distances import check_distance_name, paired_distance, pairwise_distance
from .errors import InputError, InputTypeError

__all__ = [
    "REDUCTIONS",
    "SEMIHARD_FALLBACKS",
    "STRATEGIES",
    "TripletStats",
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "check_inputs",
    "distance_weighted_probabilities",
    "mine_from_distances",
    "mine_triplets",
    "reduce_triplet_losses",
    "triplet_loss",
    "triplet_loss_from_distances",
    "triplet_loss_on_indices",
    "triplet_margin_loss",
]

STRATEGIES: tuple[str, ...] = (
    "all",
    "hard",
    "semihard",
    "hardest-negative",
    "easy-positive",
    "distance-weighted",
    "random",
)
REDUCTIONS: tuple[str, ...] = ("mean", "mean_active", "sum")
SEMIHARD_FALLBACKS: tuple[str, ...] = ("easiest", "drop")

IndexTuple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Elements per temporary (rows x columns) while processing a distance matrix in row chunks.
_CHUNK_ELEMS = 1 << 22
# The 'all' miner warns before materialising more index triplets than this.
_LARGE_TRIPLET_COUNT = 1 << 24


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------


def _check_labels(labels: torch.Tensor, n: int, what: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise InputTypeError(f"{what} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise InputError(f"{what} must be 1-D (B,), got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise InputTypeError(
            f"{what} must be an integer tensor, got dtype {labels.dtype} "
            "(float labels can silently merge classes; convert with labels.long())"
        )
    if labels.shape[0] != n:
        raise InputError(f"{what} has {labels.shape[0]} entries but there are {n} embeddings")


def _check_embeddings(emb: torch.Tensor, what: str) -> None:
    if not isinstance(emb, torch.Tensor):
        raise InputTypeError(f"{what} must be a torch.Tensor, got {type(emb).__name__}")
    if emb.dim() != 2:
        raise InputError(f"{what} must be 2-D (B, D), got shape {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise InputTypeError(f"{what} must be a floating-point tensor, got dtype {emb.dtype}")
    if emb.numel() > 0 and not bool(torch.isfinite(emb).all()):
        bad = int((~torch.isfinite(emb)).any(dim=1).sum())
        raise InputError(f"{what} contain NaN or Inf values (in {bad} of {emb.shape[0]} rows)")


def _check_options(
    strategy: str | None, margin: float, soft_margin: bool, reduction: str, fallback: str
) -> None:
    if strategy is not None and strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    if fallback not in SEMIHARD_FALLBACKS:
        raise InputError(
            f"unknown semihard_fallback {fallback!r}; choose one of {list(SEMIHARD_FALLBACKS)}"
        )
    if not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise InputError(f"margin must be a finite number, got {margin!r}")
    if not soft_margin and margin < 0:
        raise InputError(f"margin must be >= 0 for the hinge loss, got {margin}")


def check_inputs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
) -> None:
    """Raise a clear :class:`~tripletlab.errors.InputError` for malformed embeddings or labels."""
    _check_embeddings(embeddings, "embeddings")
    _check_labels(labels, embeddings.shape[0], "labels")
    if (ref_embeddings is None) != (ref_labels is None):
        raise InputError("ref_embeddings and ref_labels must be given together")
    if ref_embeddings is not None:
        _check_embeddings(ref_embeddings, "ref_embeddings")
        _check_labels(ref_labels, ref_embeddings.shape[0], "ref_labels")
        if ref_embeddings.shape[1] != embeddings.shape[1]:
            raise InputError(
                f"ref_embeddings have dimension {ref_embeddings.shape[1]} but embeddings have "
                f"{embeddings.shape[1]}"
            )


# --------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------


@dataclass
class TripletStats:
    """What one loss call saw. Tensors stay on the device until :meth:`as_dict` is called.

    ``n_triplets`` counts the mined (for ``all``: every valid) triplets, ``n_active`` those with
    loss > 0; ``mean_d_ap``/``mean_d_an`` average over the mined triplets; ``mean_distance`` is the
    mean distance over all pairs of the batch (a collapse signal: it goes to 0 when every
    embedding converges to one point). ``reason`` says why the loss is zero when it is.
    """

    n_triplets: torch.Tensor | int = 0
    n_active: torch.Tensor | int = 0
    sum_d_ap: torch.Tensor | float = 0.0
    sum_d_an: torch.Tensor | float = 0.0
    n_anchors: int = 0
    n_positive_pairs: int = 0
    mean_distance: torch.Tensor | float = float("nan")
    batch_size: int = 0
    n_classes: int = 0
    reason: str = ""

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain Python numbers (one device sync)."""
        n_trip = int(self.n_triplets)
        n_act = int(self.n_active)
        d = {
            "n_triplets": n_trip,
            "n_active": n_act,
            "active_fraction": n_act / n_trip if n_trip else 0.0,
            "mean_d_ap": float(self.sum_d_ap) / n_trip if n_trip else 0.0,
            "mean_d_an": float(self.sum_d_an) / n_trip if n_trip else 0.0,
            "n_anchors": int(self.n_anchors),
            "n_positive_pairs": int(self.n_positive_pairs),
            "mean_distance": float(self.mean_distance),
            "batch_size": int(self.batch_size),
            "n_classes": int(self.n_classes),
            "reason": self.reason,
        }
        if not d["reason"]:
            if n_trip == 0:
                d["reason"] = "no triplets"
            elif n_act == 0:
                d["reason"] = "no active triplets (every triplet satisfies the margin)"
        return d


def _batch_facts(
    dist: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool
) -> TripletStats:
    with torch.no_grad():
        b, r = dist.shape
        n_pairs = b * r - (min(b, r) if exclude_self else 0)
        mean_d = dist.sum() / n_pairs if n_pairs > 0 else torch.zeros((), dtype=dist.dtype)
        classes = torch.unique(torch.cat([labels, ref_labels])).numel() if b + r else 0
    return TripletStats(mean_distance=mean_d, batch_size=b, n_classes=classes)


def _zero_reason(stats: TripletStats, n_pos_pairs: int, has_neg: bool) -> str:
    if stats.batch_size == 0:
        return "empty batch"
    if stats.n_classes <= 1:
        return "only one class in the batch: no negatives"
    if n_pos_pairs == 0:
        return "no positive pairs (every label occurs once in the batch)"
    if not has_neg:
        return "no anchor has both a positive and a negative"
    return ""


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def _masks(
    labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool, rows: slice | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    la = labels if rows is None else labels[rows]
    same = la[:, None] == ref_labels[None, :]
    neg = ~same
    if exclude_self:
        start = 0 if rows is None else (rows.start or 0)
        n = la.shape[0]
        ar = torch.arange(n, device=labels.device)
        cols = ar + start
        ok = cols < ref_labels.shape[0]
        same[ar[ok], cols[ok]] = False
    return same, neg


def _row_chunks(b: int, r: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMS // max(r, 1))
    return [slice(s, min(b, s + step)) for s in range(0, b, step)]


# --------------------------------------------------------------------------------------------
# batch-all: exact, O(B^2) memory, custom autograd
# --------------------------------------------------------------------------------------------


def _positive_slots(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices of each row's positives, left-aligned in a (rows, P) table.

    ``P`` is the largest number of positives of a row (``K - 1`` for a PK batch); ``valid`` marks
    the real entries. Built from ``nonzero`` (row-major), so no sort of the (rows, R) mask.
    """
    rows = pos.shape[0]
    n_pos = pos.sum(dim=1)
    width = max(int(n_pos.max()), 1) if rows else 1
    r_idx, c_idx = pos.nonzero(as_tuple=True)
    first = n_pos.cumsum(0) - n_pos
    rank = torch.arange(r_idx.numel(), device=pos.device) - first[r_idx]
    slots = torch.zeros(rows, width, dtype=torch.long, device=pos.device)
    slots[r_idx, rank] = c_idx
    valid = torch.arange(width, device=pos.device)[None, :] < n_pos[:, None]
    return slots, valid


# Up to this many positives per anchor, counts are taken with one vectorised comparison per
# positive (uint8 accumulators); beyond it, with ``searchsorted`` on each anchor's sorted ones.
_DIRECT_SLOTS = 24


def _same_and_slots(labels, ref_labels, exclude_self, rows):
    """``same`` (rows, R): y_a == y_r, self included (so ``~same`` is exactly the negatives),
    and the positive slot table (self excluded)."""
    la = labels[rows]
    same = la[:, None] == ref_labels[None, :]
    r_idx, c_idx = same.nonzero(as_tuple=True)
    if exclude_self:
        keep = c_idx != r_idx + rows.start
        r_idx, c_idx = r_idx[keep], c_idx[keep]
    n = la.shape[0]
    n_pos = torch.bincount(r_idx, minlength=n) if n else torch.zeros(0, dtype=torch.long)
    width = max(int(n_pos.max()), 1) if n else 1
    first = n_pos.cumsum(0) - n_pos
    rank = torch.arange(r_idx.numel(), device=same.device) - first[r_idx]
    slots = torch.zeros(n, width, dtype=torch.long, device=same.device)
    slots[r_idx, rank] = c_idx
    valid = torch.arange(width, device=same.device)[None, :] < n_pos[:, None]
    return same, slots, valid


def _count_at_or_below(sorted_thr: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``j[a, n] = #{q : sorted_thr[a, q] <= d[a, n]}`` as a float tensor of d's dtype."""
    width = sorted_thr.shape[1]
    if width <= _DIRECT_SLOTS:
        j = torch.zeros(d.shape, dtype=torch.uint8, device=d.device)
        for q in range(width):
            j += d >= sorted_thr[:, q : q + 1]
        return j.to(d.dtype)
    return torch.searchsorted(sorted_thr, d.contiguous(), side="right").to(d.dtype)


def _hinge_all_chunk(d: torch.Tensor, same, slots, valid, margin: float):
    """Sorted positive thresholds ``t = d_ap + margin`` of each anchor row (rows, P), their sort
    permutation, ``j`` (rows, R) = #thresholds <= d(a, n) for negatives (P elsewhere), and
    ``c`` (rows, P) = #negatives below each sorted threshold.

    For a negative n of anchor a, ``P - j`` thresholds lie strictly above ``d(a, n)``: that many
    triplets (a, ., n) are active; the summed loss is ``sum_q c_q t_q - sum_n (P - j_n) d_an``.
    """
    ninf = torch.tensor(-float("inf"), dtype=d.dtype, device=d.device)
    thr = torch.where(valid, d.gather(1, slots) + margin, ninf)
    sthr, perm = thr.sort(dim=1)
    width = sthr.shape[1]
    j = _count_at_or_below(sthr, d).masked_fill_(same, float(width))
    # c_q = #{n : j_n <= q}: a histogram of j per row, then a running sum
    hist = torch.zeros(d.shape[0], width + 1, dtype=d.dtype, device=d.device)
    hist.scatter_add_(1, j.long(), torch.ones(1, 1, dtype=d.dtype, device=d.device).expand_as(j))
    c = hist.cumsum(dim=1)[:, :width]
    return sthr, perm, j, c


class _BatchAllHinge(torch.autograd.Function):
    """Sum of max(0, d_ap - d_an + m) over all valid triplets, with its exact gradient.

    Per anchor the positive thresholds are sorted (P of them) and every negative is located among
    them: O(B² P) (small P) or O(B² log P) time, O(B²) memory, no triplet is enumerated.
    """

    @staticmethod
    def forward(ctx, dist, labels, ref_labels, exclude_self, margin):  # noqa: D102
        b, r = dist.shape
        total = torch.zeros((), dtype=torch.float64, device=dist.device)
        n_active = torch.zeros((), dtype=torch.float64, device=dist.device)
        for rows in _row_chunks(b, r):
            same, slots, valid = _same_and_slots(labels, ref_labels, exclude_self, rows)
            d = dist[rows]
            sthr, _, j, c = _hinge_all_chunk(d, same, slots, valid, margin)
            cnt = j.neg_().add_(sthr.shape[1])  # active triplets per (anchor, negative)
            finite = torch.where(torch.isfinite(sthr), sthr, 0.0)
            total += (c * finite).sum(dim=1, dtype=torch.float64).sum()
            total -= (cnt * d).sum(dim=1).double().sum()
            n_active += cnt.sum(dim=1).double().sum()
        ctx.save_for_backward(dist, labels, ref_labels)
        ctx.exclude_self = exclude_self
        ctx.margin = margin
        n_active = n_active.round().long()
        ctx.mark_non_differentiable(n_active)
        return total.to(dist.dtype), n_active

    @staticmethod
    def backward(ctx, grad_total, _grad_count):  # noqa: D102
        dist, labels, ref_labels = ctx.saved_tensors
        grad = torch.empty_like(dist)
        b, r = dist.shape
        for rows in _row_chunks(b, r):
            same, slots, valid = _same_and_slots(labels, ref_labels, ctx.exclude_self, rows)
            _, perm, j, c = _hinge_all_chunk(dist[rows], same, slots, valid, ctx.margin)
            g = grad[rows]
            # dL/d(a, n) = -#{p : d_an < d_ap + m}
            torch.sub(j, float(perm.shape[1]), out=g)
            # dL/d(a, p) = #{n : d_an < d_ap + m}
            c_slot = torch.zeros_like(c).scatter_(1, perm, c)
            g.scatter_add_(1, slots, c_slot * valid)
        return grad.mul_(grad_total), None, None, None, None


def _soft_all_chunk(d, neg, slots, valid):
    d_ap = d.gather(1, slots).masked_fill(~valid, -float("inf"))  # (rows, P)
    d_an = d.masked_fill(~neg, float("inf"))  # (rows, R)
    return d_ap[:, :, None] - d_an[:, None, :]  # (rows, P, R), -inf where invalid


def _soft_row_chunks(labels, ref_labels, exclude_self, b, r):
    """Row chunks sized so that (rows x max_positives x R) stays bounded."""
    n_pos = (
        torch.cat(
            [
                _masks(labels, ref_labels, exclude_self, rows)[0].sum(dim=1)
                for rows in _row_chunks(b, r)
            ]
        )
        if b
        else torch.zeros(0, dtype=torch.long)
    )
    chunks = []
    start = 0
    n_pos_l = n_pos.tolist()
    while start < b:
        width = max(n_pos_l[start], 1)
        end = start + 1
        while end < b:
            w = max(width, n_pos_l[end])
            if (end - start + 1) * w * max(r, 1) > _CHUNK_ELEMS:
                break
            width = w
            end += 1
        chunks.append(slice(start, end))
        start = end
    return chunks


class _BatchAllSoft(torch.autograd.Function):
    """Sum of softplus(d_ap - d_an) over all valid triplets; exact, recomputed in backward.

    The soft margin has no prefix-sum shortcut, so this is O(B * P * R) time (P = positives per
    anchor, K - 1 for a PK batch) but only O(B * R) memory.
    """

    @staticmethod
    def forward(ctx, dist, labels, ref_labels, exclude_self):  # noqa: D102
        b, r = dist.shape
        total = torch.zeros((), dtype=torch.float64, device=dist.device)
        n_active = torch.zeros((), dtype=torch.int64, device=dist.device)
        for rows in _soft_row_chunks(labels, ref_labels, exclude_self, b, r):
            pos, neg = _masks(labels, ref_labels, exclude_self, rows)
            slots, valid = _positive_slots(pos)
            sp = F.softplus(_soft_all_chunk(dist[rows], neg, slots, valid))
            total += sp.sum(dtype=torch.float64)
            n_active += (sp > 0).sum()
        ctx.save_for_backward(dist, labels, ref_labels)
        ctx.exclude_self = exclude_self
        ctx.mark_non_differentiable(n_active)
        return total.to(dist.dtype), n_active

    @staticmethod
    def backward(ctx, grad_total, _grad_count):  # noqa: D102
        dist, labels, ref_labels = ctx.saved_tensors
        grad = torch.zeros_like(dist)
        b, r = dist.shape
        for rows in _soft_row_chunks(labels, ref_labels, ctx.exclude_self, b, r):
            pos, neg = _masks(labels, ref_labels, ctx.exclude_self, rows)
            slots, valid = _positive_slots(pos)
            sig = torch.sigmoid(_soft_all_chunk(dist[rows], neg, slots, valid))
            g = -sig.sum(dim=1)
            g.scatter_add_(1, slots, sig.sum(dim=2) * valid)
            grad[rows] = g
        return grad * grad_total, None, None, None


def _all_triplet_moments(dist, labels, ref_labels, exclude_self) -> dict[str, torch.Tensor]:
    """Counts and distance sums over all valid triplets, without enumerating them.

    ``n_triplets = sum_a P_a N_a``, ``sum d_ap = sum_a N_a sum_p d_ap``,
    ``sum d_an = sum_a P_a sum_n d_an`` (P_a positives, N_a negatives of anchor a).
    """
    b, r = dist.shape
    acc = {
        k: torch.zeros((), dtype=torch.float64, device=dist.device)
        for k in ("n_triplets", "sum_d_ap", "sum_d_an", "n_positive_pairs", "n_anchors", "sum_dist")
    }
    with torch.no_grad():
        for rows in _row_chunks(b, r):
            same, slots, valid = _same_and_slots(labels, ref_labels, exclude_self, rows)
            d = dist[rows]
            n_pos = valid.sum(dim=1).double()
            n_neg = (r - torch.count_nonzero(same, dim=1)).double()
            row_sum = d.sum(dim=1).double()
            ap_sum = (d.gather(1, slots) * valid).sum(dim=1).double()
            same_sum = ap_sum
            if exclude_self:  # the anchor itself is "same" but not a positive
                ar = torch.arange(d.shape[0], device=d.device)
                cols = ar + rows.start
                inside = cols < r
                self_d = torch.zeros_like(row_sum)
                self_d[inside] = d[ar[inside], cols[inside]].double()
                same_sum = same_sum + self_d
            acc["n_triplets"] += (n_pos * n_neg).sum()
            acc["sum_d_ap"] += (ap_sum * n_neg).sum()
            acc["sum_d_an"] += ((row_sum - same_sum) * n_pos).sum()
            acc["n_positive_pairs"] += n_pos.sum()
            acc["n_anchors"] += ((n_pos > 0) & (n_neg > 0)).sum()
            acc["sum_dist"] += row_sum.sum()
    return acc


def batch_all_triplet_loss(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    *,
    margin: float = 0.2,
    soft_margin: bool = False,
    reduction: str = "mean_active",
    exclude_self: bool | None = None,
) -> tuple[torch.Tensor, TripletStats]:
    """Batch-all triplet loss on a distance matrix, exact, O(B²) memory.

    ``L = reduce({l(a, p, n) : y_a == y_p != y_n, a != p})`` with the hinge
    ``l = max(0, d_ap - d_an + margin)`` or the soft margin ``l = softplus(d_ap - d_an)``.

    Args:
        dist: (B, R) distances from the anchors (rows) to the reference items (columns).
        labels: (B,) integer labels of the anchors.
        ref_labels: (R,) labels of the columns; default ``labels`` (the batch against itself).
        margin: hinge margin (ignored with ``soft_margin``).
        soft_margin: use ``softplus(d_ap - d_an)`` instead of the hinge.
        reduction: ``mean`` (over all valid triplets), ``mean_active`` (over loss > 0), ``sum``.
        exclude_self: drop the pairs (i, i); default True when ``ref_labels`` is None.

    Returns:
        ``(loss, stats)``.
    """
    ref_labels, exclude_self = _resolve_ref(labels, ref_labels, exclude_self)
    m = _all_triplet_moments(dist, labels, ref_labels, exclude_self)
    b, r = dist.shape
    n_pairs = b * r - (min(b, r) if exclude_self else 0)
    stats = TripletStats(
        n_triplets=m["n_triplets"].round().long(),
        sum_d_ap=m["sum_d_ap"],
        sum_d_an=m["sum_d_an"],
        n_positive_pairs=int(m["n_positive_pairs"]),
        n_anchors=int(m["n_anchors"]),
        mean_distance=m["sum_dist"] / max(n_pairs, 1),
        batch_size=b,
        n_classes=torch.unique(torch.cat([labels, ref_labels])).numel() if b + r else 0,
    )
    n_trip = stats.n_triplets
    if soft_margin:
        total, n_active = _BatchAllSoft.apply(dist, labels, ref_labels, exclude_self)
    else:
        total, n_active = _BatchAllHinge.apply(dist, labels, ref_labels, exclude_self, margin)
    stats.n_active = n_active
    if int(n_trip) == 0:
        stats.reason = _zero_reason(stats, stats.n_positive_pairs, stats.n_anchors > 0)
    loss = _reduce_total(total, n_trip, n_active, reduction)
    return loss, stats


def _reduce_total(total, n_trip, n_active, reduction):
    # ``total`` comes out of a custom autograd Function, so it keeps the graph even when 0
    if reduction == "sum":
        return total
    denom = n_trip if reduction == "mean" else n_active
    return total / denom.to(total.dtype).clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# miners that return explicit (a, p, n) triplets
# --------------------------------------------------------------------------------------------


def _resolve_ref(labels, ref_labels, exclude_self):
    if ref_labels is None:
        return labels, True if exclude_self is None else exclude_self
    return ref_labels, False if exclude_self is None else exclude_self


def _empty_triplets(device) -> IndexTuple:
    e = torch.empty(0, dtype=torch.long, device=device)
    return e, e.clone(), e.clone()


def _cat_triplets(out_a: list, out_p: list, out_n: list, device) -> IndexTuple:
    if not out_a:
        return _empty_triplets(device)
    return torch.cat(out_a), torch.cat(out_p), torch.cat(out_n)


def _semihard_slots(d, neg, d_ap):
    """Per (row, slot): index of the closest negative with d_an > d_ap, and whether one exists."""
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    rows, width = d_ap.shape
    if width <= _DIRECT_SLOTS:
        idx = torch.empty(rows, width, dtype=torch.long, device=d.device)
        found = torch.empty(rows, width, dtype=torch.bool, device=d.device)
        for q in range(width):
            cand = torch.where(neg & (d > d_ap[:, q : q + 1]), d, inf)
            val, arg = cand.min(dim=1)
            idx[:, q] = arg
            found[:, q] = torch.isfinite(val)
        return idx, found
    sneg, order = torch.where(neg, d, inf).sort(dim=1, stable=True)
    jj = torch.searchsorted(sneg, d_ap.contiguous(), side="right")
    found = jj < neg.sum(dim=1, keepdim=True)
    return order.gather(1, jj.clamp_max(d.shape[1] - 1)), found


def _per_pair_negatives(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    exclude_self: bool,
    strategy: str,
    margin: float,
    fallback: str,
    generator: torch.Generator | None,
    cutoff: float,
    nonzero_loss_cutoff: float,
    dim: int | None,
) -> IndexTuple:
    """One negative per positive pair, chosen by ``strategy`` (row chunks, O(B²) memory)."""
    b, r = dist.shape
    out_a, out_p, out_n = [], [], []
    inf = float("inf")
    for rows in _row_chunks(b, r):
        pos, neg = _masks(labels, ref_labels, exclude_self, rows)
        if not bool(pos.any()):
            continue
        d = dist[rows]
        slots, valid = _positive_slots(pos)
        width = slots.shape[1]
        has_neg = neg.any(dim=1, keepdim=True)
        keep = valid & has_neg
        if strategy == "semihard":
            nn, found = _semihard_slots(d, neg, d.gather(1, slots))
            if fallback == "easiest":  # farthest negative (TF-Addons)
                far = torch.where(neg, d, -inf).argmax(dim=1, keepdim=True)
                nn = torch.where(found, nn, far)
            else:
                keep = keep & found
        elif strategy == "hardest-negative":
            nn = torch.where(neg, d, inf).argmin(dim=1, keepdim=True).expand(-1, width)
        elif strategy == "random":
            # the k-th negative of a row (1-based) is the first column whose running count is k
            cum = neg.cumsum(dim=1)
            n_neg = cum[:, -1:]
            u = torch.rand(d.shape[0], width, generator=generator, dtype=torch.float64)
            k = (u.to(d.device) * n_neg).long().clamp_max((n_neg - 1).clamp_min(0)) + 1
            nn = torch.searchsorted(cum, k).clamp_max(r - 1)
        elif strategy == "distance-weighted":
            w = distance_weighted_probabilities(
                d, neg, dim=dim, cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff
            )
            safe = torch.where(has_neg, w, torch.ones_like(w)).cpu().double()
            nn = torch.multinomial(safe, width, replacement=True, generator=generator)
            nn = nn.to(d.device)
        else:  # pragma: no cover - guarded by the caller
            raise InputError(f"strategy {strategy!r} does not mine one negative per pair")
        a = torch.arange(rows.start, rows.stop, device=d.device)[:, None].expand(-1, width)
        out_a.append(a[keep])
        out_p.append(slots[keep])
        out_n.append(nn[keep])
    return _cat_triplets(out_a, out_p, out_n, dist.device)


def distance_weighted_probabilities(
    dist: torch.Tensor,
    neg_mask: torch.Tensor,
    *,
    dim: int | None,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> torch.Tensor:
    """Sampling probabilities of Wu et al. (2017) for each anchor row over its negatives.

    ``log w(d) = (2 - D) log d - (D - 3)/2 log(1 - d²/4)`` with ``d`` clipped to ``>= cutoff``;
    negatives with ``d >= nonzero_loss_cutoff`` (and non-negatives) get 0; rows are normalised to
    sum to 1, and a row whose weights are all 0 becomes uniform over its negatives. Meant for
    euclidean distances between L2-normalised embeddings (distances in [0, 2]).
    """
    if dim is None:
        raise InputError("distance-weighted sampling needs the embedding dimension")
    with torch.no_grad():
        d = dist.detach().double().clamp_min(cutoff)
        one_minus = (1.0 - 0.25 * d * d).clamp_min(1e-8)
        log_w = (2.0 - dim) * torch.log(d) - ((dim - 3) / 2.0) * torch.log(one_minus)
        ok = neg_mask & (dist.detach() < nonzero_loss_cutoff)
        log_w = log_w.masked_fill(~ok, -float("inf"))
        row_max = log_w.max(dim=1, keepdim=True).values
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        w = torch.exp(log_w - row_max)
        s = w.sum(dim=1, keepdim=True)
        uniform = neg_mask.double()
        w = torch.where(s > 0, w / s.clamp_min(1e-300), uniform / uniform.sum(1, True).clamp_min(1))
    return w.to(dist.dtype)


def _per_anchor_triplets(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    exclude_self: bool,
    strategy: str,
) -> IndexTuple:
    """One triplet per anchor: batch-hard or easy-positive."""
    b, r = dist.shape
    out_a, out_p, out_n = [], [], []
    inf = float("inf")
    for rows in _row_chunks(b, r):
        pos, neg = _masks(labels, ref_labels, exclude_self, rows)
        d = dist[rows]
        if strategy == "hard":
            p = torch.where(pos, d, -inf).argmax(dim=1)
        else:  # easy-positive
            p = torch.where(pos, d, inf).argmin(dim=1)
        n = torch.where(neg, d, inf).argmin(dim=1)
        keep = pos.any(dim=1) & neg.any(dim=1)
        a = torch.arange(rows.start, rows.stop, device=dist.device)
        out_a.append(a[keep])
        out_p.append(p[keep])
        out_n.append(n[keep])
    return _cat_triplets(out_a, out_p, out_n, dist.device)


def _all_triplets(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    exclude_self: bool,
    margin: float | None,
    max_triplets: int | None,
    generator: torch.Generator | None,
) -> IndexTuple:
    """Every valid triplet (or, with ``margin``, every one with loss > 0), optionally capped.

    Per positive pair the qualifying negatives are a prefix of the anchor's sorted negatives, so
    the triplets are produced from counts and offsets; with ``max_triplets`` a uniform random
    subset (without replacement) is drawn from the global numbering without materialising all.
    """
    b, r = dist.shape
    pa_l, pp_l, cnt_l, order_l = [], [], [], []
    inf = float("inf")
    for rows in _row_chunks(b, r):
        pos, neg = _masks(labels, ref_labels, exclude_self, rows)
        d = dist[rows]
        sneg, order = torch.where(neg, d, inf).sort(dim=1)
        pa, pp = pos.nonzero(as_tuple=True)
        if margin is None:
            cnt = neg.sum(dim=1)[pa]
        else:
            cnt = torch.searchsorted(sneg, (d + margin).contiguous(), side="left")[pa, pp]
        keep = cnt > 0
        pa_l.append(pa[keep] + rows.start)
        pp_l.append(pp[keep])
        cnt_l.append(cnt[keep])
        order_l.append((rows.start, order))
    if not pa_l:
        return _empty_triplets(dist.device)
    pa, pp, cnt = torch.cat(pa_l), torch.cat(pp_l), torch.cat(cnt_l)
    total = int(cnt.sum())
    if total == 0:
        return _empty_triplets(dist.device)
    ends = cnt.cumsum(0)
    if max_triplets is None and total > _LARGE_TRIPLET_COUNT:
        warnings.warn(
            f"the 'all' miner is materialising {total:,} triplets "
            f"(~{3 * 8 * total / 2**30:.1f} GiB of indices); pass max_triplets= to subsample, or "
            "use TripletLoss(strategy='all'), which never enumerates them",
            stacklevel=3,
        )
    if max_triplets is not None and total > max_triplets:
        t = _sample_without_replacement(total, max_triplets, generator).to(dist.device)
        pair = torch.searchsorted(ends, t, side="right")
        offset = t - (ends[pair] - cnt[pair])
    else:
        pair = torch.repeat_interleave(torch.arange(pa.shape[0], device=dist.device), cnt)
        offset = torch.arange(total, device=dist.device) - (ends - cnt)[pair]
    a = pa[pair]
    p = pp[pair]
    n = torch.empty_like(a)
    for start, order in order_l:
        sel = (a >= start) & (a < start + order.shape[0])
        n[sel] = order[a[sel] - start, offset[sel]]
    return a, p, n


def _sample_without_replacement(
    total: int, k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """k distinct sorted integers drawn uniformly from range(total), memory O(k)."""
    if total <= 4 * k or total < (1 << 24):
        return torch.randperm(total, generator=generator)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        extra = torch.randint(0, total, (2 * (k - chosen.numel()) + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, extra]))
    keep = torch.randperm(chosen.numel(), generator=generator)[:k]
    return chosen[keep].sort().values


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
    ``all`` with a ``margin`` only triplets with loss > 0 are returned (as pytorch-metric-learning's
    ``TripletMarginMiner(type_of_triplets="all")`` does); ``margin=None`` returns every valid
    triplet. ``max_triplets`` caps the output with a uniform random subset (``all`` can produce
    O(B³) triplets; the loss itself never enumerates them).
    """
    _check_options(strategy, margin or 0.0, False, "mean", semihard_fallback)
    ref_labels, exclude_self = _resolve_ref(labels, ref_labels, exclude_self)
    with torch.no_grad():
        dist = dist.detach()
        if strategy == "all":
            return _all_triplets(
                dist, labels, ref_labels, exclude_self, margin, max_triplets, generator
            )
        if strategy in ("hard", "easy-positive"):
            return _per_anchor_triplets(dist, labels, ref_labels, exclude_self, strategy)
        return _per_pair_negatives(
            dist,
            labels,
            ref_labels,
            exclude_self,
            strategy,
            margin or 0.0,
            semihard_fallback,
            generator,
            cutoff,
            nonzero_loss_cutoff,
            dim,
        )


# --------------------------------------------------------------------------------------------
# losses on explicit triplets
# --------------------------------------------------------------------------------------------


def reduce_triplet_losses(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-triplet losses: ``mean``, ``mean_active`` (over losses > 0) or ``sum``.

    An empty input (or no active triplet for ``mean_active``) gives 0 with a gradient path.
    """
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / max(losses.numel(), 1)
    n_active = (losses > 0).sum().clamp_min(1)
    return losses.sum() / n_active.to(losses.dtype)


def _triplet_terms(d_ap, d_an, margin, soft_margin):
    if soft_margin:
        return F.softplus(d_ap - d_an)
    return F.relu(d_ap - d_an + margin)


def triplet_loss_on_indices(
    dist: torch.Tensor,
    indices_tuple: IndexTuple,
    *,
    margin: float = 0.2,
    soft_margin: bool = False,
    reduction: str = "mean",
) -> tuple[torch.Tensor, TripletStats]:
    """Loss of the given triplets, reading d(a, p) and d(a, n) from a (B, R) distance matrix."""
    a, p, n = _check_indices(indices_tuple, dist.shape[0], dist.shape[1])
    d_ap = dist[a, p]
    d_an = dist[a, n]
    losses = _triplet_terms(d_ap, d_an, margin, soft_margin)
    stats = TripletStats(
        n_triplets=a.numel(),
        n_active=(losses > 0).sum(),
        sum_d_ap=d_ap.detach().sum(),
        sum_d_an=d_an.detach().sum(),
        n_anchors=int(torch.unique(a).numel()),
    )
    return reduce_triplet_losses(losses, reduction), stats


def _check_indices(indices_tuple, n_rows: int, n_cols: int) -> IndexTuple:
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) != 3:
        raise InputError("indices_tuple must be a tuple (anchors, positives, negatives)")
    out = []
    for name, t, bound in zip(
        ("anchors", "positives", "negatives"), indices_tuple, (n_rows, n_cols, n_cols), strict=True
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise InputError(f"indices_tuple {name} must be a 1-D tensor")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise InputTypeError(f"indices_tuple {name} must be integer, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise InputError(f"indices_tuple {name} out of range [0, {bound})")
        out.append(t.long())
    if not (out[0].shape == out[1].shape == out[2].shape):
        raise InputError("anchors, positives and negatives must have the same length")
    return out[0], out[1], out[2]


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
    ``eps`` added to the difference (identical rows are at distance exactly 0).
    """
    _check_options(None, margin, soft_margin, reduction, "easiest")
    for name, t in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        _check_embeddings(t, name)
    if not (anchor.shape == positive.shape == negative.shape):
        raise InputError(
            f"anchor, positive and negative must have equal shapes, got {tuple(anchor.shape)}, "
            f"{tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    d_ap = paired_distance(anchor, positive, distance)
    d_an = paired_distance(anchor, negative, distance)
    return reduce_triplet_losses(_triplet_terms(d_ap, d_an, margin, soft_margin), reduction)


# --------------------------------------------------------------------------------------------
# the whole loss: strategy dispatch
# --------------------------------------------------------------------------------------------


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
    """Batch-hard loss (Hermans et al. 2017): ``mean_a l(max_p d(a,p), min_n d(a,n))``.

    Anchors without a positive or without a negative are left out.
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

    ``reduction=None`` means ``mean_active`` for ``all`` and ``mean`` otherwise.
    """
    if reduction is None:
        reduction = "mean_active" if strategy == "all" else "mean"
    _check_options(strategy, margin, soft_margin, reduction, semihard_fallback)
    _check_labels(labels, dist.shape[0], "labels")
    if ref_labels is not None:
        _check_labels(ref_labels, dist.shape[1], "ref_labels")
    ref_l, excl = _resolve_ref(labels, ref_labels, exclude_self)
    if indices_tuple is None and strategy == "all":
        return batch_all_triplet_loss(
            dist,
            labels,
            ref_labels,
            margin=margin,
            soft_margin=soft_margin,
            reduction=reduction,
            exclude_self=exclude_self,
        )
    facts = _batch_facts(dist, labels, ref_l, excl)
    if indices_tuple is None:
        indices_tuple = mine_from_distances(
            dist,
            labels,
            ref_labels,
            strategy=strategy,
            margin=margin,
            semihard_fallback=semihard_fallback,
            exclude_self=exclude_self,
            generator=generator,
            dim=dim,
        )
    loss, stats = triplet_loss_on_indices(
        dist, indices_tuple, margin=margin, soft_margin=soft_margin, reduction=reduction
    )
    stats.mean_distance = facts.mean_distance
    stats.batch_size, stats.n_classes = facts.batch_size, facts.n_classes
    if stats.n_triplets == 0:
        with torch.no_grad():
            pos, neg = _masks(labels, ref_l, excl)
            n_pos = int(pos.sum())
            has = bool((pos.any(1) & neg.any(1)).any())
        stats.n_positive_pairs = n_pos
        stats.reason = _zero_reason(stats, n_pos, has) or (
            "no semi-hard negative for any positive pair (semihard_fallback='drop')"
            if strategy == "semihard"
            else "no triplets"
        )
    return loss, stats


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

    See the module docstring for the strategies and :class:`tripletlab.TripletLoss` for the
    module form. With ``ref_embeddings``/``ref_labels`` the anchors come from ``embeddings`` and the
    positives and negatives from the reference set (a memory bank or a gathered global batch).
    """
    check_distance_name(distance)
    if reduction is None:
        reduction = "mean_active" if strategy == "all" else "mean"
    _check_options(strategy, margin, soft_margin, reduction, semihard_fallback)
    check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    dist = pairwise_distance(embeddings, ref_embeddings, distance)
    return triplet_loss_from_distances(
        dist,
        labels,
        ref_labels,
        strategy=strategy,
        margin=margin,
        soft_margin=soft_margin,
        reduction=reduction,
        semihard_fallback=semihard_fallback,
        generator=generator,
        dim=embeddings.shape[1],
        indices_tuple=indices_tuple,
    )


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

    Example:
        >>> import torch
        >>> from tripletlab import mine_triplets
        >>> emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
        >>> a, p, n = mine_triplets(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), strategy="hard")
        >>> a.shape
        torch.Size([8])
    """
    check_distance_name(distance)
    check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    with torch.no_grad():
        dist = pairwise_distance(
            embeddings.detach(),
            None if ref_embeddings is None else ref_embeddings.detach(),
            distance,
        )
    return mine_from_distances(
        dist,
        labels,
        ref_labels,
        strategy=strategy,
        margin=margin,
        semihard_fallback=semihard_fallback,
        max_triplets=max_triplets,
        generator=generator,
        dim=embeddings.shape[1],
    )
