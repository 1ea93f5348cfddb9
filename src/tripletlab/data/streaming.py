"""Images streamed from disk: a map-style dataset over files, per-sample augmentation, a
DataLoader fed by the PK batch sampler, and batched embedding of any number of files.

Memory does not grow with the number of images: each file is decoded and resized when a batch
asks for it (in worker processes), unless the decoded set fits the cache budget, in which case it
is decoded once into one shared uint8 tensor (4x smaller than float32) that every worker reads.

* :class:`ImageFiles` — ``dataset[i]`` (or ``dataset[(i, seed)]`` for a seeded augmentation)
  decodes one file to a float (C, H, W) tensor in [0, 1].
* :func:`scan_images` — the files and labels of an image folder or of a CSV/JSONL manifest.
* :class:`SampleAugment` — the per-sample executor of :class:`~tripletlab.data.augment.AugmentSpec`
  (random resized crop, flip, rotation, shift, zoom, colour jitter for RGB; one ``grid_sample``
  per image; seeded per sample, so results do not depend on the worker). It lives in
  :mod:`tripletlab.data.augment` and is re-exported here.
* :class:`PKStream` — iterate PK batches (``x``, ``y``, ``index``) through a DataLoader; the
  sampler state of the *consumed* batches is what a checkpoint stores, so a resumed run gets
  exactly the same batches and augmentations.
* :func:`guarded` — iterate a DataLoader, a dead worker raised as :class:`DataWorkerError`;
  :func:`image_batches` — its collate function for ``ImageFiles`` items. Embedding streamed
  images: :func:`tripletlab.inference.embed.embed`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ..errors import FileFormatError, InputError, TripletLabError
from .augment import (
    SampleAugment,  # re-exported: documented here since 0.1
    equalize_u8,
)
from .image_sources import (  # re-exported: the sources of streamed images
    MANIFEST_EXTENSIONS,
    class_ids,
    is_manifest,
    probe_images,
    read_image_manifest,
    scan_images,
)
from .loaders import _read_image

__all__ = [
    "DataWorkerError",
    "ImageFiles",
    "MANIFEST_EXTENSIONS",
    "PKStream",
    "SampleAugment",
    "class_ids",
    "guarded",
    "image_batches",
    "is_manifest",
    "probe_images",
    "read_image_manifest",
    "scan_images",
]


class DataWorkerError(TripletLabError, RuntimeError):
    """A data-loading worker process died (killed, out of memory, crashed)."""


# -------------------------------------------------------------------------------- dataset


class ImageFiles(TorchDataset):
    """Map-style dataset over image files, decoded and resized to ``image_size`` (H, W) on
    access. ``channels`` 1 (grey) or 3 (RGB). ``dataset[i]`` returns ``(x, label, i, error)``
    with ``error`` None or the message naming an unreadable file (raised by :class:`PKStream`
    / :func:`tripletlab.inference.embed.embed` in the main process, or counted with ``skip_bad``);
    ``dataset[(i, seed)]`` applies ``augment`` with that seed.

    Example:
        >>> ds = ImageFiles(["a/1.png", "b/2.png"], [0, 1], (64, 64), 1)  # doctest: +SKIP
        >>> x, label, i, err = ds[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        paths: list[str],
        labels,
        image_size: tuple[int, int],
        channels: int,
        augment: SampleAugment | None = None,
        fit: str = "stretch",
        preprocess: str = "none",
    ) -> None:
        if channels not in (1, 3):
            raise InputError(f"channels must be 1 or 3, got {channels}")
        if len(image_size) != 2 or min(image_size) < 4:
            raise InputError(f"image_size must be (H, W) with sides >= 4, got {image_size}")
        if len(paths) != len(labels):
            raise InputError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)
        self.augment = augment
        self.fit = fit  # how files reach image_size (tripletlab.data.loaders.fit_image)
        #: the run's preprocessing (``--equalize``), applied to each decoded file
        self.preprocess = preprocess
        self.cache: torch.Tensor | None = None  # uint8 (N, C, H, W) in shared memory
        self.bad: dict[int, str] = {}  # unreadable files met while caching (with skip_bad)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)

    def cache_bytes(self) -> int:
        return len(self) * self.channels * self.image_size[0] * self.image_size[1]

    def decode(self, i: int) -> torch.Tensor:
        """File ``i`` as uint8 (C, H, W) (raises FileFormatError naming the file)."""
        if self.cache is not None:
            if i in self.bad:
                raise FileFormatError(self.bad[i])
            return self.cache[i]
        arr = _read_image(
            self.paths[i], "L" if self.channels == 1 else "RGB", self.image_size, self.fit
        )
        if self.preprocess not in (None, "none"):
            arr = equalize_u8(arr)
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())

    def __getitem__(self, key):
        i, seed = (key, None) if not isinstance(key, tuple) else key
        i = int(i)
        try:
            x = self.decode(i).float().div_(255.0)
        except FileFormatError as e:
            return torch.zeros(self.input_shape), int(self.labels[i]), i, str(e)
        if seed is not None and self.augment is not None:
            x = self.augment(x, seed)
        return x, int(self.labels[i]), i, None

    def build_cache(self, workers: int = 0, batch_size: int = 64, skip_bad: bool = False) -> None:
        """Decode every file once into a shared uint8 tensor (call before making loaders).
        An unreadable file raises, or with ``skip_bad`` is remembered and raises when used."""
        cache = torch.empty((len(self), *self.input_shape), dtype=torch.uint8)
        loader = DataLoader(
            _Decoded(self), batch_size=batch_size, num_workers=workers, collate_fn=_stack_u8
        )
        for idx, arrs, errors in guarded(loader):
            for i, e in zip(idx.tolist(), errors, strict=True):
                if e and not skip_bad:
                    raise FileFormatError(f"{e} (pass --skip-bad to skip such files)")
                if e:
                    self.bad[i] = e
            cache[idx] = arrs
        cache.share_memory_()
        self.cache = cache


