"""Row chunks and the one label-slot builder every strategy, batch-all and the stats use.

A distance matrix ``dist`` (B, R) is processed in row chunks so that each (rows, R) temporary stays
below ``tripletlab.functional._CHUNK_ELEMS`` elements. For a chunk, :func:`label_slots` returns

* ``same`` (rows, R): ``y_a == y_r``, the anchor itself included, so ``~same`` is exactly the
  negatives;
* ``slots`` (rows, P): the column indices of each row's positives (the anchor itself excluded when
  ``exclude_self``), left-aligned in ascending column order; ``P`` is the largest number of
  positives of a row (``K - 1`` for a PK batch), at least 1;
* ``valid`` (rows, P): which slots are real; ``n_pos`` (rows,): positives per row;
* ``pos`` (rows, R): the positive mask, for consumers that scan whole rows.

The slot table is built from the column labels sorted once (a row's positives are its class's
columns), in O(rows x class size) without a scan of the (rows, R) mask, and a reduction over a
row's positives is a ``gather`` of P values instead of a pass over R.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property

import torch

from .. import functional as _knobs  # tuning knobs are read from the package at call time


def float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 0/1 in ``dtype``. On CPU, through a uint8 view: the same values, and the
    uint8 -> float conversion vectorises where bool -> float does not (~10x faster)."""
    if mask.device.type == "cpu" and mask.dtype == torch.bool:
        return mask.view(torch.uint8).to(dtype)
    return mask.to(dtype)


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


def _class_columns(
    ref_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Columns sorted by label (ascending column within a label), and per distinct label its
    first position in that order, its count and the label itself."""
    sorted_labels, order = torch.sort(ref_labels, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    return order, counts.cumsum(0) - counts, counts, uniq


def _empty_table(n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    slots = torch.zeros(n, 1, dtype=torch.long, device=device)
    return slots, torch.zeros(n, 1, dtype=torch.bool, device=device), slots[:, 0].clone()


class LabelSlots:
    """Label structure of the anchor rows ``rows`` (see the module docstring).

    ``same`` is built at once; ``pos`` (the (rows, R) positive mask) and the slot table
    (``slots``, ``valid``, ``n_pos``) are built on first use, so each consumer pays only for what
    it reads.
    """

    def __init__(
        self, labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool, rows: slice
    ) -> None:
        self.rows = rows
        self.exclude_self = exclude_self
        self.labels, self.ref_labels = labels, ref_labels

    @cached_property
    def same(self) -> torch.Tensor:
        """(rows, R) ``y_a == y_r``, the anchor itself included (built on first use)."""
        return self.labels[self.rows][:, None] == self.ref_labels[None, :]

    @cached_property
    def n_same(self) -> torch.Tensor:
        """(rows,) int32 columns of the anchor's own class, itself included, from the slot
        table (no (rows, R) pass): ``n_pos`` plus 1 where the anchor's own column exists."""
        if "same" in self.__dict__:  # the mask exists already: one int32 sum over it
            return self.same.sum(dim=1, dtype=torch.int32)
        n = self.n_pos.to(torch.int32)
        if self.exclude_self:
            n = n.clone()
            own = self.own_label_at_self()
            n[: own.shape[0]] += own
        return n

    def own_label_at_self(self) -> torch.Tensor:
        """(m,) int32: whether the column (i, rows.start + i) holds the anchor's own label, for
        the first m rows of the chunk whose own column exists (exclude_self's (i, i) pairs)."""
        ar, cols = self.self_pairs()
        return (self.labels[self.rows][ar] == self.ref_labels[cols]).to(torch.int32)

    def self_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of the pairs (i, i) inside this chunk."""
        n = self.labels[self.rows].shape[0]
        r = self.ref_labels.shape[0]
        ar = torch.arange(n, device=self.labels.device)
        cols = ar + self.rows.start
        inside = cols < r
        return ar[inside], cols[inside]

    @cached_property
    def pos(self) -> torch.Tensor:
        """(rows, R) positives: ``same`` without the anchor itself when ``exclude_self``."""
        if not self.exclude_self:
            return self.same
        pos = self.same.clone()
        pos.diagonal(self.rows.start).fill_(False)  # the pairs (i, i): (row, rows.start + row)
        return pos

    @cached_property
    def _table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, r = self.labels[self.rows].shape[0], self.ref_labels.shape[0]
        if n == 0 or r == 0:
            return _empty_table(n, self.labels.device)
        if n * r <= _knobs._SMALL_ELEMS:  # small: from the mask, in a few whole-matrix kernels
            return self._table_from_mask()
        # From the sorted column labels, not from a (rows, R) scan: O(rows x class size).
        sorted_cols, starts, counts, uniq = _class_columns(self.ref_labels)
        device = self.labels.device
        lab = self.labels[self.rows]
        n = lab.shape[0]
        if n == 0 or uniq.numel() == 0:
            return _empty_table(n, device)
        k = torch.searchsorted(uniq, lab).clamp_max(uniq.numel() - 1)
        cnt = torch.where(uniq[k] == lab, counts[k], 0)
        width = int(counts.max())
        ar = torch.arange(width, device=device)
        cand = sorted_cols[(starts[k][:, None] + ar).clamp_max(sorted_cols.numel() - 1)]
        keep = ar[None, :] < cnt[:, None]
        if self.exclude_self:  # drop the anchor's own column, then left-align
            own = torch.arange(self.rows.start, self.rows.start + n, device=device)
            keep &= cand != own[:, None]
            rank = keep.cumsum(dim=1) - 1
            slots = torch.zeros(n, width + 1, dtype=torch.long, device=device)
            slots.scatter_(1, torch.where(keep, rank, width), cand)
            slots = slots[:, :width]
        else:
            slots = torch.where(keep, cand, 0)
        n_pos = keep.sum(dim=1)
        p = max(int(n_pos.max()), 1)
        slots = slots[:, :p].contiguous()
        valid = ar[None, :p] < n_pos[:, None]
        return slots.masked_fill_(~valid, 0), valid, n_pos

    def _table_from_mask(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # keys R - column on the positives, 0 elsewhere: the top P keys are a row's positives
        # in ascending column order (keys are distinct), then fillers masked out by ``valid``
        pos = self.pos
        r = pos.shape[1]
        n_pos = pos.sum(dim=1)
        p = min(max(int(n_pos.max()), 1), r)
        key = pos * torch.arange(r, 0, -1, device=pos.device)
        slots = key.topk(p, dim=1).indices
        valid = torch.arange(p, device=pos.device) < n_pos[:, None]
        return slots.masked_fill_(~valid, 0), valid, n_pos

    @property
    def slots(self) -> torch.Tensor:
        """(rows, P) column indices of each row's positives, left-aligned, ascending."""
        return self._table[0]

    @property
    def valid(self) -> torch.Tensor:
        """(rows, P) which slots are real."""
        return self._table[1]

    @property
    def n_pos(self) -> torch.Tensor:
        """(rows,) positives per row."""
        return self._table[2]


def label_slots(
    labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool, rows: slice
) -> LabelSlots:
    """The :class:`LabelSlots` of the anchor rows ``rows``."""
    return LabelSlots(labels, ref_labels, exclude_self, rows)


def iter_label_slots(
    labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool
) -> Iterator[LabelSlots]:
    """:func:`label_slots` for every row chunk, one chunk alive at a time."""
    for rows in row_chunks(labels.shape[0], ref_labels.shape[0]):
        yield label_slots(labels, ref_labels, exclude_self, rows)
