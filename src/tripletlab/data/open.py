"""Opening a data source for training: image folders and manifests in memory when small,
streamed from disk when the decoded set would exceed :data:`STREAM_ABOVE_BYTES` (or
``stream=True``); digits, MNIST idx folders and vector/text files through
:func:`~tripletlab.data.load_dataset` (in memory: faster for them).

Plain arguments only: the trainer's choices from the data (input size, steps) come in through
``choose`` (``tripletlab.train.image_data.open_data`` is the trainer's adapter).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import FileFormatError, InputError
from .dataset import Dataset, natural_key
from .image_sources import MANIFEST_EXTENSIONS
from .loaders import is_idx_dir, load_dataset, warn_skipped
from .streaming import ImageFiles, class_ids, is_manifest, probe_images, scan_images

__all__ = [
    "STREAM_ABOVE_BYTES",
    "data_sources",
    "decode_all",
    "is_image_source",
    "open_data",
    "open_val_data",
    "scan_sources",
    "source_name",
    "source_of",
]

STREAM_ABOVE_BYTES = 512 * 2**20  # decoded float32 size above which images are streamed


def is_image_source(spec: str) -> bool:
    """An image folder (not an idx folder) or a CSV/JSONL image manifest (a list of several
    sources is not one source: False).

    Example:
        >>> is_image_source("digits"), is_image_source(["a", "b"])
        (False, False)
    """
    if not isinstance(spec, (str, os.PathLike)) or spec == "digits":
        return False
    p = Path(spec)
    return (p.is_dir() and not is_idx_dir(p)) or is_manifest(spec)


def data_sources(spec) -> list[str]:
    """The sources of a ``data`` option: one string, or a list of them (several training
    sources, ``--data A --data B``).

    Example:
        >>> data_sources("digits"), data_sources(["a", "b"])
        (['digits'], ['a', 'b'])
    """
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise InputError("no data source given")
        return [str(s) for s in spec]
    return [str(spec)]


def source_name(spec: str) -> str:
    """The name a source's classes are prefixed with: its folder's name (a manifest: its file
    name without the extension).

    Example:
        >>> source_name("../shared/data/att_faces/"), source_name("people.csv")
        ('att_faces', 'people')
    """
    p = Path(spec)
    if p.suffix.lower() in MANIFEST_EXTENSIONS:  # a manifest (or other data file): its stem
        return p.stem
    return p.resolve().name if not p.name else p.name


def source_of(class_name: str) -> str:
    """The source of a class of a several-source data set (its first path component:
    ``att_faces/s1`` -> ``att_faces``).

    Example:
        >>> source_of("att_faces/s1")
        'att_faces'
    """
    return class_name.split("/", 1)[0]


def scan_sources(specs: list[str], skip_bad: bool = False) -> tuple[list, list, list[dict]]:
    """``(paths, labels, sources)`` of several image folders / manifests: labels prefixed by
    the source's name (``att_faces/s1``; disjoint label spaces), ``sources`` one
    ``{"name", "spec", "items", "classes", "native_size", "channels"}`` per source. Two sources of
    the same name are an :class:`InputError` (their classes would merge)."""
    paths: list[str] = []
    labels: list[str] = []
    sources: list[dict] = []
    for spec in specs:
        if not is_image_source(spec):
            raise InputError(
                f"several --data sources must each be an image folder or a path,label "
                f"manifest; {spec} is not"
            )
        name = source_name(spec)
        if any(s["name"] == name for s in sources):
            raise InputError(
                f"two data sources are named {name!r} (classes are prefixed by the folder "
                "name): give them folders (or links) of different names"
            )
        p, lab = scan_images(spec, skip_bad=skip_bad)
        native, channels = probe_images(p)
        paths += p
        labels += [f"{name}/{x}" for x in lab]
        sources.append(
            {
                "name": name,
                "spec": str(spec),
                "items": len(p),
                "classes": len(set(lab)),
                "native_size": list(native) if native else None,
                "channels": channels,
            }
        )
    return paths, labels, sources


def _open_sources(
    specs: list[str],
    image_size,
    grayscale: bool | None,
    skip_bad: bool,
    stream: bool | None,
    choose,
    explain: bool,
    fit: str = "stretch",
) -> tuple[Dataset, ImageFiles | None, list[str]]:
    """:func:`open_data` of several image sources (one data set, classes prefixed by source).
    Sources of different sizes are resized to ``image_size`` or, when none is given, to the
    first source's size (said in the notes); RGB when any source is colour (``grayscale``
    None)."""
    paths, labels, sources = scan_sources(specs, skip_bad)
    channels = 3 if any(s["channels"] == 3 for s in sources) else 1
    if grayscale is not None:
        channels = 1 if grayscale else 3
    sizes = [tuple(s["native_size"]) if s["native_size"] else None for s in sources]
    native = sizes[0]
    notes: list[str] = []
    if choose is not None:
        image_size, notes = choose(len(paths), native, len(set(labels)))
        notes = list(notes)
    size = tuple(image_size) if image_size else native
    if size is None:
        raise InputError(
            f"the images of {specs[0]} differ in size; pass --image-size H W to resize them"
        )
    if not image_size and len(set(sizes)) > 1 and explain:
        shown = ", ".join(
            f"{s['name']} {z[0]}x{z[1]}" if z else f"{s['name']} mixed"
            for s, z in zip(sources, sizes, strict=True)
        )
        notes.append(
            f"the sources differ in size ({shown}): every image is resized to "
            f"{size[0]}x{size[1]}, the first source's (--image-size H W to choose)"
        )
    if explain and grayscale is None and len({s["channels"] for s in sources}) > 1:
        notes.append("some sources are colour: grey images are read as RGB (--grayscale)")
    decoded = len(paths) * channels * size[0] * size[1] * 4
    streamed = stream if stream is not None else decoded > STREAM_ABOVE_BYTES
    if streamed and stream is None and explain:
        notes.append(
            f"streaming {len(paths)} images from disk (decoded they would take "
            f"{decoded / 2**30:.1f} GiB)"
        )
    ids, classes = class_ids(labels)
    info = {"source": list(specs), "sources": sources}
    name = "+".join(s["name"] for s in sources)
    files = ImageFiles(paths, ids, size, channels, fit=fit)
    if not streamed:
        x, y_kept, kept = decode_all(files, skip_bad)
        ds = Dataset(x, y_kept, classes, [paths[i] for i in kept], "image", name, info=info)
        return ds, None, notes
    info = {**info, "streamed": True, "input_shape": list(files.input_shape)}
    ds = Dataset(
        torch.zeros(len(paths), 0), torch.tensor(ids, dtype=torch.long), classes, list(paths),
        "image", name, info=info,
    )  # fmt: skip
    return ds, files, notes


def open_data(
    spec: str | list[str],
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

    Several sources (a list, :func:`data_sources`): one data set of all their images, each
    class prefixed by its source's name (:func:`scan_sources`).
    """
    specs = data_sources(spec)
    if len(specs) > 1:
        return _open_sources(specs, image_size, grayscale, skip_bad, stream, choose, explain, fit)
    spec = specs[0]
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