class _Decoded(TorchDataset):
    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, self.files.decode(i), None
        except FileFormatError as e:
            return i, torch.zeros(self.files.input_shape, dtype=torch.uint8), str(e)


def _stack_u8(items):
    return (
        torch.tensor([t[0] for t in items]),
        torch.stack([t[1] for t in items]),
        [t[2] for t in items],
    )


def image_batches(items):
    """Collate ``ImageFiles`` items: ``(x, labels, indices, errors)`` of a batch."""
    return (
        torch.stack([t[0] for t in items]),
        torch.tensor([t[1] for t in items], dtype=torch.long),
        torch.tensor([t[2] for t in items], dtype=torch.long),
        [t[3] for t in items],
    )


def _defer_sigchld() -> None:
    """Keep PyTorch's SIGCHLD handler from raising asynchronously.

    With worker processes, PyTorch installs a SIGCHLD handler that raises "DataLoader worker
    ... is killed by signal" wherever the main thread happens to be when a worker dies:
    inside a weakref callback (where Python ignores it), a checkpoint write, or the compiler
    (CPython then fails with "AST constructor recursion depth mismatch"). The wrapper drops that
    one error. The DataLoader also polls its workers while it waits for a batch (every 5 s), so
    the death is still reported, from ``next()``, where :func:`guarded` names it.
    """
    import signal
    import threading

    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGCHLD)
    if not callable(current) or getattr(current, "_tripletlab_deferred", False):
        return

    def handler(signum, frame):
        try:
            current(signum, frame)
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise

    handler._tripletlab_deferred = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGCHLD, handler)


def guarded(loader: DataLoader) -> Iterator:
    """Iterate a DataLoader; a dead worker becomes a :class:`DataWorkerError`."""
    it = iter(loader)
    if loader.num_workers:
        _defer_sigchld()  # PyTorch's handler exists once the first worker pool has started
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            if "worker" in str(e).lower() and "DataLoader" in str(e):
                raise _worker_died(str(e).splitlines()[0]) from None
            raise
        except (ConnectionError, EOFError) as e:
            # a batch whose worker died before the main process fetched its shared memory
            if loader.num_workers:
                raise _worker_died(f"{type(e).__name__}: {e}") from None
            raise
        yield batch


