"""PK batch sampling: P classes x K samples per batch (Hermans et al. 2017)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import InputError

__all__ = ["DistributedPKSampler", "PKSampler"]


class PKSampler:
    """Batches of ``p`` distinct classes with ``k`` samples each; never a single-class batch.

    Within an epoch each class's items are visited in a seeded random order (cycled), and classes
    are drawn so that every class appears about equally often. Classes with fewer than ``k``
    items are sampled with replacement (counted in a warning). The order depends only on
    ``(seed, epoch)``; ``state_dict()`` stores the epoch and the position within it so a resumed
    run continues with exactly the same batches.

    ``class_weights`` (one weight >= 0 per class, in the order of the sorted label values, or
    a dict label -> weight): the P classes of a batch are drawn without replacement with
    chances proportional to the weights (e.g. a ratio between the classes of several sources)
    instead of the equal-frequency class queue.

    Example:
        >>> import torch
        >>> from tripletlab.samplers import PKSampler
        >>> sampler = PKSampler(torch.arange(10).repeat(8), p=4, k=4, seed=0)
        >>> batch = next(iter(sampler))
        >>> len(batch)
        16
    """

    def __init__(
        self,
        labels,
        p: int,
        k: int,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        class_weights=None,
    ) -> None:
        y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if y.ndim != 1 or y.size == 0:
            raise InputError("PKSampler needs a non-empty 1-D array of labels")
        if p < 2 or k < 1:
            raise InputError(f"PKSampler needs p >= 2 and k >= 1, got p={p}, k={k}")
        classes = np.unique(y)
        if len(classes) < 2:
            raise InputError(
                "PKSampler needs at least 2 classes (a one-class batch has no negatives)"
            )
        if p > len(classes):
            warnings.warn(
                f"p={p} exceeds the {len(classes)} classes; using p={len(classes)}", stacklevel=2
            )
            p = len(classes)
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.classes = classes
        self.weights = None
        if class_weights is not None:
            w = np.asarray(
                [float(class_weights[int(c)]) for c in classes]
                if isinstance(class_weights, dict)
                else class_weights,
                dtype=np.float64,
            )
            if w.shape != (len(classes),) or not np.all(np.isfinite(w)) or np.any(w < 0):
                raise InputError(
                    f"class_weights must be {len(classes)} finite weights >= 0 (one per class)"
                )
            if np.count_nonzero(w) < self.p:
                raise InputError(f"class_weights: fewer than p={self.p} classes have weight > 0")
            self.weights = w / w.sum()
        self.by_class = [np.flatnonzero(y == c) for c in classes]
        self.small = [int(c) for c, idx in zip(classes, self.by_class, strict=True) if len(idx) < k]
        if self.small:
            warnings.warn(
                f"{len(self.small)} classes have fewer than k={k} items and are sampled with "
                "replacement",
                stacklevel=2,
            )
        self.batches_per_epoch = int(batches_per_epoch or math.ceil(len(y) / (self.p * self.k)))
        self.n_items = int(len(y))
        self.epoch = 0
        self.position = 0  # batches already produced in the current epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.position = 0

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        n_cls = len(self.classes)
        cursors = [0] * n_cls
        orders = [rng.permutation(idx) for idx in self.by_class]
        class_queue: list[int] = []
        batches = []
        for _ in range(self.batches_per_epoch):
            chosen: list[int] = []
            if self.weights is not None:  # classes drawn by weight (e.g. a share per source)
                chosen = rng.choice(n_cls, size=self.p, replace=False, p=self.weights).tolist()
            while len(chosen) < self.p:
                if not class_queue:
                    class_queue = rng.permutation(n_cls).tolist()
                c = class_queue.pop()
                if c not in chosen:
                    chosen.append(c)
            batch = []
            for c in chosen:
                idx = orders[c]
                if len(idx) < self.k:
                    batch += rng.choice(idx, size=self.k, replace=True).tolist()
                    continue
                for _ in range(self.k):
                    if cursors[c] >= len(idx):
                        orders[c] = rng.permutation(self.by_class[c])
                        cursors[c] = 0
                        idx = orders[c]
                    batch.append(int(idx[cursors[c]]))
                    cursors[c] += 1
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches(self.epoch)
        while self.position < len(batches):
            b = batches[self.position]
            self.position += 1
            yield b
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        """JSON-serialisable ints: where the next batch comes from, plus the settings it
        depends on (checked by :meth:`load_state_dict`)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "p": self.p,
            "k": self.k,
            "n_items": self.n_items,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; a state saved with other settings is an InputError."""
        for key in ("seed", "p", "k", "n_items", "batches_per_epoch"):
            if key in state and int(state[key]) != getattr(self, key):
                raise InputError(
                    f"sampler state was saved with {key}={state[key]}, this sampler has "
                    f"{key}={getattr(self, key)}; the batches would differ"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise InputError(f"invalid sampler state: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position


class DistributedPKSampler:
    """One global PK batch per step, sharded across ranks: rank ``r`` gets the ``r``-th of
    ``world_size`` contiguous slices of the batch :class:`PKSampler` would produce for one
    process (so a class's K samples may land on different ranks, and the gathered batch in rank
    order *is* the single-process batch). ``P*K`` must be divisible by ``world_size``.

    Every rank builds the same global sequence from the same seed; ``state_dict`` is the wrapped
    sampler's, so a run can resume with another world size that divides the batch.

    Example:
        >>> import torch
        >>> from tripletlab.samplers import DistributedPKSampler, PKSampler
        >>> labels = torch.arange(10).repeat(8)
        >>> ranks = [DistributedPKSampler(PKSampler(labels, 4, 4, seed=0), r, 2) for r in (0, 1)]
        >>> shards = [next(iter(s)) for s in ranks]  # each rank: 8 of the 16 items
        >>> shards[0] + shards[1] == next(iter(PKSampler(labels, 4, 4, seed=0)))
        True
    """

    def __init__(self, base: PKSampler, rank: int, world_size: int) -> None:
        batch = base.p * base.k
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"invalid rank {rank} of world size {world_size}")
        if batch % world_size:
            raise InputError(
                f"the global batch P*K = {base.p}*{base.k} = {batch} does not divide into "
                f"{world_size} processes: choose --p/--k with P*K a multiple of {world_size} "
                f"or another --nproc_per_node"
            )
        self.base, self.rank, self.world_size = base, int(rank), int(world_size)
        self.local_batch = batch // world_size

    def __len__(self) -> int:
        return len(self.base)

    @property
    def epoch(self) -> int:
        return self.base.epoch

    @property
    def position(self) -> int:
        return self.base.position

    @property
    def batches_per_epoch(self) -> int:
        return self.base.batches_per_epoch

    @property
    def p(self) -> int:
        """Classes of the global batch."""
        return self.base.p

    @property
    def k(self) -> int:
        """Items per class of the global batch."""
        return self.base.k

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.local_batch
        for batch in self.base:
            yield batch[lo : lo + self.local_batch]

    def state_dict(self) -> dict:
        """The wrapped sampler's state (the global position)."""
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue the global sequence from ``state``."""
        self.base.load_state_dict(state)
