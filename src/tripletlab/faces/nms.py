"""Non-maximum suppression of boxes in plain torch (no torchvision).

Boxes are ``(x1, y1, x2, y2)`` with ``x2 >= x1``, ``y2 >= y1`` in continuous pixel coordinates;
the area is ``(x2 - x1) * (y2 - y1)``. Overlap of boxes ``a`` and ``b``:

* ``"union"`` (IoU): ``|a ∩ b| / (|a| + |b| - |a ∩ b|)``;
* ``"min"``: ``|a ∩ b| / min(|a|, |b|)`` (MTCNN's last stage: drops a box inside another).

Greedy NMS (as in MTCNN, Zhang et al. 2016, and most detectors): take the highest-scoring box
left, drop every remaining box whose overlap with it exceeds the threshold, repeat. Ties in
score keep the lower index first (a stable sort).

Example:
    >>> import torch
    >>> b = torch.tensor([[0., 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    >>> nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
    [0, 2]
"""

from __future__ import annotations

import torch

from ..errors import InputError

__all__ = ["box_overlap", "nms"]

_MODES = ("union", "min")


def box_overlap(a: torch.Tensor, b: torch.Tensor, mode: str = "union") -> torch.Tensor:
    """(N, M) overlaps of boxes ``a`` (N, 4) and ``b`` (M, 4): IoU (``"union"``) or
    intersection over the smaller area (``"min"``); 0 where the denominator is 0.

    Example:
        >>> import torch
        >>> box_overlap(torch.tensor([[0., 0, 2, 2]]), torch.tensor([[1., 0, 3, 2]])).tolist()
        [[0.3333333432674408]]
    """
    if mode not in _MODES:
        raise InputError(f"overlap mode must be one of {_MODES}, got {mode!r}")
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    if mode == "union":
        den = area_a[:, None] + area_b[None, :] - inter
    else:
        den = torch.minimum(area_a[:, None], area_b[None, :])
    return torch.where(den > 0, inter / den.clamp(min=1e-12), torch.zeros_like(inter))


def nms(
    boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str = "union"
) -> torch.Tensor:
    """Indices (int64, by decreasing score) of the boxes greedy NMS keeps: a box is dropped
    when its overlap (``mode``: ``"union"`` = IoU, ``"min"``) with a kept, higher-scoring box
    exceeds ``threshold``.

    Example:
        >>> import torch
        >>> nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist()
        []
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InputError(f"boxes must be (N, 4), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise InputError(f"scores must be ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if mode not in _MODES:
        raise InputError(f"overlap mode must be one of {_MODES}, got {mode!r}")
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    keep: list[int] = []
    # blocks of the overlap matrix, so memory stays O(n * block) for tens of thousands of boxes
    alive = torch.ones(n, dtype=torch.bool)
    block = 2048
    for start in range(0, n, block):
        stop = min(start + block, n)
        ov = box_overlap(b[start:stop], b, mode) > threshold  # (block, n)
        for i in range(start, stop):
            if not alive[i]:
                continue
            keep.append(i)
            row = ov[i - start]
            row[: i + 1] = False
            alive &= ~row
    return order[torch.tensor(keep, dtype=torch.long)]
