"""Batch-all: the loss over every valid triplet, exact, in O(B²) memory (custom autograd).

Hinge (``max(0, d_ap - d_an + margin)``): for each anchor the positive thresholds
``t = d(a, p) + margin`` are sorted once (P of them; ``K - 1`` for a PK batch). A negative n is
active with the ``P - j`` thresholds above it, ``j = #{t <= d(a, n)}``, and the ``c_q`` negatives
below the q-th sorted threshold give its summed loss ``c_q t_q``; so

``L = sum_q c_q t_q - sum_n (P - j_n) d(a, n)``, ``∂L/∂d(a, p) = c(a, p)``,
``∂L/∂d(a, n) = -#{p : d(a, n) < d(a, p) + margin}``:

O(B² P) (small P) or O(B² log P) time, O(B²) memory, no triplet is enumerated; sums are
accumulated in float64. The soft margin (``softplus(d_ap - d_an)``) has no such shortcut: it is
O(B · P · R) time in row chunks, O(B · R) memory, recomputed in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as _knobs  # tuning knobs are read from the package at call time
from .checks import check_distances, check_options
from .dense import is_small
from .reductions import reduce_total
from .slots import iter_label_slots, label_slots, resolve_ref, row_chunks
from .stats import TripletStats, n_classes, n_pairs, zero_reason

_KEEP_FLOAT_COUNTS = 1 << 24  # up to this many distances the backward's counts stay float


def _count_at_or_below(sorted_thr: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``j[a, n] = #{q : sorted_thr[a, q] <= d[a, n]}``: uint8 for few thresholds, else int64."""
    width = sorted_thr.shape[1]
    if width <= _knobs._DIRECT_SLOTS:
        j = torch.zeros(d.shape, dtype=torch.uint8, device=d.device)
        for q in range(width):
            j += d >= sorted_thr[:, q : q + 1]
        return j
    return torch.searchsorted(sorted_thr, d.contiguous(), side="right")


def _hinge_all_chunk(d: torch.Tensor, same, slots, valid, margin: float):
    """Sorted positive thresholds ``t = d_ap + margin`` of each anchor row (rows, P), their sort
    permutation, ``j`` (rows, R) = #thresholds <= d(a, n) for negatives (P elsewhere; an integer
    tensor), and ``c`` (rows, P) = #negatives below each sorted threshold (d's dtype)."""
    ninf = torch.tensor(-float("inf"), dtype=d.dtype, device=d.device)
    thr = torch.where(valid, d.gather(1, slots) + margin, ninf)
    sthr, perm = thr.sort(dim=1)
    width = sthr.shape[1]
    j = _count_at_or_below(sthr, d).masked_fill_(same, width)
    if width <= _knobs._DIRECT_SLOTS:  # c_q = #{n : j_n <= q}: P byte comparisons per row
        le = torch.empty(j.shape, dtype=torch.bool, device=d.device)
        c = torch.empty(d.shape[0], width, dtype=d.dtype, device=d.device)
        for q in range(width):
            c[:, q] = torch.le(j, q, out=le).sum(dim=1, dtype=torch.int32)
        return sthr, perm, j, c
    # many thresholds: a histogram of j per row, then a running sum
    hist = torch.zeros(d.shape[0], width + 1, dtype=d.dtype, device=d.device)
    hist.scatter_add_(1, j, torch.ones(1, 1, dtype=d.dtype, device=d.device).expand(j.shape))
    return sthr, perm, j, hist.cumsum(dim=1)[:, :width]


def _hinge_direct_chunk(d: torch.Tensor, s, margin: float):
    """Few thresholds (P <= ``_DIRECT_SLOTS``): the thresholds ``t = d_ap + margin`` (rows, P),
    unsorted, ``cnt`` (rows, R) = #{p : d(a, n) < t_p} on the negatives (0 on the anchor's own
    class) and ``c`` (rows, P) = #{negatives n : d(a, n) < t_p}, both in d's dtype.

    The indicator is ``max(sign(t_p - d), 0)`` in floating point over whole rows (float kernels
    vectorise; comparisons that write booleans do not): exact, because the difference of two
    floats is positive exactly when the first is larger (gradual underflow), and ``t = -inf``
    on empty slots gives -inf, i.e. inactive. The anchor's own class (its P positive slots and,
    with ``exclude_self``, itself) is then taken out of both counts from the (rows, P) gathered
    distances, without a (rows, R) mask.
    """
    slots, valid = s.slots, s.valid
    ninf = torch.tensor(-float("inf"), dtype=d.dtype, device=d.device)
    d_ap = d.gather(1, slots)
    thr = torch.where(valid, d_ap + margin, ninf)
    cnt = torch.zeros_like(d)
    act = torch.empty_like(d)
    c = torch.empty_like(thr)
    for p in range(thr.shape[1]):
        torch.sub(thr[:, p : p + 1], d, out=act).sign_().clamp_min_(0.0)
        c[:, p] = act.sum(dim=1)
        cnt += act
    # the positives counted above: c_p -= #{valid q : d_aq < t_p}; cnt = 0 on the slots
    inside = (d_ap[:, None, :] < thr[:, :, None]) & valid[:, None, :]  # (rows, P, P)
    c -= inside.sum(dim=2).to(d.dtype)
    cnt.scatter_add_(1, slots, -(cnt.gather(1, slots) * valid))
    if s.exclude_self:  # the anchor itself: (i, rows.start + i) where that column exists
        own = s.own_label_at_self().to(d.dtype)  # 1 where it is of the anchor's own class
        self_d = d.diagonal(s.rows.start)
        n_self = self_d.shape[0]
        c[:n_self] -= (self_d[:, None] < thr[:n_self]).to(d.dtype) * own[:, None]
        cnt.diagonal(s.rows.start).mul_(1.0 - own)
    return thr, cnt, c


