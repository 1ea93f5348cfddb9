"""Cross-batch memory (XBM): mine each batch against the embeddings of recent batches.

Wang, Zhang, Huang & Scott 2020, "Cross-Batch Memory for Embedding Learning". Once the embedding
drifts slowly, embeddings from previous iterations are good stand-ins for the current ones, so a
FIFO queue of the last ``size`` (detached) embeddings gives the miner many more negatives than one
batch holds, at the cost of an (B x size) distance matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..functional import check_inputs
from .distributed import DistributedTripletLoss, gather_labels, gather_sizes, is_distributed
from .distributed import _gather_padded as _gather_rows
from .triplet import TripletLoss

__all__ = ["CrossBatchMemory"]


class CrossBatchMemory(nn.Module):
    """Wrap a :class:`~tripletlab.TripletLoss` with a FIFO memory bank of past embeddings.

    ``loss = loss_fn(E, y) + memory_weight * loss_fn(E, y, ref_embeddings=M, ref_labels=yM)``
    where ``M`` holds the last ``size`` embeddings seen (detached), then the batch is enqueued.
    Anchors always come from the current batch, so gradients flow only through it.
    ``start_after`` (the warm-up) is the number of calls before the memory term is added (the
    memory is filled from the first call). With a
    :class:`~tripletlab.losses.DistributedTripletLoss` inside a process group, the memory
    holds the **gathered global** batches (identical on every rank) and each rank mines its own
    anchors against it, the reduction being global.

    Example:
        >>> import torch
        >>> from tripletlab import TripletLoss
        >>> from tripletlab.losses.memory import CrossBatchMemory
        >>> xbm = CrossBatchMemory(TripletLoss(strategy="hard"), size=64, embedding_dim=8)
        >>> emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
        >>> loss = xbm(emb, torch.arange(4).repeat_interleave(4))
        >>> len(xbm)
        16
    """

    def __init__(
        self,
        loss_fn: TripletLoss | DistributedTripletLoss,
        size: int,
        embedding_dim: int,
        memory_weight: float = 1.0,
        start_after: int = 0,
    ) -> None:
        super().__init__()
        if size < 1:
            raise InputError(f"memory size must be >= 1, got {size}")
        if embedding_dim < 1:
            raise InputError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.loss_fn = loss_fn
        self.size = int(size)
        self.memory_weight = float(memory_weight)
        self.start_after = int(start_after)
        self.register_buffer("embeddings", torch.zeros(self.size, embedding_dim))
        self.register_buffer("labels", torch.zeros(self.size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.memory_stats: dict = {}
        self.batch_stats: dict = {}

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Push a batch into the FIFO (the oldest entries are overwritten)."""
        emb = embeddings.detach().to(self.embeddings.dtype)
        lab = labels.detach().long()
        if emb.shape[0] > self.size:  # keep only the newest
            emb, lab = emb[-self.size :], lab[-self.size :]
        n = emb.shape[0]
        idx = (self.ptr + torch.arange(n, device=emb.device)) % self.size
        self.embeddings[idx] = emb
        self.labels[idx] = lab
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.copy_(torch.clamp(self.count + n, max=self.size))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Batch loss plus the loss of the batch's anchors against the memory; then enqueue."""
        check_inputs(embeddings, labels)
        if embeddings.shape[1] != self.embeddings.shape[1]:
            raise InputError(
                f"embeddings have dimension {embeddings.shape[1]} but the memory holds "
                f"{self.embeddings.shape[1]}"
            )
        if self.embeddings.dtype != embeddings.dtype:
            self.embeddings = self.embeddings.to(embeddings.dtype)
        loss = self.loss_fn(embeddings, labels)
        self.batch_stats = self.loss_fn.stats
        self.memory_stats = {}
        n = int(self.count)
        if n > 0 and int(self.steps) >= self.start_after:
            mem_loss = self.loss_fn(
                embeddings,
                labels,
                ref_embeddings=self.embeddings[:n].clone(),  # enqueue edits in place
                ref_labels=self.labels[:n].clone(),
            )
            self.memory_stats = self.loss_fn.stats
            loss = loss + self.memory_weight * mem_loss
        if isinstance(self.loss_fn, DistributedTripletLoss) and is_distributed():
            with torch.no_grad():
                sizes = gather_sizes(embeddings.shape[0], embeddings.device)
                self.enqueue(_gather_rows(embeddings.detach(), sizes), gather_labels(labels))
        else:
            self.enqueue(embeddings, labels)
        self.steps += 1
        return loss