def _own_name(class_name: str, prefixed: bool) -> str:
    return class_name.split("/", 1)[1] if prefixed and "/" in class_name else class_name


def open_val_data(
    specs: list[str],
    input_shape: tuple[int, ...],
    train: Dataset,
    *,
    skip_bad: bool = False,
    stream: bool = False,
    fit: str = "stretch",
) -> Dataset:
    """The labelled validation sources ``specs`` (image folders / manifests) as one data set
    of the training images' ``input_shape`` (C, H, W): classes prefixed by their source's name
    (``yale_val/yaleB30``), ``info["val_sources"]`` one summary per source. ``stream``: paths
    only (``x`` an empty placeholder), for streamed training images.

    A class of a validation source may not be a training class: the same class name (below a
    source's prefix) or the same file as the training data ``train`` is an
    :class:`InputError` naming them."""
    if len(input_shape) != 3:
        raise InputError(
            "--val-data takes image folders or manifests, and so needs image training data"
        )
    channels, size = int(input_shape[0]), (int(input_shape[1]), int(input_shape[2]))
    ds, _, _ = _open_sources(
        list(specs), size, channels == 1, skip_bad, stream, choose=None, explain=False, fit=fit
    )
    several = bool(train.info.get("sources"))  # training classes are source/<class> names
    own_train = {_own_name(c, several) for c in train.classes}
    shared = sorted({_own_name(c, True) for c in ds.classes} & own_train, key=natural_key)
    if shared:
        raise InputError(
            f"--val-data classes are also training classes: {shared[:5]}"
            + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
            + " (validation classes must be people/classes never trained on: remove them "
            "from --val-data or rename the folders if they are different classes)"
        )
    if train.paths:
        real = {os.path.realpath(p) for p in train.paths}
        same = [p for p in ds.paths or [] if os.path.realpath(p) in real]
        if same:
            raise InputError(
                f"{len(same)} --val-data images are training images too, e.g. {same[0]}"
            )
    counts = torch.bincount(ds.y, minlength=len(ds.classes))
    summary = []
    for src in ds.info["sources"]:
        ids = [i for i, c in enumerate(ds.classes) if source_of(c) == src["name"]]
        summary.append(
            {
                "name": src["name"],
                "spec": src["spec"],
                "kind": "val-data",
                "items": int(counts[ids].sum()),
                "classes": len(ids),
            }
        )
    ds.info["val_sources"] = summary
    ds.name = "+".join(s["name"] for s in summary)
    return ds
