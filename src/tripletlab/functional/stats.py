"""What one loss call saw: :class:`TripletStats`, batch facts and why a loss is zero."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as _knobs  # tuning knobs are read from the package at call time
from .slots import iter_label_slots


@dataclass
class TripletStats:
    """What one loss call saw. Tensors stay on the device until :meth:`as_dict` is called.

    ``n_triplets`` counts the mined (for ``all``: every valid) triplets, ``n_active`` those with
    loss > 0; ``mean_d_ap``/``mean_d_an`` average over the mined triplets; ``mean_distance`` is the
    mean distance over all pairs of the batch (a collapse signal: it goes to 0 when every
    embedding converges to one point). ``reason`` says why the loss is zero when it is.

    Example:
        >>> from tripletlab.functional import TripletStats
        >>> d = TripletStats(n_triplets=4, n_active=1, sum_d_ap=2.0, sum_d_an=6.0).as_dict()
        >>> d["active_fraction"], d["mean_d_ap"], d["mean_d_an"]
        (0.25, 0.5, 1.5)
        >>> TripletStats(batch_size=2).as_dict()["reason"]
        'no triplets'
    """

    n_triplets: torch.Tensor | int = 0
    n_active: torch.Tensor | int = 0
    sum_d_ap: torch.Tensor | float = 0.0
    sum_d_an: torch.Tensor | float = 0.0
    n_anchors: torch.Tensor | int = 0
    n_positive_pairs: torch.Tensor | int = 0
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


def n_pairs(b: int, r: int, exclude_self: bool) -> int:
    """Number of (row, column) pairs of a (b, r) matrix, the pairs (i, i) left out if asked."""
    return b * r - (min(b, r) if exclude_self else 0)


def n_classes(labels: torch.Tensor, ref_labels: torch.Tensor) -> int:
    """Distinct labels among the rows and columns."""
    if labels.numel() + ref_labels.numel() == 0:
        return 0
    if ref_labels is labels:  # the batch against itself
        return torch.unique(labels).numel()
    return torch.unique(torch.cat([labels, ref_labels])).numel()


def batch_facts(
    dist: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool
) -> TripletStats:
    """Stats that do not depend on the mined triplets: mean distance, batch size, classes."""
    with torch.no_grad():
        b, r = dist.shape
        pairs = n_pairs(b, r, exclude_self)
        mean_d = dist.sum() / pairs if pairs > 0 else torch.zeros((), dtype=dist.dtype)
        classes = n_classes(labels, ref_labels)
    return TripletStats(mean_distance=mean_d, batch_size=b, n_classes=classes)


def count_positive_pairs(labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool) -> int:
    """Ordered positive pairs (a, p): a reference with the anchor's label, not the pair
    (i, i) when ``exclude_self`` (the batch against itself; as the slot table counts them).
    O(B + R) from label counts (one (B, R) mask for small problems).

    Example:
        >>> count_positive_pairs(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 1]), True)
        8
    """
    with torch.no_grad():
        if labels.shape[0] * ref_labels.shape[0] <= _knobs._SMALL_ELEMS:  # small: one mask
            same = labels[:, None] == ref_labels[None, :]
            n = same.sum()
            if exclude_self:
                n = n - same.diagonal().sum()
            return int(n)
        values, inverse = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
        counts = torch.bincount(inverse[labels.shape[0] :], minlength=values.numel())
        n = int(counts[inverse[: labels.shape[0]]].sum())
        if exclude_self:  # the pairs (i, i) that have the same label
            m = min(labels.shape[0], ref_labels.shape[0])
            n -= int((labels[:m] == ref_labels[:m]).sum())
        return n


def pair_facts(
    labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool
) -> tuple[int, bool]:
    """Number of positive pairs, and whether some anchor has both a positive and a negative."""
    n_pos, has_both = 0, False
    r = ref_labels.shape[0]
    with torch.no_grad():
        for s in iter_label_slots(labels, ref_labels, exclude_self):
            n_pos += int(s.n_pos.sum())
            has_neg = s.same.sum(dim=1, dtype=torch.int32) < r
            has_both = has_both or bool(((s.n_pos > 0) & has_neg).any())
    return n_pos, has_both


def zero_reason(stats: TripletStats, n_pos_pairs: int, has_neg: bool) -> str:
    """Why nothing could be mined from the batch, or ``""`` when the batch itself is fine."""
    if stats.batch_size == 0:
        return "empty batch"
    if stats.n_classes <= 1:
        return "only one class in the batch: no negatives"
    if n_pos_pairs == 0:
        return "no positive pairs (every label occurs once in the batch)"
    if not has_neg:
        return "no anchor has both a positive and a negative"
    return ""