def _hinge_sum(dist, labels, ref_labels, exclude_self, margin, moments=None, cache=None):
    """Sum of max(0, d_ap - d_an + m) over all valid triplets and the number of active ones;
    with a ``moments`` tensor, :func:`_chunk_moments` accumulates into it in the same pass; with a
    ``cache`` list, each chunk's small (rows, P) results ``(sorted thresholds, perm, c)`` are
    appended for the backward (O(B P) memory)."""
    total = torch.zeros((), dtype=torch.float64, device=dist.device)
    n_active = torch.zeros((), dtype=torch.float64, device=dist.device)
    small = is_small(*dist.shape)
    for s in iter_label_slots(labels, ref_labels, exclude_self):
        d = dist[s.rows]
        if moments is not None:
            _chunk_moments(moments, d, s, exclude_self)
        # few positives in a large matrix: count directly (small ones: fewer kernels sorted)
        if s.slots.shape[1] <= _knobs._DIRECT_SLOTS and d.numel() > _knobs._SMALL_ELEMS:
            thr, cnt, c = _hinge_direct_chunk(d, s, margin)
            if cache is not None:  # the backward only reads the counts (<= P: exact in uint8)
                kept = cnt if dist.numel() <= _KEEP_FLOAT_COUNTS else cnt.to(torch.uint8)
                cache.append(("direct", kept, c, s if small else None))
            cnt = cnt * d
        else:
            thr, perm, j, c = _hinge_all_chunk(d, s.same, s.slots, s.valid, margin)
            if cache is not None:  # small problems keep the slot table too (no rebuild)
                cache.append((thr, perm, c, s if small else None))
            # active triplets per (anchor, negative): P - j (0 where j = P: positives, anchor)
            cnt = j.to(d.dtype).neg_().add_(thr.shape[1]).mul_(d)
        finite = torch.where(torch.isfinite(thr), thr, 0.0)
        total += (c * finite).sum(dim=1, dtype=torch.float64).sum()
        total -= cnt.sum(dim=1).double().sum()
        n_active += c.sum(dim=1, dtype=torch.float64).sum()  # sum_q c_q = sum_n (P - j_n)
    return total, n_active.round().long()  # a float64 sum of exact counts


def _hinge_grad(dist, labels, ref_labels, exclude_self, margin, cache=None):
    """d(sum of hinge losses)/d dist: -#{p : d_an < d_ap + m} at (a, n), the count of active
    negatives at (a, p). ``cache``: the forward's per-chunk ``(sorted thresholds, perm, c)``;
    then only ``j`` is recomputed (P comparisons per entry), not the sort nor the counts."""
    grad = torch.empty_like(dist)
    for i, rows in enumerate(row_chunks(*dist.shape)):
        cached = None if cache is None else cache[i]
        s = cached[3] if cached is not None and cached[3] is not None else None
        if s is None:
            s = label_slots(labels, ref_labels, exclude_self, rows)
        d = dist[rows]
        g = grad[s.rows]
        if cached is not None and isinstance(cached[0], str):  # the direct path's counts
            _, cnt, c, _ = cached
            g.copy_(cnt).neg_()  # dL/d(a, n) = -#{p : d_an < d_ap + m}
            g.scatter_add_(1, s.slots, c * s.valid)  # dL/d(a, p) = #{n : d_an < d_ap + m}
            continue
        if cached is None:
            _, perm, j, c = _hinge_all_chunk(d, s.same, s.slots, s.valid, margin)
        else:
            sthr, perm, c, _ = cached
            j = _count_at_or_below(sthr, d).masked_fill_(s.same, sthr.shape[1])
        # dL/d(a, n) = -#{p : d_an < d_ap + m}
        g.copy_(j).sub_(perm.shape[1])
        # dL/d(a, p) = #{n : d_an < d_ap + m}
        c_slot = torch.zeros_like(c).scatter_(1, perm, c)
        g.scatter_add_(1, s.slots, c_slot * s.valid)
    return grad


