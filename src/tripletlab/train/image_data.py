"""How a training run reads image folders and manifests: thin adapters from a
:class:`~tripletlab.train.config.TrainConfig` and a trainer to
:func:`tripletlab.data.open.open_data` (in memory when small, streamed from disk when large),
the PK stream of the training split, and :func:`tripletlab.inference.embed.embed` (the one way
to embed a set).

``open_data(cfg, resume)`` and ``embed_part(trainer, part, model)`` are kept for the trainer;
``default_workers``, ``embed_data``, ``is_image_source``, ``run_input_spec`` and
``STREAM_ABOVE_BYTES`` are re-exported from where they live now.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import Dataset
from ..data.augment import SampleAugment, default_augment
from ..data.open import STREAM_ABOVE_BYTES, is_image_source
from ..data.open import open_data as open_source
from ..data.streaming import ImageFiles
from ..inference.embed import default_workers, embed, embed_data, run_input_spec
from .auto import auto_settings
from .config import TrainConfig

__all__ = [
    "STREAM_ABOVE_BYTES",
    "default_workers",
    "embed_data",
    "embed_part",
    "is_image_source",
    "open_data",
    "part_files",
    "run_input_spec",
    "stream_augment",
]


def open_data(
    cfg: TrainConfig, resume: bool = False, data: str | list[str] | None = None
) -> tuple[Dataset, ImageFiles | None, list]:
    """``(dataset, files, notes)`` of ``cfg.data`` (or of ``data``, e.g. the folder of aligned
    faces, :func:`prepare_faces`) (:func:`tripletlab.data.open.open_data`);
    the automatic choices made from the data (:func:`~tripletlab.train.auto.auto_settings`,
    not when resuming) are written into ``cfg`` so the run's config.json records them."""

    if cfg.resize is None:  # new runs keep the aspect; a run resumed from before: stretch
        cfg.resize = "stretch" if resume else "crop"

    def choose(n_items: int, native, n_classes: int):
        values, notes = auto_settings(cfg, n_items, native, n_classes)
        for k, v in values.items():
            setattr(cfg, k, v)
        return cfg.image_size, notes

    return open_source(
        cfg.data if data is None else data,
        image_size=cfg.image_size,
        grayscale=cfg.grayscale,
        skip_bad=cfg.skip_bad,
        stream=cfg.stream,
        fit=cfg.resize,
        choose=None if resume else choose,
        explain=not resume,
    )


def prepare_faces(
    cfg: TrainConfig, run_dir: Path, log=None
) -> tuple[str | list[str], list[str] | None]:
    """``--faces``: the training folder ``cfg.data`` aligned once into ``RUN_DIR/faces/``
    (:func:`tripletlab.faces.align_folder`, largest face, the crop size of
    :func:`tripletlab.inference.run.face_crop_size`, so inference aligns alike), reused when
    resuming; logs one line (faces, images without a face). Several sources (``--data A
    --data B``): each into ``RUN_DIR/faces/<its name>/`` (so its classes keep their names).
    ``--val-data`` folders are aligned alike into ``RUN_DIR/faces/val/<name>/``. Returns
    ``(the folder or folders to train on, the aligned --val-data folders or None)``;
    ``cfg`` is unchanged (its config.json names the source folders)."""
    from ..data.open import source_name

    def folder_list(value, what: str) -> list[str]:
        items = [value] if isinstance(value, str) else list(value or [])
        bad = [str(v) for v in items if not Path(str(v)).is_dir()]
        if not items or bad:
            raise InputError(
                f"--faces needs image folders (ROOT/<class>/<image>) as {what}, got "
                f"{bad[0] if bad else value!r}"
            )
        return [str(v) for v in items]

    from ..errors import InputError

    out = Path(run_dir) / "faces"
    sources = folder_list(cfg.data, "--data")
    if len(sources) == 1:
        aligned: str | list[str] = str(_align_source(cfg, sources[0], out, log))
    else:
        aligned = [str(_align_source(cfg, s, out / source_name(s), log)) for s in sources]
    val = None
    if cfg.val_data and cfg.evaluate:
        val = [
            str(_align_source(cfg, s, out / "val" / source_name(s), log))
            for s in folder_list(cfg.val_data, "--val-data")
        ]
    return aligned, val


