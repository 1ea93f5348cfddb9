"""Semi-hard mining (FaceNet, Schroff, Kalenichenko & Philbin 2015), all of it in one place.

Per positive pair (a, p), the closest negative with ``d(a, n) > d(a, p)``. A pair with no such
negative is handled by ``semihard_fallback`` (:data:`SEMIHARD_FALLBACKS`):

* ``"easiest"`` — the anchor's farthest negative, as TF-Addons' ``triplet_semihard_loss`` does;
* ``"drop"`` — the pair yields no triplet (the loss may then be 0: :data:`SEMIHARD_EMPTY_REASON`).

Ties go to the lowest column. The search is exact: with few positives per anchor
(``<= _DIRECT_SLOTS``) one masked minimum per positive slot; beyond, one sort of each anchor's
negatives and a ``searchsorted`` of its positive distances.
"""

from __future__ import annotations

import torch

from .. import functional as _knobs  # tuning knobs are read from the package at call time
from .mining import IndexTuple, MineOptions, PairChunk, per_pair
from .slots import float_mask

SEMIHARD_FALLBACKS: tuple[str, ...] = ("easiest", "drop")
SEMIHARD_EMPTY_REASON = "no semi-hard negative for any positive pair (semihard_fallback='drop')"


_EXACT_INTEGERS = {torch.float64: 1 << 53, torch.float32: 1 << 24}  # float16/bf16: not used


def _column_numbers(d: torch.Tensor) -> torch.Tensor | None:
    """(1, R) column indices in d's dtype when it represents them exactly, else None."""
    if d.shape[1] >= _EXACT_INTEGERS.get(d.dtype, 0):
        return None
    return torch.arange(d.shape[1], dtype=d.dtype, device=d.device)[None, :]


def _min_lowest_index(x: torch.Tensor, cols: torch.Tensor | None):
    """``x.min(dim=1)`` (values, lowest index among equal minima), destroying ``x``. On CPU
    the fused value+index reduction does not vectorise; ``amin`` twice and four in-place float
    ops do: the index is the smallest ``col + R * sign(x - min)``, exact while R fits the
    mantissa (``cols`` given), else the plain ``min``."""
    if cols is None or x.device.type != "cpu":
        return x.min(dim=1)
    val = x.amin(dim=1)
    x.sub_(val[:, None]).sign_().mul_(float(x.shape[1])).add_(cols)
    return val, x.amin(dim=1).long()


def _semihard_slots_small(d, neg, d_ap, big: float):
    """:func:`semihard_slots` for a small matrix: per slot one bool compare, or, add and min."""
    rows, width = d_ap.shape
    idx = torch.empty(rows, width, dtype=torch.long, device=d.device)
    found = torch.empty(rows, width, dtype=torch.bool, device=d.device)
    same = ~neg
    flag = torch.empty_like(d)
    out = torch.empty_like(neg)
    for q in range(width):
        torch.le(d, d_ap[:, q : q + 1], out=out).logical_or_(same)
        val, arg = torch.add(d, flag.copy_(out), alpha=big, out=flag).min(dim=1)
        idx[:, q] = arg
        found[:, q] = val < big
    return idx, found


def semihard_slots(
    d: torch.Tensor, neg: torch.Tensor, d_ap: torch.Tensor, same: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, slot): the column of the closest negative with d_an > d_ap, and whether one
    exists. ``d`` (rows, R), ``neg`` (rows, R), ``d_ap`` (rows, P); ``same`` = ``~neg`` if
    the caller has it."""
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    rows, width = d_ap.shape
    if width <= _knobs._DIRECT_SLOTS and d.numel() <= _knobs._SMALL_ELEMS:
        # small: fewer kernels beat vectorised ones
        return _semihard_slots_small(d, neg, d_ap, torch.finfo(d.dtype).max)
    if width <= _knobs._DIRECT_SLOTS:
        idx = torch.empty(rows, width, dtype=torch.long, device=d.device)
        found = torch.empty(rows, width, dtype=torch.bool, device=d.device)
        # Arithmetic masks: on CPU ``where``/``masked_fill`` with a bool mask, and comparisons
        # that write booleans, cost many times a vectorised float op. Excluded entries (not a
        # negative, or d_an <= d_ap) get + BIG (float max): >= BIG, while every candidate keeps
        # its exact value (+ 0.0): "found" is ``min < BIG``. ``d_an <= d_ap`` is
        # ``min(sign(d_ap - d_an) + 1, 1)`` (exact: a float difference is 0 only for equal
        # values), and the anchor's own class is a float mask made once.
        big = torch.finfo(d.dtype).max
        same = float_mask(~neg if same is None else same, d.dtype)
        flag = torch.empty_like(d)  # the only (rows, R) float temporaries
        cols = _column_numbers(d)
        for q in range(width):  # per slot: four in-place float ops and a min
            torch.sub(d_ap[:, q : q + 1], d, out=flag).sign_().add_(1.0).clamp_max_(1.0)
            torch.maximum(flag, same, out=flag)
            cand = torch.add(d, flag, alpha=big, out=flag)
            val, arg = _min_lowest_index(cand, cols)
            idx[:, q] = arg
            found[:, q] = val < big
        return idx, found
    sneg, order = torch.where(neg, d, inf).sort(dim=1, stable=True)
    jj = torch.searchsorted(sneg, d_ap.contiguous(), side="right")
    found = jj < neg.sum(dim=1, keepdim=True)
    return order.gather(1, jj.clamp_max(d.shape[1] - 1)), found


def _semihard_negative(c: PairChunk, opts: MineOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    nn, found = semihard_slots(c.d, c.neg, c.d.gather(1, c.slots), c.same)
    if opts.semihard_fallback == "drop":
        return nn, found
    # "easiest": the farthest negative, only for the rows with a real pair that found none
    need = (~found & c.valid).any(dim=1).nonzero().squeeze(1)
    if need.numel():
        far = c.d[need].masked_fill(~c.neg[need], -float("inf")).argmax(dim=1, keepdim=True)
        nn[need] = torch.where(found[need], nn[need], far)
    return nn, None


def _mine_semihard(dist, labels, ref_labels, exclude_self, opts: MineOptions) -> IndexTuple:
    """Semi-hard (Schroff et al. 2015): per positive pair, the closest negative farther than the
    positive; ``opts.semihard_fallback`` decides when there is none."""
    return per_pair(dist, labels, ref_labels, exclude_self, opts, _semihard_negative)
