"""PK batch sampling: P classes x K samples per batch (Hermans et al. 2017)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from .errors import InputError

__all__ = ["DistributedPKSampler", "HardClassSampler", "PKSampler"]


class PKSampler:
    """Batches of ``p`` distinct classes with ``k`` samples each; never a single-class batch.

    Within an epoch each class's items are visited in a seeded random order (cycled), and classes
    are drawn so that every class appears about equally often. Classes with fewer than ``k``
    items are sampled with replacement (counted in a warning). The order depends only on
    ``(seed, epoch)``; ``state_dict()`` stores the epoch and the position within it so a resumed
    run continues with exactly the same batches.

    Example:
        >>> import torch
        >>> from tripletlab.samplers import PKSampler
        >>> sampler = PKSampler(torch.arange(10).repeat(8), p=4, k=4, seed=0)
        >>> batch = next(iter(sampler))
        >>> len(batch)
        16
    """

    def __init__(
        self, labels, p: int, k: int, seed: int = 0, batches_per_epoch: int | None = None
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


class HardClassSampler:
    """PK batches whose P classes come in groups of mutually close classes (global hard-class
    mining): each group is a seed class plus ``group - 1`` classes drawn at random from the
    seed's ``pool`` nearest classes in the current embedding (:meth:`set_neighbours`, refreshed
    every N steps by :func:`tripletlab.hard_classes.refresh_hard_classes`). Before the first
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