_guard = guarded  # the earlier private name


def _worker_died(detail: str) -> DataWorkerError:
    return DataWorkerError(
        f"a data-loading worker process died ({detail}); "
        "lower --workers (0 decodes in the main process) or free memory"
    )


def _sample_seed(seed: int, epoch: int, position: int, j: int) -> int:
    ss = np.random.SeedSequence([int(seed), int(epoch), int(position), int(j)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)


class _SeededBatches:
    """Batch sampler: the PK sampler's batches from its current state, each index paired with
    a per-sample augmentation seed derived from (seed, epoch, position, slot)."""

    def __init__(self, sampler, seed: int, epochs: int | None = None) -> None:
        self.sampler, self.seed = sampler, seed

    def __iter__(self):
        s = self.sampler
        while True:
            epoch, pos = s.epoch, s.position
            for b in s:
                yield [(i, _sample_seed(self.seed, epoch, pos, j)) for j, i in enumerate(b)]
                pos += 1


class PKStream:
    """PK batches of streamed (and augmented) images through a DataLoader.

    ``next(stream)`` returns ``(x, y, index)`` of one batch. :meth:`state_dict` is the PK
    sampler's state after the batches *consumed* so far (the DataLoader reads ahead), so a
    checkpoint saved between steps resumes with exactly the same next batch. Unreadable files
    raise :class:`FileFormatError` naming the file in the main process, or with ``skip_bad``
    are dropped from their batch and counted in ``skipped``; a dead worker raises
    :class:`DataWorkerError`.

    Example:
        >>> stream = PKStream(files, PKSampler(files.labels, 8, 4), workers=2)  # doctest: +SKIP
        >>> x, y, idx = next(stream)  # doctest: +SKIP
    """

    def __init__(
        self,
        files: ImageFiles,
        sampler,
        workers: int = 0,
        seed: int = 0,
        skip_bad: bool = False,
        prefetch: int = 2,
    ) -> None:
        self.files, self.sampler, self.workers = files, sampler, int(workers)
        self.seed, self.skip_bad, self.prefetch = int(seed), bool(skip_bad), prefetch
        self.skipped = 0
        self._it: Iterator | None = None
        self._start = (sampler.epoch, sampler.position)
        self._consumed = 0

    def _open(self) -> None:
        self._start = (self.sampler.epoch, self.sampler.position)
        self._consumed = 0
        kw = {"prefetch_factor": self.prefetch, "persistent_workers": False} if self.workers else {}
        loader = DataLoader(
            self.files,
            batch_sampler=_SeededBatches(self.sampler, self.seed),
            num_workers=self.workers,
            collate_fn=image_batches,
            **kw,
        )
        self._it = guarded(loader)

    def __iter__(self) -> PKStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._open()
        assert self._it is not None
        x, y, idx, errors = next(self._it)
        self._consumed += 1
        bad = [j for j, e in enumerate(errors) if e]
        if bad:
            if not self.skip_bad:
                self.close()
                raise FileFormatError(f"{errors[bad[0]]} (pass --skip-bad to skip such files)")
            self.skipped += len(bad)
            keep = torch.tensor([j for j in range(len(errors)) if not errors[j]], dtype=torch.long)
            x, y, idx = x[keep], y[keep], idx[keep]
            if self.skipped == len(bad):
                warnings.warn(f"skipping unreadable image: {errors[bad[0]]}", stacklevel=2)
        return x, y, idx

    def state_dict(self) -> dict:
        """The PK sampler's state after the consumed batches."""
        st = self.sampler.state_dict()
        bpe = self.sampler.batches_per_epoch
        total = self._start[1] + self._consumed
        st["epoch"], st["position"] = self._start[0] + total // bpe, total % bpe
        return st

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        """Stop the workers; the next batch reopens the loader at the consumed position."""
        if self._it is not None:
            st = self.state_dict()
            self._it = None  # the DataLoader iterator shuts its workers down when collected
            self.sampler.load_state_dict(st)
