"""Global mining across processes with ``torch.distributed`` (DDP, torchrun).

Each rank all-gathers the embeddings and labels of every rank; the gathered tensor keeps the
gradient path of the rank's own slice (the other slices are constants on this rank, and their
owners differentiate them). Every rank then computes the loss of the *global* batch, so the loss
value and the gradient of each rank's own embeddings are exactly those of a single process that
sees the concatenated batch. DDP averages parameter gradients over ranks; pass
``scale_for_ddp=True`` (multiplies the loss by the world size) to get the single-process
gradient of the parameters after that averaging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .losses import TripletLoss

__all__ = ["DistributedTripletLoss", "all_gather_with_grad", "gather_labels"]


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (rank order); only this rank's slice has a gradient.

    Ranks may hold different numbers of rows. Without an initialised process group, returns ``x``.
    """
    if not _is_dist() or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    width = max(sizes_i)
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    pieces = [p[:s] for p, s in zip(parts, sizes_i, strict=True)]
    pieces[rank] = x  # keep the local autograd path
    return torch.cat(pieces, dim=0)


def gather_labels(labels: torch.Tensor) -> torch.Tensor:
    """Concatenate integer labels from every rank (rank order)."""
    with torch.no_grad():
        return all_gather_with_grad(labels)


class DistributedTripletLoss(nn.Module):
    """Mine over the global batch gathered from all ranks.

    Example (inside a torchrun / DDP training step)::

        loss_fn = DistributedTripletLoss(TripletLoss(strategy="semihard"), scale_for_ddp=True)
        loss = loss_fn(model(x_local), y_local)
        loss.backward()
    """

    def __init__(self, loss_fn: TripletLoss, scale_for_ddp: bool = False) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.scale_for_ddp = scale_for_ddp

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of the concatenated batch of all ranks."""
        all_emb = all_gather_with_grad(embeddings)
        all_lab = gather_labels(labels)
        loss = self.loss_fn(all_emb, all_lab)
        if self.scale_for_ddp and _is_dist():
            loss = loss * dist.get_world_size()
        return loss

    @property
    def stats(self) -> dict:
        """Stats of the last global-batch call."""
        return self.loss_fn.stats
