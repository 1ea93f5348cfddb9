"""The trainer's periodic refresh of the hard-class neighbour table (``--sampler hard-class``):
every ``hard_class_every`` steps embed a seeded sample of each training class with the current
model and give the sampler each class's nearest classes (:mod:`tripletlab.samplers.hard_class`).
The :class:`~tripletlab.train.callbacks.HardClassRefresh` callback calls it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..samplers.hard_class import (
    HardClassSampler,
    class_centroids,
    nearest_classes,
    nearest_classes_by_items,
    sample_per_class,
)

__all__ = ["refresh_hard_classes"]


def _table(trainer, sampler: HardClassSampler, step: int) -> tuple[torch.Tensor, int]:
    """The neighbour table of the current model (rank 0's work) and the items embedded."""
    cfg = trainer.cfg
    train = trainer.train_set
    pos = np.searchsorted(sampler.classes, train.y.cpu().numpy())
    keep = sample_per_class(pos, cfg.hard_class_items, seed=cfg.seed * 1_000_003 + step)
    if trainer.features is not None:  # frozen: from the feature cache
        emb = trainer.features.train_embeddings(trainer.model, keep, trainer.device)
        labels = train.y[torch.as_tensor(keep, dtype=torch.long)]
    else:
        emb, labels = trainer.embed_split(train.subset(keep))
    label_pos = torch.from_numpy(np.searchsorted(sampler.classes, labels.cpu().numpy()))
    if getattr(cfg, "hard_class_by", "centroid") == "items":
        table = nearest_classes_by_items(
            emb.cpu(), label_pos, len(sampler.classes), sampler.pool, cfg.distance
        )
        return table, len(emb)
    centroids, present = class_centroids(emb, label_pos, len(sampler.classes))
    return nearest_classes(centroids, present, sampler.pool, cfg.distance), len(emb)


def refresh_hard_classes(trainer) -> dict[str, Any] | None:
    """At every ``hard_class_every``-th step (not step 0: the untrained model's neighbours
    mean little) recompute the trainer's hard-class neighbour table and give it to the sampler;
    returns the record of what was done (``seconds`` included; None when nothing was due).
    Rank 0 computes, the other ranks receive the table. Batches read ahead with the old table
    are dropped (``trainer.batches.close()``).

    Example:
        >>> refresh_hard_classes(trainer)  # doctest: +SKIP
        {'step': 101, 'type': 'hard_classes', 'seconds': 0.8, 'items': 3200, ...}
    """
    sampler = getattr(trainer.sampler, "base", trainer.sampler)
    if not isinstance(sampler, HardClassSampler):
        return None
    step, every = trainer.state.step, trainer.cfg.hard_class_every
    if step == 0 or step % every or sampler.refreshed_at == step:
        return None
    t0 = time.perf_counter()
    trainer.batches.close()
    n_cls = len(sampler.classes)
    items = 0
    if trainer.is_main:
        table, items = _table(trainer, sampler, step)
    else:
        table = torch.zeros(n_cls, sampler.pool, dtype=torch.long)
    if trainer.dist is not None:
        import torch.distributed as dist

        # gloo/nccl: the table travels on the process group's device
        t = table.to(trainer.device)
        dist.broadcast(t, src=0)
        table = t.cpu()
    old = sampler.neighbours
    sampler.set_neighbours(table.numpy(), step)
    seconds = time.perf_counter() - t0
    first = sampler.neighbours[:, 0]
    changed = None if old is None else float((old[:, 0] != first).mean())
    rec = {  # logged as the first step that uses it (a resume from step `step` redoes it)
        "step": step + 1,
        "type": "hard_classes",
        "seconds": round(seconds, 4),
        "items": items,
        "classes": n_cls,
    }
    if changed is not None:
        rec["nearest_changed_fraction"] = changed
    return rec
