"""A folder of photos to a folder of aligned face crops plus a manifest (``tripletlab faces``).

For every image under ``folder`` (``ROOT/<class>/.../<image>``, or images directly under ROOT),
:func:`~.pipeline.detect_and_align` runs; the crops are written as PNG under ``out`` with the
same relative folders (so ``out`` is again a class folder for ``tripletlab train --data``):
``<stem>.png`` for the largest face, or ``<stem>_<k>.png`` for every face with
``all_faces=True`` (``k`` by decreasing score). The manifest (JSON lines, by default
``out/.faces.jsonl``: a hidden file, so ``out`` stays a clean image folder) has one line per
written face and one per image without a face or that cannot be read:
``{"source", "label", "status": "ok" | "no face" | "error", "face", "crop", "box", "score",
"landmarks", "error"}`` (coordinates in the source image's pixels; see :mod:`.detect`).

Example:
    >>> summary = align_folder("photos", "aligned", template="arcface")  # doctest: +SKIP
    >>> summary["images"], summary["no_face"]  # doctest: +SKIP
    (120, 3)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.image_sources import scan_images
from ..errors import FileFormatError, InputError, MissingFileError, UsageError
from .align import TEMPLATES
from .detect import MTCNN
from .image import load_image
from .pipeline import align_detections

__all__ = ["MANIFEST_NAME", "PHOTO_FACE_AREA", "align_folder", "looks_like_photos"]

MANIFEST_NAME = ".faces.jsonl"


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _save(crop: torch.Tensor, path: Path) -> None:
    from PIL import Image

    a = crop.permute(1, 2, 0).contiguous().numpy()
    grey = bool((crop[0] == crop[1]).all() and (crop[1] == crop[2]).all())
    im = Image.fromarray(a[:, :, 0], "L") if grey else Image.fromarray(a, "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _r(v: float) -> float:
    return round(float(v), 2)


def align_folder(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    template: str = "arcface",
    size: int = 112,
    all_faces: bool = False,
    min_face: float = 20.0,
    manifest: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    detector: MTCNN | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Detect, align and write the faces of every image under ``folder`` to ``out`` (see the
    module); returns a summary: ``images``, ``with_face``, ``no_face``, ``errors``,
    ``faces_written``, ``seconds``, ``ms_per_image``, ``out``, ``manifest``.

    Example:
        >>> align_folder("photos", "aligned", all_faces=True)["faces_written"]  # doctest: +SKIP
        131
    """
    src, dst = Path(folder), Path(out)
    if template not in TEMPLATES:
        raise UsageError(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if not isinstance(size, int) or not 8 <= size <= 2048:
        raise UsageError(f"--size must be an integer in [8, 2048], got {size!r}")
    if not src.is_dir():
        raise MissingFileError(f"image folder not found: {src}")
    if _inside(dst, src):
        raise UsageError(f"--out {dst} lies inside the input folder {src}; choose another place")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"--out {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise UsageError(f"--out {dst} is not empty; pass --overwrite to write into it")
    paths, labels = scan_images(src, skip_bad=skip_bad, unlabelled=True)
    det = detector or MTCNN(min_face=min_face)
    dst.mkdir(parents=True, exist_ok=True)
    man = Path(manifest) if manifest is not None else dst / MANIFEST_NAME
    man.parent.mkdir(parents=True, exist_ok=True)
    counts = {"images": 0, "with_face": 0, "no_face": 0, "errors": 0, "faces_written": 0}
    used: set[str] = set()
    t0 = time.perf_counter()
    with open(man, "w", encoding="utf-8") as f:
        for n, (path, label) in enumerate(zip(paths, labels, strict=True), 1):
            rel = Path(os.path.relpath(path, src))
            row: dict = {"source": rel.as_posix(), "label": label}
            counts["images"] += 1
            try:
                image = load_image(path)
                faces = align_detections(
                    image,
                    det.detect(image),
                    template=template,
                    size=size,
                    faces="all" if all_faces else "largest",
                )
            except (FileFormatError, MissingFileError, InputError, OSError) as e:
                counts["errors"] += 1
                f.write(json.dumps({**row, "status": "error", "error": str(e)}) + "\n")
                continue
            if not faces:
                counts["no_face"] += 1
                f.write(json.dumps({**row, "status": "no face", "crop": None}) + "\n")
                continue
            counts["with_face"] += 1
            stem = rel.with_suffix("").as_posix()
            if stem in used:  # img.png and img.jpg in one folder
                stem = f"{stem}_{rel.suffix.lstrip('.').lower()}"
            used.add(stem)
            for k, face in enumerate(faces):
                name = f"{stem}_{k}.png" if all_faces else f"{stem}.png"
                _save(face.crop, dst / name)
                counts["faces_written"] += 1
                line = {
                    **row,
                    "status": "ok",
                    "face": k,
                    "crop": name,
                    "box": [_r(v) for v in face.box],
                    "score": round(face.score, 4),
                    "landmarks": [[_r(x), _r(y)] for x, y in face.landmarks.tolist()],
                }
                f.write(json.dumps(line) + "\n")
            if log is not None and n % 100 == 0:
                log(f"{n}/{len(paths)} images, {counts['faces_written']} faces")
    secs = time.perf_counter() - t0
    return {
        **counts,
        "seconds": round(secs, 2),
        "ms_per_image": round(1000 * secs / max(counts["images"], 1), 1),
        "template": template,
        "size": size,
        "all_faces": all_faces,
        "out": str(dst),
        "manifest": str(man),
    }


PHOTO_FACE_AREA = 0.25  # a face box below this share of the image: a photo, not a face crop


def looks_like_photos(
    folders: str | os.PathLike[str] | list,
    n: int = 24,
    detector: MTCNN | None = None,
    max_area: float = PHOTO_FACE_AREA,
) -> tuple[bool, dict]:
    """Whether the images of ``folders`` are photos with faces in them (align them:
    ``--faces``) rather than face crops already (AT&T, Yale B: leave them): ``(decision,
    facts)``, from ``n`` images spread evenly over the folders' sorted files.

    Rule: photos when at least half of the sampled images hold a face and the median share
    of the image its largest face box covers is below ``max_area`` (0.25. Measured: an AT&T
    crop's box covers 0.65 of it (median of 24); Extended Yale B's tight crops are mostly
    not detected (6 of 24, boxes larger than the image); AT&T faces pasted into 640x480
    scenes 0.009). ``facts``:
    ``sampled``, ``with_face``, ``median_area`` (None without a face).

    Example:
        >>> looks_like_photos("../shared/data/att_faces")  # doctest: +SKIP
        (False, {'sampled': 24, 'with_face': 24, 'median_area': 0.65...})
    """
    import numpy as np

    specs = folders if isinstance(folders, (list, tuple)) else [folders]
    paths: list[str] = []
    for spec in specs:
        paths += [str(p) for p in scan_images(Path(spec), skip_bad=True, unlabelled=True)[0]]
    if not paths:
        return False, {"sampled": 0, "with_face": 0, "median_area": None}
    pick = sorted(set(np.linspace(0, len(paths) - 1, min(n, len(paths))).round().astype(int)))
    det = detector or MTCNN()
    areas = []
    for i in pick:
        try:
            image = load_image(paths[i])
        except (FileFormatError, OSError):
            continue
        d = det.detect(image)
        if len(d):
            b = d.boxes
            a = ((b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)).max()
            areas.append(float(a) / float(image.width * image.height))
    med = float(np.median(areas)) if areas else None
    facts = {"sampled": len(pick), "with_face": len(areas), "median_area": med}
    return bool(areas and 2 * len(areas) >= len(pick) and med < max_area), facts
