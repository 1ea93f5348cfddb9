"""One way to embed a set: :func:`embed` runs a model over in-memory tensors, lists of texts, a
:class:`~tripletlab.data.Dataset` or :class:`~tripletlab.data.streaming.ImageFiles` (decoded from
disk in DataLoader workers, so memory does not grow with the number of images), in eval mode, in
batches, and returns float32 embeddings on the CPU.

Everything that embeds a set goes through it: the trainer's validation and test splits,
cached backbone features, :class:`~tripletlab.inference.Inference` (``embed``, ``index``,
``eval``), and each rank's share under ``--distributed`` (:mod:`.shard`).
:func:`embed_data` embeds a data source (or a run's test split) the way a trained run reads it.

Example:
    >>> import torch
    >>> from tripletlab.models import build_model
    >>> m = build_model({"name": "mlp", "input_shape": [4], "embedding_dim": 3})
    >>> embed(m, torch.rand(10, 4), batch_size=4).shape
    torch.Size([10, 3])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import Dataset
from ..data.loaders import warn_skipped
from ..data.open import is_image_source
from ..data.streaming import ImageFiles, class_ids, guarded, image_batches, scan_images
from ..errors import FileFormatError, InputError
from ..runtime.devices import autocast

__all__ = ["default_workers", "embed", "embed_data", "is_image_source", "run_input_spec"]


def default_workers() -> int:
    """Data-loading worker processes when ``--workers`` is not given (at most 2)."""
    return max(0, min(2, (os.cpu_count() or 1)))


def _forward(model, chunk, dev: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    with autocast(dev, amp):  # amp: an autocast dtype, e.g. torch.bfloat16
        return model(chunk.to(dev, non_blocking=True) if torch.is_tensor(chunk) else chunk).float()


def _empty(model) -> torch.Tensor:
    cfg = getattr(model, "config", {}) or {}
    return torch.zeros(0, cfg.get("output_dim") or cfg.get("embedding_dim") or 0)


def embed(
    model: torch.nn.Module,
    source: torch.Tensor | Sequence[str] | Dataset | ImageFiles,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    amp: torch.dtype | None = None,
    *,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = False,
    return_kept: bool = False,
):
    """Embeddings (N, D) float32 on the CPU of every item of ``source``, in eval mode (the
    model's train/eval mode is restored afterwards), ``batch_size`` items at a time on
    ``device`` (under autocast to ``amp`` when given, e.g. ``torch.bfloat16``).

    ``source``: a tensor (rows are items), a list of strings (a text model), a
    :class:`~tripletlab.data.Dataset` (its ``inputs()``: texts or tensor rows) or
    :class:`~tripletlab.data.streaming.ImageFiles` (decoded on access by ``workers`` processes,
    default :func:`default_workers`; an unreadable file raises :class:`FileFormatError` naming
    it, or with ``skip_bad`` is left out with one warning; ``progress``: a progress bar).
    ``return_kept``: return ``(embeddings, indices of the items kept)`` (all of them unless
    ``skip_bad`` dropped unreadable images).

    Example:
        >>> from tripletlab.models import build_model
        >>> m = build_model({"name": "mlp", "input_shape": [4], "embedding_dim": 3})
        >>> emb, kept = embed(m, torch.rand(5, 4), batch_size=2, return_kept=True)
        >>> emb.shape, kept
        (torch.Size([5, 3]), [0, 1, 2, 3, 4])
    """
    if isinstance(source, Dataset):
        source = source.inputs()
    if isinstance(source, ImageFiles):
        emb, kept = _embed_files(
            model, source, batch_size, torch.device(device), amp, workers, skip_bad, progress
        )
        return (emb, kept) if return_kept else emb
    if isinstance(source, (str, bytes)) or not (
        torch.is_tensor(source) or isinstance(source, (list, tuple))
    ):
        raise InputError(
            "embed takes a tensor, a list of texts, a Dataset or ImageFiles, "
            f"got {type(source).__name__}"
        )
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for s in range(0, len(source), batch_size):
                out.append(_forward(model, source[s : s + batch_size], dev, amp).cpu())
    finally:
        model.train(was_training)
    emb = torch.cat(out) if out else _empty(model)
    return (emb, list(range(len(source)))) if return_kept else emb


def _embed_files(model, files, batch_size, dev, amp, workers, skip_bad, progress):
    from tqdm import tqdm

    workers = default_workers() if workers is None else int(workers)
    loader = DataLoader(files, batch_size=batch_size, num_workers=workers, collate_fn=image_batches)
    was_training = model.training
    model.eval()
    out, kept, bad = [], [], []
    bar = tqdm(total=len(files), disable=not progress, unit="img", dynamic_ncols=True)
    try:
        with torch.no_grad():
            for x, _, idx, errors in guarded(loader):
                ok = [j for j, e in enumerate(errors) if not e]
                if len(ok) < len(errors):
                    msgs = [e for e in errors if e]
                    if not skip_bad:
                        raise FileFormatError(f"{msgs[0]} (pass --skip-bad to skip such files)")
                    bad += msgs
                    x, idx = x[ok], idx[ok]
                bar.update(len(errors))
                if not len(idx):
                    continue
                out.append(_forward(model, x, dev, amp).cpu())
                kept += idx.tolist()
    finally:
        bar.close()
        model.train(was_training)
    warn_skipped(bad, stacklevel=4)
    return (torch.cat(out) if out else _empty(model)), kept


def run_input_spec(cfg: dict) -> tuple[tuple[int, int] | None, int | None]:
    """``(image size, channels)`` a run's model takes (None for vector and text models).

    Example:
        >>> run_input_spec({"model": {"input_shape": [1, 56, 46]}})
        ((56, 46), 1)
    """
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
    unlabelled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None, list[str]]:
    """``(embeddings, labels, paths, classes)`` of ``data`` (or of the run's test split when
    ``data`` is None) with a trained model (``cfg``: the run's ``config.json``). Image folders
    and manifests are streamed in batches (memory does not grow with the number of images);
    other data is loaded whole. ``shard=(rank, world_size)``: only that rank's contiguous share
    of the items (:func:`tripletlab.inference.shard.shard_bounds`; ``tripletlab embed
    --distributed``). ``unlabelled``: a plain photo folder (images directly in it) is taken
    whole, each image labelled by its path (see :func:`~tripletlab.data.streaming.scan_images`).

    Example:
        >>> emb, y, paths, classes = embed_data(model, cfg, "photos/", "runs/x")  # doctest: +SKIP
    """
    from ..data import apply_split
    from ..rundir.files import load_dataset_for_run, preprocessing, read_json
    from ..runtime.devices import resolve_device
    from .shard import shard_bounds

    dev = resolve_device(device)
    model.to(dev)
    spec = data if data is not None else cfg.get("train", {}).get("data", "digits")
    size, channels = run_input_spec(cfg)
    if size is None or not isinstance(spec, str) or not is_image_source(spec):
        ds = load_dataset_for_run(cfg, spec, skip_bad)
        if data is None:
            _, ds = apply_split(ds, read_json(Path(run_dir) / "split.json", "split")["test"])
        if shard is not None:
            ds = ds.subset(range(*shard_bounds(len(ds), *shard)))
        x = ds.x
        if ds.kind == "image":  # the run's preprocessing (--equalize)
            from ..data.augment import preprocess

            x = preprocess(x, cfg.get("train", {}).get("equalize"))
        return embed(model, x, batch_size, dev), ds.y, ds.paths, ds.classes
    paths, labels = scan_images(spec, skip_bad=skip_bad, unlabelled=unlabelled and data is not None)
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
        _, test = apply_split(placeholder, read_json(Path(run_dir) / "split.json", "split")["test"])
        paths, ids = test.paths or [], test.y.tolist()
    if shard is not None:  # this rank's files only
        lo, hi = shard_bounds(len(paths), *shard)
        paths, ids = paths[lo:hi], ids[lo:hi]
    files = ImageFiles(
        paths,
        ids,
        size,
        channels,
        fit=preprocessing(cfg)["fit"],
        preprocess=cfg.get("train", {}).get("equalize") or "none",
    )
    emb, kept = embed(
        model,
        files,
        batch_size,
        dev,
        workers=workers,
        skip_bad=skip_bad,
        progress=progress,
        return_kept=True,
    )
    return emb, files.labels[kept], [paths[i] for i in kept], classes