def _align_source(cfg: TrainConfig, folder: str, out: Path, log=None) -> Path:
    """One folder aligned into ``out`` (reused when its summary exists); one log line."""
    import json

    from ..errors import InputError
    from ..inference.run import face_crop_size
    from ..utils import atomic_write_json

    done = out / ".summary.json"
    if done.is_file():
        summary = json.loads(done.read_text(encoding="utf-8"))
    else:
        from ..faces import align_folder

        summary = align_folder(
            folder, out, template=cfg.faces, size=face_crop_size(cfg.image_size, cfg.face_size),
            overwrite=True, skip_bad=cfg.skip_bad,
        )  # fmt: skip
        atomic_write_json(done, summary)  # whole or absent: other ranks and --resume read it
    if not summary["faces_written"]:
        raise InputError(f"--faces: no face found in any of the {summary['images']} images of "
                         f"{folder}")  # fmt: skip
    if log is not None:
        errs = f", {summary['errors']} unreadable" if summary.get("errors") else ""
        log(
            f"faces ({cfg.faces}): {summary['faces_written']} faces in {summary['images']} "
            f"images of {folder}, {summary['no_face']} without a face left out{errs} -> {out}"
        )
    return out


def prepare_faces_on_main(
    cfg: TrainConfig, run_dir: Path, log=None, device="cpu"
) -> tuple[str | list[str], list[str] | None]:
    """:func:`prepare_faces` under torchrun: rank 0 aligns the folder into ``RUN_DIR/faces/``
    (and logs the line) while the other ranks wait for it in a broadcast (bounded by
    ``--dist-timeout``), then every rank reads that folder. A failure on rank 0 (e.g. no face
    in any image) stops every rank: rank 0 with its own error, the others with an
    :class:`~tripletlab.errors.InputError` that points to it."""
    import torch.distributed as dist

    from ..errors import InputError
    from ..runtime.process_group import broadcast_flag

    flag_device = device if torch.device(device).type == "cuda" else "cpu"
    if dist.get_rank() == 0:
        try:
            out = prepare_faces(cfg, run_dir, log)
        except BaseException:
            broadcast_flag(False, flag_device)  # the others stop now, not at the timeout
            raise
        broadcast_flag(True, flag_device)
        return out
    try:
        ok = broadcast_flag(False, flag_device)
    except RuntimeError as e:  # rank 0 took longer than --dist-timeout, or is gone
        raise InputError(
            f"--faces: rank 0 did not finish aligning the faces of {cfg.data} within "
            f"--dist-timeout {cfg.dist_timeout:g} s ({type(e).__name__}): raise --dist-timeout, "
            "or align the folder first with `tripletlab faces FOLDER --out ALIGNED` and train "
            "on that"
        ) from None
    if not ok:
        raise InputError("--faces: rank 0 could not align the training folder (its error says why)")
    if not (Path(run_dir) / "faces").is_dir():
        raise InputError(
            f"--faces: rank 0 aligned the faces into {Path(run_dir) / 'faces'}, which this rank "
            f"(rank {dist.get_rank()}) cannot see: the run directory must be shared by every "
            "node, or align the folder first with `tripletlab faces` on each node"
        )
    return prepare_faces(cfg, run_dir)  # reads rank 0's summaries in RUN_DIR/faces/


def stream_augment(aug) -> SampleAugment | None:
    """The per-sample executor for streamed images of a preset name, a dict or an
    :class:`~tripletlab.data.augment.AugmentSpec` (one vocabulary with in-memory images);
    None: the streamed default (:func:`~tripletlab.data.augment.default_augment`)."""
    if aug is None:
        aug = default_augment("image", streamed=True)
    return SampleAugment.from_config(aug)


def part_files(files: ImageFiles, part: Dataset, augment=None) -> ImageFiles:
    """The image files of one split ``part`` of a streamed data set (``files``)."""
    return ImageFiles(
        part.paths or [],
        part.y.tolist(),
        files.image_size,
        files.channels,
        augment,
        fit=files.fit,
        preprocess=files.preprocess,
    )


def embed_part(trainer, part: Dataset, model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Streamed embeddings of a split (by the trainer's model, or ``model``) and the labels of
    the images kept."""
    cfg = trainer.cfg
    emb, kept = embed(
        trainer.model if model is None else model,
        part_files(trainer.files, part),
        cfg.eval_batch_size,
        trainer.device,
        trainer.amp,
        workers=cfg.workers,
        skip_bad=cfg.skip_bad,
        return_kept=True,
    )
    return emb, part.y[kept]
