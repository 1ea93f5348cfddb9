"""The ``all`` miner: every valid triplet as explicit indices (the loss never enumerates them).

Per positive pair (a, p) the qualifying negatives are a prefix of the anchor's sorted negatives
(with a ``margin``: those with ``d(a, n) < d(a, p) + margin``, the triplets with hinge loss > 0, as
pytorch-metric-learning's ``TripletMarginMiner(type_of_triplets="all")`` returns), so the triplets
are produced from counts and offsets. With ``max_triplets`` a uniform random subset (without
replacement) is drawn from the global numbering without materialising all of them.
"""

from __future__ import annotations

import warnings

import torch

from .. import functional as _knobs  # tuning knobs are read from the package at call time
from .mining import IndexTuple, MineOptions, empty_triplets
from .slots import iter_label_slots


def _mine_all(dist, labels, ref_labels, exclude_self, opts: MineOptions) -> IndexTuple:
    """Every valid triplet (or, with ``opts.margin``, every one with loss > 0), optionally capped
    at ``opts.max_triplets``."""
    r = dist.shape[1]
    pa_l, pp_l, cnt_l, order_l = [], [], [], []
    for s in iter_label_slots(labels, ref_labels, exclude_self):
        d = dist[s.rows]
        sneg, order = d.masked_fill(s.same, float("inf")).sort(dim=1)
        pa, pq = s.valid.nonzero(as_tuple=True)  # row-major: positives in column order
        pp = s.slots[pa, pq]
        if opts.margin is None:
            cnt = (r - s.same.sum(dim=1, dtype=torch.int32).long())[pa]
        else:
            thr = (d.gather(1, s.slots) + opts.margin).contiguous()
            cnt = torch.searchsorted(sneg, thr, side="left")[pa, pq]
        keep = cnt > 0
        pa_l.append(pa[keep] + s.rows.start)
        pp_l.append(pp[keep])
        cnt_l.append(cnt[keep])
        order_l.append((s.rows.start, order))
    if not pa_l:
        return empty_triplets(dist.device)
    pa, pp, cnt = torch.cat(pa_l), torch.cat(pp_l), torch.cat(cnt_l)
    total = int(cnt.sum())
    if total == 0:
        return empty_triplets(dist.device)
    ends = cnt.cumsum(0)
    max_triplets = opts.max_triplets
    if max_triplets is None and total > _knobs._LARGE_TRIPLET_COUNT:
        warnings.warn(
            f"the 'all' miner is materialising {total:,} triplets "
            f"(~{3 * 8 * total / 2**30:.1f} GiB of indices); pass max_triplets= to subsample, or "
            "use TripletLoss(strategy='all'), which never enumerates them",
            stacklevel=4,
        )
    if max_triplets is not None and total > max_triplets:
        t = sample_without_replacement(total, max_triplets, opts.generator).to(dist.device)
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


def sample_without_replacement(
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
