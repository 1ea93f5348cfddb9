"""Opening a data source for training: image folders and manifests in memory when small,
streamed from disk when the decoded set would exceed :data:`STREAM_ABOVE_BYTES` (or
``stream=True``); digits, MNIST idx folders and vector/text files through
:func:`~tripletlab.data.load_dataset` (in memory: faster for them).

Plain arguments only: the trainer's choices from the data (input size, steps) come in through
``choose`` (``tripletlab.train.image_data.open_data`` is the trainer's adapter).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import FileFormatError, InputError
from .dataset import Dataset
from .loaders import is_idx_dir, load_dataset, warn_skipped
from .streaming import ImageFiles, class_ids, is_manifest, probe_images, scan_images

__all__ = ["STREAM_ABOVE_BYTES", "decode_all", "is_image_source", "open_data"]

STREAM_ABOVE_BYTES = 512 * 2**20  # decoded float32 size above which images are streamed


def is_image_source(spec: str) -> bool:
    """An image folder (not an idx folder) or a CSV/JSONL image manifest.

    Example:
        >>> is_image_source("digits")
        False
    """
    if spec == "digits":
        return False
    p = Path(spec)
    return (p.is_dir() and not is_idx_dir(p)) or is_manifest(spec)


def open_data(
    spec: str,
    *,
    image_size: tuple[int, int] | list[int] | None = None,
    grayscale: bool | None = None,
    skip_bad: bool = False,
    stream: bool | None = None,
    fit: str = "stretch",
    choose: Callable[[int, tuple[int, int] | None, int], tuple] | None = None,
    explain: bool = True,
) -> tuple[Dataset, ImageFiles | None, list[str]]:
    """``(dataset, files, notes)`` of the data source ``spec``: for streamed images the
    dataset's ``x`` is an empty placeholder and ``files`` decodes on access; ``notes`` the
    automatic choices made, one line each.

    ``choose(n_images, native_size, n_classes) -> (image_size, notes)``: called for image
    folders and manifests before the size is fixed, to choose settings from the data (the
    returned size replaces ``image_size``). ``stream`` None: stream when the decoded images
    would exceed :data:`STREAM_ABOVE_BYTES` (said in ``notes`` when ``explain``).
    """
    if not is_image_source(spec):
        size = tuple(image_size) if image_size else None
        ds = load_dataset(spec, image_size=size, grayscale=grayscale, skip_bad=skip_bad, fit=fit)
        return ds, None, []
    paths, labels = scan_images(spec, skip_bad=skip_bad)
    native, channels = probe_images(paths)
    if grayscale is not None:
        channels = 1 if grayscale else 3
    notes: list[str] = []
    if choose is not None:
        image_size, notes = choose(len(paths), native, len(set(labels)))
        notes = list(notes)
    size = tuple(image_size) if image_size else native
    decoded = len(paths) * channels * (size[0] * size[1] if size else 224 * 224) * 4
    streamed = stream if stream is not None else decoded > STREAM_ABOVE_BYTES
    if streamed and stream is None and explain:
        notes.append(
            f"streaming {len(paths)} images from disk (decoded they would take "
            f"{decoded / 2**30:.1f} GiB)"
        )
    ids, classes = class_ids(labels)
    name = Path(spec).stem if is_manifest(spec) else (Path(spec).name or spec)
    if not streamed and not is_manifest(spec):  # the in-memory folder loader (fastest when small)
        ds = load_dataset(
            spec,
            image_size=size if image_size else None,
            grayscale=grayscale,
            skip_bad=skip_bad,
            fit=fit,
        )
        return ds, None, notes
    if size is None:
        raise InputError(
            f"the images of {spec} differ in size; pass --image-size H W to resize them"
        )
    files = ImageFiles(paths, ids, size, channels, fit=fit)
    if not streamed:  # a small manifest: decode it once into memory
        x, y_kept, kept = decode_all(files, skip_bad)
        ds = Dataset(
            x=x,
            y=y_kept,
            classes=classes,
            paths=[paths[i] for i in kept],
            kind="image",
            name=name,
            info={"source": str(spec)},
        )
        return ds, None, notes
    ds = Dataset(
        x=torch.zeros(len(paths), 0),
        y=torch.tensor(ids, dtype=torch.long),
        classes=classes,
        paths=list(paths),
        kind="image",
        name=name,
        info={"source": str(spec), "streamed": True, "input_shape": list(files.input_shape)},
    )
    return ds, files, notes


def decode_all(files: ImageFiles, skip_bad: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``(x, labels, indices kept)``: every readable file of ``files`` decoded into memory
    (an unreadable one raises :class:`FileFormatError`, or with ``skip_bad`` is left out)."""
    xs, kept, bad = [], [], []
    for i in range(len(files)):
        x, _, _, err = files[i]
        if err:
            if not skip_bad:
                raise FileFormatError(err)
            bad.append(err)
            continue
        xs.append(x)
        kept.append(i)
    warn_skipped(bad, stacklevel=3)
    if not xs:
        raise FileFormatError("no readable images")
    return torch.stack(xs), files.labels[kept], kept