def _soft_all_chunk(d, neg, slots, valid):
    d_ap = d.gather(1, slots).masked_fill(~valid, -float("inf"))  # (rows, P)
    d_an = d.masked_fill(~neg, float("inf"))  # (rows, R)
    return d_ap[:, :, None] - d_an[:, None, :]  # (rows, P, R), -inf where invalid


def _soft_row_chunks(labels, ref_labels, exclude_self) -> list[slice]:
    """Row chunks sized so that (rows x max_positives x R) stays bounded."""
    b, r = labels.shape[0], ref_labels.shape[0]
    slot_tables = iter_label_slots(labels, ref_labels, exclude_self)
    n_pos_l = [v for s in slot_tables for v in s.n_pos.tolist()]
    chunks = []
    start = 0
    while start < b:
        width = max(n_pos_l[start], 1)
        end = start + 1
        while end < b:
            w = max(width, n_pos_l[end])
            if (end - start + 1) * w * max(r, 1) > _knobs._CHUNK_ELEMS:
                break
            width = w
            end += 1
        chunks.append(slice(start, end))
        start = end
    return chunks


def _soft_sum(dist, labels, ref_labels, exclude_self):
    """Sum of softplus(d_ap - d_an) over all valid triplets and the number with loss > 0."""
    total = torch.zeros((), dtype=torch.float64, device=dist.device)
    n_active = torch.zeros((), dtype=torch.int64, device=dist.device)
    for rows in _soft_row_chunks(labels, ref_labels, exclude_self):
        s = label_slots(labels, ref_labels, exclude_self, rows)
        sp = F.softplus(_soft_all_chunk(dist[rows], ~s.same, s.slots, s.valid))
        total += sp.sum(dtype=torch.float64)
        n_active += (sp > 0).sum()
    return total, n_active


def _soft_grad(dist, labels, ref_labels, exclude_self):
    """d(sum of soft-margin losses)/d dist, recomputed chunk by chunk."""
    grad = torch.zeros_like(dist)
    for rows in _soft_row_chunks(labels, ref_labels, exclude_self):
        s = label_slots(labels, ref_labels, exclude_self, rows)
        sig = torch.sigmoid(_soft_all_chunk(dist[rows], ~s.same, s.slots, s.valid))
        g = -sig.sum(dim=1)
        g.scatter_add_(1, s.slots, sig.sum(dim=2) * s.valid)
        grad[rows] = g
    return grad


class _BatchAllSum(torch.autograd.Function):
    """Sum of the losses of all valid triplets and the number of active ones, with the exact
    gradient; ``margin=None`` is the soft margin. Backward recomputes the chunks (O(B²) memory)."""

    @staticmethod
    def forward(ctx, dist, labels, ref_labels, exclude_self, margin, moments):  # noqa: D102
        # ``moments``: the tensor the hinge's chunk loop fills with the stats' sums (one pass)
        if margin is None:
            total, n_active = _soft_sum(dist, labels, ref_labels, exclude_self)
        else:
            ctx.cache = []
            total, n_active = _hinge_sum(
                dist, labels, ref_labels, exclude_self, margin, moments, ctx.cache
            )
        ctx.save_for_backward(dist, labels, ref_labels)
        ctx.exclude_self, ctx.margin = exclude_self, margin
        ctx.mark_non_differentiable(n_active)
        return total.to(dist.dtype), n_active

    @staticmethod
    def backward(ctx, grad_total, _grad_count):  # noqa: D102
        dist, labels, ref_labels = ctx.saved_tensors
        if ctx.margin is None:
            grad = _soft_grad(dist, labels, ref_labels, ctx.exclude_self)
        else:
            grad = _hinge_grad(dist, labels, ref_labels, ctx.exclude_self, ctx.margin, ctx.cache)
            ctx.cache = None
        return grad.mul_(grad_total), None, None, None, None, None


_MOMENT_KEYS = ("n_triplets", "sum_d_ap", "sum_d_an", "n_positive_pairs", "n_anchors", "sum_dist")


def _new_moments(device) -> torch.Tensor:
    """The float64 accumulator of :func:`_chunk_moments`, one entry per ``_MOMENT_KEYS``."""
    return torch.zeros(len(_MOMENT_KEYS), dtype=torch.float64, device=device)


