"""Global (offline) hard-class mining: which training classes are close to each other in the
current embedding, for :class:`~tripletlab.samplers.HardClassSampler` (``--sampler hard-class``).

Every ``--hard-class-every`` N steps the trainer embeds up to ``--hard-class-items`` items of
every training class (in eval mode, without gradients, streamed from disk when the images are:
the same ``embed_split`` as validation), averages them into class centroids, and lists each
class's nearest classes by the loss's distance (:func:`tripletlab.distances.distance_matrix`);
with ``--hard-class-by items`` the neighbours are instead the classes whose items are each other's
nearest neighbours in an exact :class:`~tripletlab.index.EmbeddingIndex` (mutual kNN votes).
The sampler then fills each PK batch with groups of mutually close classes, so the batch's
negatives are hard for the whole training set, not only for a random batch (the FaceNet /
"hard class" idea of sampling confusable identities together). Under ``--distributed`` rank 0
computes the table and broadcasts it, so every rank builds the same global batch.

Example:
    >>> import torch
    >>> from tripletlab.hard_classes import class_centroids, nearest_classes
    >>> emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [0.2, 0.1]])
    >>> centroids, present = class_centroids(emb, torch.tensor([0, 0, 1, 1, 2]), 3)
    >>> nearest_classes(centroids, present, n=1).tolist()
    [[2], [2], [0]]
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .distances import distance_matrix
from .errors import InputError
from .samplers import HardClassSampler

__all__ = [
    "class_centroids",
    "nearest_classes",
    "nearest_classes_by_items",
    "refresh_hard_classes",
    "sample_per_class",
]


def class_centroids(
    embeddings: torch.Tensor, positions: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean embedding of each class ``0..n_classes-1`` and a mask of the classes that have
    items (a class without items gets a zero row and ``present`` False).

    Example:
        >>> c, present = class_centroids(torch.eye(2), torch.tensor([1, 1]), 3)
        >>> c[1].tolist(), present.tolist()
        ([0.5, 0.5], [False, True, False])
    """
    if embeddings.ndim != 2 or positions.shape != (len(embeddings),):
        raise InputError(
            f"need embeddings (N, D) and class positions (N,), got {tuple(embeddings.shape)} "
            f"and {tuple(positions.shape)}"
        )
    emb = embeddings.double()
    sums = torch.zeros(n_classes, emb.shape[1], dtype=torch.float64)
    sums.index_add_(0, positions.long(), emb)
    counts = torch.bincount(positions.long(), minlength=n_classes).double()
    present = counts > 0
    centroids = sums / counts.clamp_min(1.0).unsqueeze(1)
    return centroids.float(), present


def nearest_classes(
    centroids: torch.Tensor, present: torch.Tensor, n: int, distance: str = "euclidean"
) -> torch.Tensor:
    """(C, n) long: for each class its ``n`` nearest other classes by centroid distance,
    nearest first; -1 where fewer than ``n`` other classes are present (and for an absent
    class's whole row).

    Example:
        >>> c = torch.tensor([[0.0], [1.0], [3.0]])
        >>> nearest_classes(c, torch.tensor([True, True, True]), n=2).tolist()
        [[1, 2], [0, 2], [1, 0]]
    """
    n_cls = len(centroids)
    if n < 1:
        raise InputError(f"need n >= 1 nearest classes, got {n}")
    dist = distance_matrix(centroids, centroids, distance).double()
    dist.fill_diagonal_(float("inf"))
    dist[:, ~present] = float("inf")
    k = min(n, n_cls - 1)
    d, idx = torch.topk(dist, k, dim=1, largest=False)  # ties: lower index first (sorted)
    idx = torch.where(torch.isfinite(d), idx, torch.full_like(idx, -1))
    idx[~present] = -1
    if k < n:
        idx = torch.cat([idx, torch.full((n_cls, n - k), -1, dtype=idx.dtype)], dim=1)
    return idx


