"""One optimisation step of the :class:`~tripletlab.train.Trainer`: embed a batch, the loss
(mined inside the criterion), backward, clip, update; a non-finite value stops it before any
weight changes. With ``chunk_size`` smaller than the batch, the embedding and the backward go
through gradient caching (:mod:`tripletlab.losses.gradient_cache`): the same loss and gradient,
only ``chunk_size`` items holding activations at a time.

Everything it uses is an argument (the trainer passes its current optimiser and schedule), so
the step is the same for every source of batches (:mod:`tripletlab.train.batches`) and task.

Example:
    >>> import torch
    >>> from tripletlab.losses.triplet import TripletLoss
    >>> from tripletlab.train.batches import Batch
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    >>> batch = Batch(torch.rand(8, 3), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    >>> out = optimisation_step(batch, model, model, TripletLoss(strategy="all"), opt, sched,
    ...                         None, None, torch.device("cpu"), grad_clip=0)
    >>> out.nonfinite is None and out.loss > 0 and "active_fraction" in out.stats
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..losses.gradient_cache import (
    backward_in_chunks,
    batch_length,
    embed_in_chunks,
    embedding_gradient,
)
from ..losses.memory import CrossBatchMemory
from ..runtime.devices import autocast
from ..runtime.process_group import any_rank

__all__ = ["StepOutcome", "optimisation_step", "step_stats"]


@dataclass
class StepOutcome:
    """``loss`` and the loss's batch ``stats`` of a step; ``nonfinite``: what was not finite
    ("embeddings", "loss", "gradients"), None when the step went through."""

    loss: float
    stats: dict
    nonfinite: str | None = None


def step_stats(criterion: torch.nn.Module) -> dict:
    """The batch statistics of the last step's loss (a memory's too, prefixed ``memory_``)."""
    if isinstance(criterion, CrossBatchMemory):
        mem = criterion.memory_stats
        extra = {f"memory_{k}": mem[k] for k in ("active_fraction", "n_triplets") if k in mem}
        return {**criterion.batch_stats, **extra}
    return dict(getattr(criterion, "stats", {}))


def optimisation_step(
    batch,
    forward: Callable,
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    amp: torch.dtype | None,
    device: torch.device,
    grad_clip: float,
    penalty: Callable[[], torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> StepOutcome:
    """Embed ``batch.x`` with ``forward`` (under autocast ``amp``), ``criterion(emb, batch.y)``,
    backward (through the fp16 ``scaler`` when given), clip to ``grad_clip`` (0: no clipping),
    update ``model``'s parameters and the schedule. ``penalty()``: a regulariser added to the
    loss that is minimised (e.g. L2-SP, :func:`~tripletlab.train.robust.l2sp_penalty`; the
    returned ``loss`` is the criterion's alone). An fp16 overflow is skipped by the scaler
    (``stats["skipped"]``); any other non-finite value returns before the update.
    ``chunk_size``: gradient caching when smaller than the batch (None: off)."""
    optimizer.zero_grad(set_to_none=True)
    record = None
    if chunk_size is not None and chunk_size < batch_length(batch.x):
        emb, record = embed_in_chunks(forward, batch.x, chunk_size, amp=amp, dtype=torch.float32)
        emb = emb.detach().requires_grad_(True)
    else:
        with autocast(device, amp):
            emb = forward(batch.x)
        emb = emb.float()
    if any_rank(not bool(torch.isfinite(emb).all())):  # every rank takes the same branch
        return StepOutcome(float("nan"), {}, "embeddings")
    loss = criterion(emb, batch.y)
    stats = step_stats(criterion)
    if not bool(torch.isfinite(loss)):
        return StepOutcome(float("nan"), stats, "loss")
    if record is not None:  # gradient caching: dL/dE, then each chunk re-run and backpropagated
        grad = embedding_gradient(loss, emb, scaler)
        backward_in_chunks(forward, batch.x, grad, record, amp=amp, dtype=torch.float32)
        if penalty is not None:
            extra = penalty()
            (scaler.scale(extra) if scaler is not None else extra).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
    else:
        total = loss + penalty() if penalty is not None else loss
        if scaler is not None:  # float16 on CUDA
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and not bool(torch.isfinite(torch.stack([g.norm() for g in grads])).all()):
        if scaler is not None:  # the scaler lowers its scale and skips the update
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            return StepOutcome(float(loss.detach()), {**stats, "skipped": "fp16 overflow"})
        return StepOutcome(float(loss.detach()), stats, "gradients")
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    return StepOutcome(float(loss.detach()), stats)
