"""Global mining across processes with ``torch.distributed`` (DDP, torchrun).

Every rank all-gathers the embeddings and labels of every rank, so mining sees the global batch,
but each rank computes only the rows of its **own anchors** against the gathered batch: a
(B/W x B) distance matrix instead of (B x B), so the mining work shrinks as ranks are added. The
gradient that a rank's loss sends to the gathered embeddings is **reduce-scattered** back to the
ranks that own them (``torch.distributed.reduce_scatter``; gloo and NCCL both support it — an
all-reduce followed by a slice is used only if a backend refuses), and the triplet counts of the
reduction (``mean`` / ``mean_active``) are all-reduced. Loss value and gradients of every rank's
own embeddings are therefore those of one process on the concatenated batch (tests:
``tests/losses/test_distributed_sharded.py``, 2 and 3 gloo processes, every deterministic strategy,
uneven per-rank batch sizes).

DDP averages parameter gradients over ranks; ``scale_for_ddp=True`` multiplies the gradient by
the world size so that after that averaging the parameters get the single-process gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import functional as Fn
from ..distances import pairwise_distance
from .triplet import TripletLoss

__all__ = [
    "DistributedTripletLoss",
    "all_gather_with_grad",
    "gather_labels",
    "gather_sizes",
    "is_distributed",
]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_is_dist = is_distributed  # the earlier private name


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """The number of rows every rank holds (rank order); ``[n]`` without a process group."""
    if not is_distributed():
        return [n]
    t = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, t)
    return [int(s) for s in sizes]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather rows of (possibly) different counts; returns the concatenation (no grad)."""
    width = max(sizes)
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (rank order); only this rank's slice has a gradient.

    Ranks may hold different numbers of rows. Without an initialised process group, returns ``x``.

    Example:
        >>> import torch
        >>> x = torch.ones(2, 3)
        >>> all_gather_with_grad(x) is x  # no process group: identity
        True
    """
    if not is_distributed():
        return x
    rank = dist.get_rank()
    sizes = gather_sizes(x.shape[0], x.device)
    full = _gather_padded(x, sizes)
    start = sum(sizes[:rank])
    pieces = [full[:start], x, full[start + sizes[rank] :]]  # keep the local autograd path
    return torch.cat(pieces, dim=0)


def gather_labels(labels: torch.Tensor) -> torch.Tensor:
    """Concatenate integer labels from every rank (rank order)."""
    if not is_distributed():
        return labels
    with torch.no_grad():
        return _gather_padded(labels, gather_sizes(labels.shape[0], labels.device))


class _GatherScatter(torch.autograd.Function):
    """Forward: all-gather the rows of every rank. Backward: reduce-scatter the gradient of the
    gathered rows back to their owners (each rank receives the sum over ranks for its slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # noqa: D102
        ctx.sizes = sizes
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        sizes, rank = ctx.sizes, dist.get_rank()
        width = max(sizes)
        chunks, start = [], 0
        for s in sizes:
            c = grad.new_zeros((width, *grad.shape[1:]))
            c[:s] = grad[start : start + s]
            chunks.append(c)
            start += s
        out = grad.new_empty((width, *grad.shape[1:]))
        try:
            dist.reduce_scatter(out, chunks)
        except RuntimeError:  # a backend without reduce_scatter: all-reduce, then slice
            stacked = torch.stack(chunks)
            dist.all_reduce(stacked)
            out = stacked[rank]
        return out[: sizes[rank]], None


def gather_with_scattered_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """All-gather ``x`` (rank order); the gradient of the result is reduce-scattered to owners.

    Unlike :func:`all_gather_with_grad` (gradient of the own slice only), every rank may
    differentiate through every gathered row; the owner receives the sum over ranks. Every rank
    must call ``backward`` through the result (collective). Without a process group: ``x``.
    """
    if not is_distributed():
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    return _GatherScatter.apply(x, sizes)


def _all_reduce_sum(values: list[torch.Tensor | float | int], like: torch.Tensor) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=like.device)
    if is_distributed():
        dist.all_reduce(t)
    return t.tolist()


