"""How a training run reads image folders and manifests: in memory when small, streamed from
disk when the decoded set would exceed :data:`STREAM_ABOVE_BYTES` (or ``stream=True``), with
the input size and number of steps chosen from the data when the user left them unset.

Used by :class:`tripletlab.train.Trainer`; digits, MNIST idx folders and vector files keep the
in-memory path (it is faster for them).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data import Dataset, load_dataset
from ..data.loaders import is_idx_dir, warn_skipped
from ..data.streaming import (
    SAMPLE_AUGMENT_PRESETS,
    ImageFiles,
    SampleAugment,
    class_ids,
    embed_files,
    is_manifest,
    probe_images,
    scan_images,
)
from ..errors import InputError
from .auto import auto_settings
from .config import TrainConfig

__all__ = ["STREAM_ABOVE_BYTES", "default_workers", "open_data"]

STREAM_ABOVE_BYTES = 512 * 2**20  # decoded float32 size above which images are streamed


def default_workers() -> int:
    return max(0, min(2, (os.cpu_count() or 1)))


def is_image_source(spec: str) -> bool:
    """An image folder (not an idx folder) or a CSV/JSONL image manifest."""
    if spec == "digits":
        return False
    p = Path(spec)
    return (p.is_dir() and not is_idx_dir(p)) or is_manifest(spec)


def open_data(cfg: TrainConfig, resume: bool = False) -> tuple[Dataset, ImageFiles | None, list]:
    """``(dataset, files, notes)``: the data set (for streamed images its ``x`` is an empty
    placeholder and ``files`` decodes on access), and the automatic choices made (which are
    written into ``cfg`` so the run's config.json records them)."""
    spec = cfg.data
    if not is_image_source(spec):
        size = tuple(cfg.image_size) if cfg.image_size else None
        ds = load_dataset(spec, image_size=size, grayscale=cfg.grayscale, skip_bad=cfg.skip_bad)
        return ds, None, []
    paths, labels = scan_images(spec, skip_bad=cfg.skip_bad)
    native, channels = probe_images(paths)
    if cfg.grayscale is not None:
        channels = 1 if cfg.grayscale else 3
    notes: list[str] = []
    if not resume:
        values, notes = auto_settings(cfg, len(paths), native, len(set(labels)))
        for k, v in values.items():
            setattr(cfg, k, v)
    size = tuple(cfg.image_size) if cfg.image_size else native
    decoded = len(paths) * channels * (size[0] * size[1] if size else 224 * 224) * 4
    stream = cfg.stream if cfg.stream is not None else decoded > STREAM_ABOVE_BYTES
    if stream and cfg.stream is None and not resume:
        notes.append(
            f"streaming {len(paths)} images from disk (decoded they would take "
            f"{decoded / 2**30:.1f} GiB)"
        )
    ids, classes = class_ids(labels)
    name = Path(spec).stem if is_manifest(spec) else (Path(spec).name or spec)
    if not stream and not is_manifest(spec):  # the in-memory folder loader (fastest when small)
        ds = load_dataset(
            spec,
            image_size=size if cfg.image_size else None,
            grayscale=cfg.grayscale,
            skip_bad=cfg.skip_bad,
        )
        return ds, None, notes
    if size is None:
        raise InputError(
            f"the images of {spec} differ in size; pass --image-size H W to resize them"
        )
    files = ImageFiles(paths, ids, size, channels)
    if not stream:  # a small manifest: decode it once into memory
        x, y_kept, kept = _decode_all(files, cfg.skip_bad)
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


def _decode_all(files: ImageFiles, skip_bad: bool):

    from ..errors import FileFormatError

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


def stream_augment(aug) -> SampleAugment | None:
    """The per-image augmentation for streamed images from a preset name or dict (the batch
    presets map to their streamed counterparts: "strokes" -> "light")."""
    if aug is None:
        aug = "light"
    if isinstance(aug, str) and aug not in SAMPLE_AUGMENT_PRESETS and aug != "none":
        aug = {"strokes": "light"}.get(aug, aug)
    return SampleAugment.from_config(aug)


def _part_files(trainer, part: Dataset, augment=None) -> ImageFiles:
    files = trainer.files
    return ImageFiles(part.paths or [], part.y.tolist(), files.image_size, files.channels, augment)


def embed_part(trainer, part: Dataset, model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Streamed embeddings of a split (by the trainer's model, or ``model``) and the labels of
    the images kept."""
    cfg = trainer.cfg
    files = _part_files(trainer, part)
    workers = cfg.workers if cfg.workers is not None else default_workers()
    emb, kept = embed_files(
        trainer.model if model is None else model,
        files,
        batch_size=cfg.eval_batch_size,
        workers=workers,
        device=trainer.device,
        skip_bad=cfg.skip_bad,
        amp_dtype=trainer.amp,
    )
    return emb, part.y[kept]


def run_input_spec(cfg: dict) -> tuple[tuple[int, int] | None, int | None]:
    """``(image size, channels)`` a run's model takes (None for vector models)."""
    shape = cfg.get("model", {}).get("input_shape", [])
    if len(shape) != 3:
        return None, None
    return (int(shape[1]), int(shape[2])), int(shape[0])


def embed_data(
    model: torch.nn.Module,
    cfg: dict,
    data: str | None,
    run_dir: str | Path,
    *,
    skip_bad: bool = False,
    device: str = "auto",
    workers: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None, list[str]]:
    """``(embeddings, labels, paths, classes)`` of ``data`` (or of the run's test split when
    ``data`` is None) with a trained model. Image folders and manifests are streamed in
    batches (memory does not grow with the number of images); other data is loaded whole.
    ``shard=(rank, world_size)``: only that rank's contiguous share of the items
    (:func:`tripletlab.inference.shard.shard_bounds`; ``tripletlab embed --distributed``).

    Example:
        >>> emb, y, paths, classes = embed_data(model, cfg, "photos/", "runs/x")  # doctest: +SKIP
    """
    from ..data import apply_split
    from ..metrics.evaluate import embed
    from ..rundir.files import load_dataset_for_run
    from ..rundir.files import read_json as _read_json
    from ..runtime.devices import resolve_device

    dev = resolve_device(device)
    model.to(dev)
    spec = data if data is not None else cfg.get("train", {}).get("data", "digits")
    size, channels = run_input_spec(cfg)
    if size is None or not is_image_source(spec):
        ds = load_dataset_for_run(cfg, spec, skip_bad)
        if data is None:
            _, ds = apply_split(ds, _read_json(Path(run_dir) / "split.json", "split")["test"])
        if shard is not None:
            from ..inference.shard import shard_bounds

            ds = ds.subset(range(*shard_bounds(len(ds), *shard)))
        return embed(model, ds.x, batch_size, dev), ds.y, ds.paths, ds.classes
    paths, labels = scan_images(spec, skip_bad=skip_bad)
    ids, classes = class_ids(labels)
    if data is None:  # the run's test split (by class names, or by saved indices)
        placeholder = Dataset(
            x=torch.zeros(len(paths), 0),
            y=torch.tensor(ids),
            classes=classes,
            paths=paths,
            kind="image",
            name="test",
        )
        _, test = apply_split(
            placeholder, _read_json(Path(run_dir) / "split.json", "split")["test"]
        )
        paths, ids = test.paths or [], test.y.tolist()
    if shard is not None:  # this rank's files only
        from ..inference.shard import shard_bounds

        lo, hi = shard_bounds(len(paths), *shard)
        paths, ids = paths[lo:hi], ids[lo:hi]
    files = ImageFiles(paths, ids, size, channels)
    emb, kept = embed_files(
        model,
        files,
        batch_size=batch_size,
        workers=workers if workers is not None else default_workers(),
        device=dev,
        skip_bad=skip_bad,
        progress=progress,
    )
    return emb, files.labels[kept], [paths[i] for i in kept], classes
