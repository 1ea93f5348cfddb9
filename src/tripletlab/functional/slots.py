"""Row chunks and the one label-slot builder every strategy, batch-all and the stats use.

A distance matrix ``dist`` (B, R) is processed in row chunks so that each (rows, R) temporary stays
below ``tripletlab.functional._CHUNK_ELEMS`` elements. For a chunk, :func:`label_slots` returns

* ``same`` (rows, R): ``y_a == y_r``, the anchor itself included, so ``~same`` is exactly the
  negatives;
* ``slots`` (rows, P): the column indices of each row's positives (the anchor itself excluded when
  ``exclude_self``), left-aligned in ascending column order; ``P`` is the largest number of
  positives of a row (``K - 1`` for a PK batch), at least 1;
* ``valid`` (rows, P): which slots are real; ``n_pos`` (rows,): positives per row.

The slot table is built from ``nonzero`` (row-major), so nothing of size (rows, R) is sorted, and
a reduction over a row's positives is a ``gather`` of P values instead of a pass over R.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from .. import functional as _knobs  # tuning knobs are read from the package at call time


class LabelSlots(NamedTuple):
    """Label structure of the anchor rows ``rows`` (see the module docstring)."""

    rows: slice
    same: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor
    n_pos: torch.Tensor


def resolve_ref(
    labels: torch.Tensor, ref_labels: torch.Tensor | None, exclude_self: bool | None
) -> tuple[torch.Tensor, bool]:
    """The column labels and whether the pairs (i, i) are excluded.

    Without ``ref_labels`` the batch is its own reference set and ``exclude_self`` defaults to
    True; with a separate reference set it defaults to False.
    """
    if ref_labels is None:
        return labels, True if exclude_self is None else exclude_self
    return ref_labels, False if exclude_self is None else exclude_self


def row_chunks(b: int, r: int) -> list[slice]:
    """Row slices of a (b, r) matrix with at most ``_CHUNK_ELEMS`` elements each (>= 1 row)."""
    step = max(1, _knobs._CHUNK_ELEMS // max(r, 1))
    return [slice(s, min(b, s + step)) for s in range(0, b, step)]


def label_slots(
    labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool, rows: slice
) -> LabelSlots:
    """``same``, the positive slot table, ``valid`` and ``n_pos`` of the anchor rows ``rows``."""
    la = labels[rows]
    n = la.shape[0]
    same = la[:, None] == ref_labels[None, :]
    r_idx, c_idx = same.nonzero(as_tuple=True)
    if exclude_self:
        keep = c_idx != r_idx + rows.start
        r_idx, c_idx = r_idx[keep], c_idx[keep]
    device = same.device
    n_pos = (
        torch.bincount(r_idx, minlength=n) if n else torch.zeros(0, dtype=torch.long, device=device)
    )
    width = max(int(n_pos.max()), 1) if n else 1
    first = n_pos.cumsum(0) - n_pos
    rank = torch.arange(r_idx.numel(), device=device) - first[r_idx]
    slots = torch.zeros(n, width, dtype=torch.long, device=device)
    slots[r_idx, rank] = c_idx
    valid = torch.arange(width, device=device)[None, :] < n_pos[:, None]
    return LabelSlots(rows, same, slots, valid, n_pos)


def iter_label_slots(
    labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool
) -> Iterator[LabelSlots]:
    """:func:`label_slots` for every row chunk, one chunk alive at a time."""
    for rows in row_chunks(labels.shape[0], ref_labels.shape[0]):
        yield label_slots(labels, ref_labels, exclude_self, rows)