def nearest_classes_by_items(
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    n_classes: int,
    n: int,
    distance: str = "euclidean",
    k: int = 10,
) -> torch.Tensor:
    """(C, n) long: for each class the ``n`` classes whose items are most often among its
    items' ``k`` nearest neighbours and vice versa (mutual votes, from an exact
    :class:`~tripletlab.index.EmbeddingIndex`); ties and classes without votes are ordered by
    centroid distance, as in :func:`nearest_classes`, and -1 fills rows as there.

    ``votes[a, b]`` = number of (item of a, item of b) pairs with the item of b among the ``k``
    nearest other items of the item of a; the affinity is ``votes + votes.T``.

    Example:
        >>> emb = torch.tensor([[0.0], [0.1], [0.2], [0.3], [9.0], [9.1]])
        >>> nearest_classes_by_items(emb, torch.tensor([0, 1, 0, 1, 2, 2]), 3, n=1, k=2).tolist()
        [[1], [0], [1]]
    """
    from .index import EmbeddingIndex

    if n < 1 or k < 1:
        raise InputError(f"need n >= 1 classes and k >= 1 neighbours, got n={n}, k={k}")
    centroids, present = class_centroids(embeddings, positions, n_classes)
    by_centroid = nearest_classes(centroids, present, max(n, n_classes), distance)  # tie order
    pos = positions.long().numpy()
    metric = "cosine" if distance == "cosine" else "euclidean"  # same order as sqeuclidean
    index = EmbeddingIndex(embeddings.shape[1], metric=metric, backend="numpy")
    index.add(embeddings.detach().float().numpy(), labels=pos)
    _, ids = index.search(embeddings.detach().float().numpy(), k + 1)
    votes = np.zeros((n_classes, n_classes), dtype=np.int64)
    rows = np.repeat(np.arange(len(pos)), ids.shape[1])
    cols = ids.reshape(-1)
    keep = (cols >= 0) & (cols != rows)  # the item itself is not its own neighbour
    np.add.at(votes, (pos[rows[keep]], pos[cols[keep]]), 1)
    affinity = votes + votes.T
    # each row's candidates (nearest centroid first, -1 padding last) re-ordered by votes, ties
    # kept in centroid order; -1 slots have no votes and the last positions, so they stay last
    cand = by_centroid.numpy()
    rows = np.arange(n_classes)[:, None]
    gathered = np.where(cand >= 0, affinity[rows, np.maximum(cand, 0)], 0)
    position = np.broadcast_to(np.arange(cand.shape[1]), cand.shape)
    order = np.lexsort((position, -gathered), axis=1)
    return torch.from_numpy(np.ascontiguousarray(cand[rows, order][:, :n], dtype=np.int64))


def sample_per_class(positions: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``per_class`` items of every class (seeded; 0 = all).

    Example:
        >>> sample_per_class(np.array([0, 0, 0, 1]), 2, seed=0).size
        3
    """
    if per_class <= 0:
        return np.arange(len(positions))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(positions):
        idx = np.flatnonzero(positions == c)
        keep.append(idx if len(idx) <= per_class else rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _table(trainer, sampler: HardClassSampler, step: int) -> tuple[torch.Tensor, int]:
    """The neighbour table of the current model (rank 0's work) and the items embedded."""
    cfg = trainer.cfg
    train = trainer.train_set
    pos = np.searchsorted(sampler.classes, train.y.cpu().numpy())
    keep = sample_per_class(pos, cfg.hard_class_items, seed=cfg.seed * 1_000_003 + step)
    if getattr(trainer, "features", None) is not None:  # frozen: from the feature cache
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


def refresh_hard_classes(trainer) -> dict | None:
    """At every ``hard_class_every``-th step (not step 0: the untrained model's neighbours
    mean little) recompute the trainer's hard-class neighbour table; returns what was logged
    (None when nothing was due). Rank 0 computes, the other ranks receive the table.

    Example:
        >>> refresh_hard_classes(trainer)  # doctest: +SKIP
        {'step': 100, 'type': 'hard_classes', 'seconds': 0.8, 'items': 3200, ...}
    """
    sampler = getattr(trainer.sampler, "base", trainer.sampler)
    if not isinstance(sampler, HardClassSampler):
        return None
    step, every = trainer.state.step, trainer.cfg.hard_class_every
    if step == 0 or step % every or sampler.refreshed_at == step:
        return None
    t0 = time.perf_counter()
    if trainer.stream is not None:  # batches read ahead with the old table are dropped
        trainer.stream.close()
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
    trainer._hard_class_seconds = getattr(trainer, "_hard_class_seconds", 0.0) + seconds
    trainer._hard_class_refreshes = getattr(trainer, "_hard_class_refreshes", 0) + 1
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
    if trainer.is_main:
        trainer._record(rec)
    return rec
