"""The per-triplet loss terms and the reductions (``mean``, ``mean_active``, ``sum``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS: tuple[str, ...] = ("mean", "mean_active", "sum")


def triplet_terms(
    d_ap: torch.Tensor, d_an: torch.Tensor, margin: float, soft_margin: bool
) -> torch.Tensor:
    """``max(0, d_ap - d_an + margin)``, or ``softplus(d_ap - d_an)`` (stable for any gap)."""
    if soft_margin:
        return F.softplus(d_ap - d_an)
    return F.relu(d_ap - d_an + margin)


def reduce_triplet_losses(
    losses: torch.Tensor, reduction: str, n_active: torch.Tensor | None = None
) -> torch.Tensor:
    """Reduce per-triplet losses: ``mean``, ``mean_active`` (over losses > 0) or ``sum``.

    ``mean = sum(l) / max(n, 1)``, ``mean_active = sum(l) / max(#{l > 0}, 1)`` (``n_active``:
    that count, if already known). An empty input (or no active triplet for ``mean_active``)
    gives 0 with a gradient path.

    Example:
        >>> import torch
        >>> from tripletlab.functional import reduce_triplet_losses
        >>> losses = torch.tensor([0.0, 0.3, 0.5])
        >>> [round(reduce_triplet_losses(losses, r).item(), 4) for r in ("mean", "mean_active")]
        [0.2667, 0.4]
        >>> reduce_triplet_losses(torch.zeros(0), "mean").item()
        0.0
    """
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / max(losses.numel(), 1)
    if n_active is None:  # ``n_active``: #{l > 0}, when the caller counted it already
        n_active = (losses > 0).sum()
    return losses.sum() / n_active.clamp_min(1).to(losses.dtype)


def reduce_total(
    total: torch.Tensor, n_triplets: torch.Tensor, n_active: torch.Tensor, reduction: str
) -> torch.Tensor:
    """The reduction of a loss already summed over ``n_triplets`` (``n_active`` of them > 0)."""
    # ``total`` comes out of a custom autograd Function, so it keeps the graph even when 0
    if reduction == "sum":
        return total
    denom = n_triplets if reduction == "mean" else n_active
    return total / denom.to(total.dtype).clamp_min(1.0)
