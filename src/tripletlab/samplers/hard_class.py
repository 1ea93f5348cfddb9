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
    >>> from tripletlab.samplers.hard_class import class_centroids, nearest_classes
    >>> emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [0.2, 0.1]])
    >>> centroids, present = class_centroids(emb, torch.tensor([0, 0, 1, 1, 2]), 3)
    >>> nearest_classes(centroids, present, n=1).tolist()
    [[2], [2], [0]]
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ..distances import distance_matrix
from ..errors import InputError

__all__ = [
    "HardClassSampler",
    "class_centroids",
    "nearest_classes",
    "nearest_classes_by_items",
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
    from ..index.embedding_index import EmbeddingIndex

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


class HardClassSampler:
    """PK batches whose P classes come in groups of mutually close classes (global hard-class
    mining): each group is a seed class plus ``group - 1`` classes drawn at random from the
    seed's ``pool`` nearest classes in the current embedding (:meth:`set_neighbours`, refreshed
    every N steps by :func:`~.train.hard_class_refresh.refresh_hard_classes`). Before the first
    refresh (no neighbour table) the groups are random, so the batches are plain PK batches.

    Seed classes follow a seeded per-epoch permutation, so every class seeds about equally
    many groups; the K items of a class are drawn without replacement within the batch (with
    replacement for classes with fewer than K items). A batch is a pure function of
    ``(seed, epoch, position, neighbour table)``, so a streamed DataLoader may read ahead and
    :meth:`state_dict` (which holds the table) resumes exactly. Needs more classes than P
    (with P or fewer every batch already holds every class).

    Example:
        >>> import numpy as np
        >>> from tripletlab.samplers import HardClassSampler
        >>> s = HardClassSampler(np.arange(12).repeat(6), p=4, k=3, group=2, seed=0)
        >>> s.set_neighbours(np.array([[(c + 1) % 12, (c + 2) % 12] for c in range(12)]), step=0)
        >>> batch = next(iter(s))
        >>> len(batch), len({i // 6 for i in batch})
        (12, 4)
    """

    def __init__(
        self,
        labels,
        p: int,
        k: int,
        seed: int = 0,
        group: int = 4,
        pool: int | None = None,
        batches_per_epoch: int | None = None,
    ) -> None:
        y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if y.ndim != 1 or y.size == 0:
            raise InputError("HardClassSampler needs a non-empty 1-D array of labels")
        if p < 2 or k < 1:
            raise InputError(f"HardClassSampler needs p >= 2 and k >= 1, got p={p}, k={k}")
        self.classes = np.unique(y)
        n_cls = len(self.classes)
        if n_cls <= p:
            raise InputError(
                f"hard-class sampling needs more classes than P: {n_cls} classes, P = {p} "
                "(every batch already holds every class); use --sampler pk or a smaller --p"
            )
        if not 2 <= group <= p:
            raise InputError(f"--hard-class-group must be in [2, P = {p}], got {group}")
        pool = 2 * (group - 1) if pool is None else int(pool)
        if pool < group - 1:
            raise InputError(f"the neighbour pool ({pool}) must be >= group - 1 ({group - 1})")
        self.p, self.k, self.seed, self.group = int(p), int(k), int(seed), int(group)
        self.pool = min(pool, n_cls - 1)
        self.by_class = [np.flatnonzero(y == c) for c in self.classes]
        self.n_items = int(len(y))
        self.batches_per_epoch = int(batches_per_epoch or math.ceil(len(y) / (self.p * self.k)))
        self.neighbours: np.ndarray | None = None  # (C, pool) class positions, -1 = none
        self.refreshed_at = -1  # the step of the last set_neighbours
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.position = 0

    def set_neighbours(self, neighbours, step: int) -> None:
        """Use ``neighbours`` (C, >= pool) from now on: row c lists class positions (indices
        into ``self.classes``) nearest first; -1 pads a short row."""
        nb = np.asarray(neighbours, dtype=np.int64)
        n_cls = len(self.classes)
        if nb.ndim != 2 or nb.shape[0] != n_cls or nb.shape[1] < self.pool:
            raise InputError(
                f"the neighbour table must have shape ({n_cls}, >= {self.pool}), got {nb.shape}"
            )
        nb = nb[:, : self.pool]
        if nb.size and (nb.min() < -1 or nb.max() >= n_cls):
            raise InputError(f"neighbour table entries must be in [-1, {n_cls})")
        self.neighbours = nb.copy()
        self.refreshed_at = int(step)

    def batch(self, epoch: int, position: int) -> list[int]:
        """The item indices of batch ``position`` of ``epoch`` (no state is changed)."""
        n_cls = len(self.classes)
        order = np.random.default_rng([self.seed, epoch]).permutation(n_cls)
        rng = np.random.default_rng([self.seed, epoch, position, 1])
        groups = math.ceil(self.p / self.group)
        chosen: list[int] = []
        taken = np.zeros(n_cls, dtype=bool)

        def take(c: int) -> None:
            chosen.append(int(c))
            taken[c] = True

        for g in range(groups):
            if len(chosen) >= self.p:
                break
            s = int(order[(position * groups + g) % n_cls])
            if taken[s]:  # already in an earlier group: a random free class seeds this one
                s = int(rng.choice(np.flatnonzero(~taken)))
            take(s)
            want = min(self.group - 1, self.p - len(chosen))
            near = (
                []
                if self.neighbours is None
                else [int(c) for c in self.neighbours[s] if c >= 0 and not taken[c]]
            )
            n_near = min(want, len(near))
            if n_near:
                for c in rng.choice(near, size=n_near, replace=False):
                    take(int(c))
            if want > n_near:  # no table yet, or too few free neighbours: random classes
                for c in rng.choice(np.flatnonzero(~taken), size=want - n_near, replace=False):
                    take(int(c))
        batch: list[int] = []
        for c in chosen:
            idx = self.by_class[c]
            batch += rng.choice(idx, size=self.k, replace=len(idx) < self.k).tolist()
        return [int(i) for i in batch]

    def __iter__(self) -> Iterator[list[int]]:
        while self.position < self.batches_per_epoch:
            b = self.batch(self.epoch, self.position)
            self.position += 1
            yield b
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        """JSON-serialisable: the position, the settings it depends on and the neighbour
        table in use (the batches depend on it)."""
        return {
            "sampler": "hard-class",
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "p": self.p,
            "k": self.k,
            "group": self.group,
            "pool": self.pool,
            "n_items": self.n_items,
            "batches_per_epoch": self.batches_per_epoch,
            "refreshed_at": self.refreshed_at,
            "neighbours": None if self.neighbours is None else self.neighbours.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; a state of another sampler or other settings is an
        InputError."""
        if state.get("sampler") != "hard-class":
            raise InputError(
                "the checkpoint's sampler state is not a hard-class sampler's; resume with the "
                "run's own --sampler"
            )
        for key in ("seed", "p", "k", "group", "pool", "n_items", "batches_per_epoch"):
            if int(state[key]) != getattr(self, key):
                raise InputError(
                    f"sampler state was saved with {key}={state[key]}, this sampler has "
                    f"{key}={getattr(self, key)}; the batches would differ"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise InputError(f"invalid sampler state: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
        if state.get("neighbours") is None:
            self.neighbours, self.refreshed_at = None, int(state.get("refreshed_at", -1))
        else:
            self.set_neighbours(state["neighbours"], int(state["refreshed_at"]))
