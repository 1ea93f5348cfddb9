"""Where a training step's batches come from: one :class:`Batches` interface, three sources.

The :class:`~tripletlab.train.Trainer` loop does not care whether a batch was indexed out of an
in-memory data set, decoded by DataLoader workers from disk, or read from a frozen backbone's
cached features: each source yields :class:`Batch` ``(x, y, size)`` already on the device (and
augmented where the source augments) and says which function embeds its ``x``
(:meth:`Batches.forward`). Each is resumable (``state_dict`` / ``load_state_dict``: the state the
checkpoint stores under ``"sampler"``).

- :class:`IndexBatches`: PK index batches of an in-memory training split (``PKSampler``,
  ``HardClassSampler``, ``DistributedPKSampler`` or any resumable iterable of index lists).
- :class:`StreamBatches`: the PK stream of images read from disk (:func:`make_stream`).
- :class:`CachedFeatureBatches`: a frozen backbone's cached features
  (:class:`~tripletlab.train.feature_cache.FeatureCache`); the step runs the head alone.

Example:
    >>> import torch
    >>> from tripletlab.samplers import PKSampler
    >>> y = torch.tensor([0, 0, 1, 1, 2, 2])
    >>> data = type("D", (), {"y": y, "inputs": lambda self, i: torch.zeros(len(i), 3)})()
    >>> batches = IndexBatches(PKSampler(y, p=2, k=2, seed=0), data, torch.device("cpu"))
    >>> b = next(iter(batches))
    >>> b.x.shape, b.size, batches.epoch
    (torch.Size([4, 3]), 4, 0)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..data.streaming import ImageFiles, PKStream
from .image_data import default_workers, part_files, stream_augment

__all__ = [
    "Batch",
    "Batches",
    "CachedFeatureBatches",
    "IndexBatches",
    "SamplerBatches",
    "StreamBatches",
    "make_stream",
]


@dataclass
class Batch:
    """One training batch: inputs ``x`` (a tensor, or a list of strings for text), labels ``y``
    (on the device) and ``size``, the number of training items it stands for."""

    x: Any
    y: torch.Tensor
    size: int


class Batches(Protocol):
    """A resumable source of training batches (see the module docstring)."""

    #: the sampler's epoch (logged with each metrics.jsonl line)
    epoch: int

    def __iter__(self) -> Iterator[Batch]:
        """Batches of one pass (an epoch), or endless for a stream."""
        ...

    def forward(self, model_forward: Callable) -> Callable:
        """The function a step embeds this source's ``x`` with (``model_forward``: the
        trainer's model, compiled or wrapped for DDP)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None:
        """Drop whatever was read ahead (a sampler's table changed); the next batch is read
        from the saved position."""
        ...


class SamplerBatches:
    """The common part of batches drawn by a sampler (anything with ``epoch``,
    ``state_dict`` and ``load_state_dict``): the epoch and the resumable state are the
    sampler's, the model's forward is used as it is and nothing is read ahead. Subclasses
    define ``__iter__``."""

    sampler: Any

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def forward(self, model_forward: Callable) -> Callable:
        return model_forward

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        pass


class IndexBatches(SamplerBatches):
    """PK index batches of an in-memory split: ``data.inputs(idx)`` / ``data.y[idx]``, moved
    to ``device``, augmented by ``augment`` (an ``Augment`` or None) and made channels-last
    when asked (faster convolutions on CUDA)."""

    def __init__(
        self,
        sampler,
        data,
        device: torch.device,
        augment: Callable | None = None,
        channels_last: bool = False,
    ) -> None:
        self.sampler, self.data, self.device = sampler, data, device
        self.augment, self.channels_last = augment, channels_last

    def __iter__(self) -> Iterator[Batch]:
        for idx in self.sampler:
            x = self.data.inputs(idx)
            x = x.to(self.device) if torch.is_tensor(x) else x  # text: a list of strings
            y = self.data.y[idx].to(self.device)
            if self.augment is not None:
                x = self.augment(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(x, y, len(idx))


class StreamBatches:
    """Batches of the image stream (augmented per image in its workers); endless."""

    def __init__(self, stream: PKStream, device: torch.device, channels_last: bool = False):
        self.stream, self.device, self.channels_last = stream, device, channels_last

    @property
    def epoch(self) -> int:
        return self.stream.sampler.epoch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            x, y, _ = next(self.stream)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(x, y, len(y))

    def forward(self, model_forward: Callable) -> Callable:
        return model_forward

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def close(self) -> None:
        self.stream.close()


class CachedFeatureBatches(SamplerBatches):
    """Batches of a frozen backbone's cached features (each item of its mirror image with
    chance 1/2 when the cache holds them); the step runs only what is trained on them
    (:meth:`~tripletlab.train.feature_cache.FeatureCache.head_input`)."""

    def __init__(self, sampler, cache, labels: torch.Tensor, device: torch.device, model):
        self.sampler, self.cache, self.labels = sampler, cache, labels
        self.device, self.model = device, model

    def __iter__(self) -> Iterator[Batch]:
        for idx in self.sampler:
            x = self.cache.batch(idx).to(self.device)
            yield Batch(x, self.labels[idx].to(self.device), len(idx))

    def forward(self, model_forward: Callable) -> Callable:
        return self.cache.head_input(self.model)


def make_stream(cfg, files: ImageFiles, train_set, sampler, aug) -> PKStream:
    """The PK stream of the training split (cached in shared memory when it fits); ``aug``:
    the augmentation spec, read in the streamed vocabulary (:func:`stream_augment`)."""
    train_files = part_files(files, train_set, stream_augment(aug))
    workers = cfg.workers if cfg.workers is not None else default_workers()
    if train_files.cache_bytes() <= cfg.cache_mb * 2**20:
        train_files.build_cache(workers=workers, skip_bad=cfg.skip_bad)
    return PKStream(train_files, sampler, workers=workers, seed=cfg.seed + 2, skip_bad=cfg.skip_bad)