class DistributedTripletLoss(nn.Module):
    """Mine over the global batch gathered from all ranks, each rank computing its own anchors.

    Each rank builds the distances of its own anchors (rows) to the gathered global batch
    (columns, own slice first so the pairs (i, i) are the anchors themselves), mines them with
    the wrapped :class:`~tripletlab.TripletLoss`'s options through the functional core (a
    reference set, the same miner as one process), and sums its triplet losses. The counts of
    the reduction are all-reduced, so the returned value is the **global** loss on every rank
    and its gradient w.r.t. this rank's embeddings equals a single process's on the
    concatenated batch. ``shard_rows=False`` keeps the old behaviour (every rank computes the
    whole B x B problem).

    Determinism: strategies with ``deterministic=False`` in
    :data:`~tripletlab.functional.STRATEGY_TABLE` (``random``, ``distance-weighted``) draw from
    each rank's own generator, so they are valid but not identical to one process. With exact
    distance ties a strategy may pick a different (equally distant) column than one process.

    Example (inside a torchrun / DDP training step)::

        loss_fn = DistributedTripletLoss(TripletLoss(strategy="semihard"), scale_for_ddp=True)
        loss = loss_fn(model(x_local), y_local)
        loss.backward()
    """

    def __init__(
        self, loss_fn: TripletLoss, scale_for_ddp: bool = False, shard_rows: bool = True
    ) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.scale_for_ddp = scale_for_ddp
        self.shard_rows = shard_rows
        self._stats: dict = {}
        self.last_rows = 0  # anchor rows this rank computed in the last call (B/W when sharded)
        self.last_cols = 0

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of the concatenated batch of all ranks (the same value on every rank).

        With ``ref_embeddings``/``ref_labels`` (a reference set every rank holds in full, e.g. a
        cross-batch memory of gathered batches) the columns are that set instead of the gathered
        batch; the reduction is still over the triplets of every rank's anchors.
        """
        Fn.check_inputs(embeddings, labels, ref_embeddings, ref_labels)
        if not is_distributed():
            loss = self.loss_fn(
                embeddings, labels, ref_embeddings=ref_embeddings, ref_labels=ref_labels
            )
            self._stats = self.loss_fn.stats
            self.last_rows = embeddings.shape[0]
            self.last_cols = (
                embeddings.shape[0] if ref_embeddings is None else ref_embeddings.shape[0]
            )
            return loss
        if not self.shard_rows and ref_embeddings is None:
            return self._forward_replicated(embeddings, labels)
        return self._forward_sharded(embeddings, labels, ref_embeddings, ref_labels)

    def _forward_replicated(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        all_emb = all_gather_with_grad(embeddings)
        all_lab = gather_labels(labels)
        loss = self.loss_fn(all_emb, all_lab)
        self._stats = self.loss_fn.stats
        self.last_rows = self.last_cols = all_emb.shape[0]
        return loss * dist.get_world_size() if self.scale_for_ddp else loss

    def _forward_sharded(self, embeddings, labels, ref_embeddings, ref_labels) -> torch.Tensor:
        lf = self.loss_fn
        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = gather_sizes(embeddings.shape[0], embeddings.device)
        b = sizes[rank]
        if ref_embeddings is None:
            start = sum(sizes[:rank])
            gathered = gather_with_scattered_grad(embeddings, sizes)
            with torch.no_grad():
                all_lab = _gather_padded(labels, sizes)
            # own slice first: column i is anchor i, so exclude_self drops the pairs (i, i)
            order = torch.cat(
                [
                    torch.arange(start, start + b),
                    torch.arange(0, start),
                    torch.arange(start + b, sum(sizes)),
                ]
            ).to(embeddings.device)
            cols, col_lab, exclude_self = gathered[order], all_lab[order], True
            keep_graph = 0.0 * gathered.sum()  # every rank reaches the collective backward
        else:
            cols, col_lab, exclude_self = ref_embeddings, ref_labels, False
            all_lab = torch.cat([labels, ref_labels])
            keep_graph = 0.0
        dist_mat = pairwise_distance(embeddings, cols, lf.distance)
        local_sum, st = Fn.triplet_loss_from_distances(
            dist_mat,
            labels,
            col_lab,
            strategy=lf.strategy,
            margin=lf.margin,
            soft_margin=lf.soft_margin,
            reduction="sum",
            semihard_fallback=lf.semihard_fallback,
            exclude_self=exclude_self,
            generator=lf.generator,
            dim=embeddings.shape[1],
        )
        self.last_rows, self.last_cols = dist_mat.shape
        pairs = b * dist_mat.shape[1] - (min(b, dist_mat.shape[1]) if exclude_self else 0)
        n_trip, n_act, s_ap, s_an, n_anch, s_dist, n_pairs = _all_reduce_sum(
            [
                st.n_triplets,
                st.n_active,
                st.sum_d_ap,
                st.sum_d_an,
                st.n_anchors,
                float(st.mean_distance) * pairs if pairs else 0.0,
                pairs,
            ],
            embeddings,
        )
        if lf.reduction == "sum":
            denom = 1.0
        else:
            denom = max(n_trip if lf.reduction == "mean" else n_act, 1.0)
        local = local_sum / denom + keep_graph
        with torch.no_grad():
            total = local.detach().clone()
            dist.all_reduce(total)
        scale = float(world) if self.scale_for_ddp else 1.0
        # the value is the global loss; the gradient is this rank's part (x W for DDP's mean)
        loss = scale * local + (total - scale * local.detach())
        self._stats = Fn.TripletStats(
            n_triplets=int(round(n_trip)),
            n_active=int(round(n_act)),
            sum_d_ap=s_ap,
            sum_d_an=s_an,
            n_anchors=int(round(n_anch)),
            mean_distance=s_dist / max(n_pairs, 1.0),
            batch_size=sum(sizes),
            n_classes=int(torch.unique(all_lab).numel()),  # of the columns (+ own rows for a ref)
        ).as_dict()
        return loss

    @property
    def stats(self) -> dict:
        """Stats of the last global-batch call (counts and means over the global batch)."""
        return self._stats