@torch.no_grad()
def _chunk_moments(acc: torch.Tensor, d: torch.Tensor, s, exclude_self: bool) -> None:
    """Add one row chunk's counts and distance sums to ``acc`` (see
    :func:`_all_triplet_moments`): per-row terms stacked, one reduction, one add."""
    f64 = torch.float64
    n_pos = s.n_pos.to(f64)
    n_neg = (d.shape[1] - s.n_same).to(f64)
    row_sum = d.sum(dim=1).to(f64)  # float sums of (rows, R), then float64 (rows,)
    ap_sum = (d.gather(1, s.slots) * s.valid).sum(dim=1).to(f64)
    same_sum = ap_sum
    if exclude_self:  # the anchor itself is "same" but not a positive: (i, rows.start + i)
        self_d = d.diagonal(s.rows.start)
        same_sum = ap_sum.clone()
        same_sum[: self_d.shape[0]] += self_d
    terms = torch.stack(
        [
            n_pos * n_neg,
            ap_sum * n_neg,
            (row_sum - same_sum) * n_pos,
            n_pos,
            ((n_pos > 0) & (n_neg > 0)).to(f64),
            row_sum,
        ]
    )
    acc += terms.sum(dim=1)


def _all_triplet_moments(dist, labels, ref_labels, exclude_self) -> torch.Tensor:
    """Counts and distance sums over all valid triplets, without enumerating them.

    ``n_triplets = sum_a P_a N_a``, ``sum d_ap = sum_a N_a sum_p d_ap``,
    ``sum d_an = sum_a P_a sum_n d_an`` (P_a positives, N_a negatives of anchor a).
    """
    acc = _new_moments(dist.device)
    with torch.no_grad():
        for s in iter_label_slots(labels, ref_labels, exclude_self):
            _chunk_moments(acc, dist[s.rows], s, exclude_self)
    return acc


def batch_all_loss(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    exclude_self: bool,
    margin: float,
    soft_margin: bool,
    reduction: str,
) -> tuple[torch.Tensor, TripletStats]:
    """:func:`batch_all_triplet_loss` on checked inputs and resolved ``ref_labels``."""
    if dist.shape[1] == 0:  # an empty reference set: no triplets (as for every other strategy)
        m = _new_moments(dist.device)
        total, n_active = dist.sum(), torch.zeros((), dtype=torch.long, device=dist.device)
    elif soft_margin:
        m = _all_triplet_moments(dist, labels, ref_labels, exclude_self)
        total, n_active = _BatchAllSum.apply(dist, labels, ref_labels, exclude_self, None, None)
    else:  # the moments come out of the hinge's own chunk loop
        m = _new_moments(dist.device)
        total, n_active = _BatchAllSum.apply(dist, labels, ref_labels, exclude_self, margin, m)
    b, r = dist.shape
    m = dict(zip(_MOMENT_KEYS, m.unbind(), strict=True))
    stats = TripletStats(
        n_triplets=m["n_triplets"].round().long(),
        sum_d_ap=m["sum_d_ap"],
        sum_d_an=m["sum_d_an"],
        n_positive_pairs=m["n_positive_pairs"].round().long(),
        n_anchors=m["n_anchors"].round().long(),
        mean_distance=m["sum_dist"] / max(n_pairs(b, r, exclude_self), 1),
        batch_size=b,
        n_classes=n_classes(labels, ref_labels),
    )
    n_trip = stats.n_triplets
    stats.n_active = n_active
    if int(n_trip) == 0:
        stats.reason = zero_reason(stats, stats.n_positive_pairs, stats.n_anchors > 0)
    return reduce_total(total, n_trip, n_active, reduction), stats


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
    ``l = max(0, d_ap - d_an + margin)`` or the soft margin ``l = softplus(d_ap - d_an)``
    (FaceNet-style batch-all, Schroff et al. 2015; soft margin: Hermans et al. 2017). The
    triplets are never enumerated (see the module docstring for the counting argument).

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

    Example:
        >>> import torch
        >>> from tripletlab.functional import batch_all_triplet_loss
        >>> dist = torch.tensor([[0.0, 0.5, 1.0], [0.5, 0.0, 0.6], [1.0, 0.6, 0.0]])
        >>> loss, stats = batch_all_triplet_loss(dist, torch.tensor([0, 0, 1]), margin=0.2)
        >>> round(loss.item(), 4)  # triplets (0,1,2): 0 and (1,0,2): 0.5 - 0.6 + 0.2
        0.1
        >>> stats.as_dict()["n_triplets"], stats.as_dict()["n_active"]
        (2, 1)
    """
    check_options(None, margin, soft_margin, reduction)
    check_distances(dist, labels, ref_labels)
    ref_labels, exclude_self = resolve_ref(labels, ref_labels, exclude_self)
    return batch_all_loss(dist, labels, ref_labels, exclude_self, margin, soft_margin, reduction)
