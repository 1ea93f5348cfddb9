"""Where streamed images come from: the files and labels of an image folder or of a CSV/JSONL
``path,label`` manifest, class ids, and a probe of image sizes (used by
:mod:`tripletlab.data.streaming` and the automatic choices)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..errors import FileFormatError, MissingFileError
from .dataset import natural_key
from .loaders import IMAGE_EXTENSIONS, _display, _read_image, _scan_image_folder

MANIFEST_EXTENSIONS = (".csv", ".jsonl")


# -------------------------------------------------------------------------------- sources


def read_image_manifest(path: str | os.PathLike[str], check_files: bool = True):
    """``(paths, labels)`` of a CSV (header with ``path`` and ``label``) or JSONL manifest
    (objects with ``path`` and ``label``). Relative paths are relative to the manifest's folder.
    Files that do not exist are a :class:`MissingFileError` listing them (``check_files``).

    Example:
        >>> paths, labels = read_image_manifest("train.csv")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"manifest not found: {p}")
    rows: list[tuple[str, str]] = []
    reader, next_line = None, 2  # the line a csv.Error is in
    try:
        if p.suffix.lower() == ".jsonl":
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                    if not isinstance(obj, dict) or "path" not in obj or "label" not in obj:
                        raise FileFormatError(
                            f"{p} line {n}: each line must be an object with 'path' and 'label'"
                        )
                    rows.append((str(obj["path"]), str(obj["label"])))
        elif p.suffix.lower() == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                header = [h.strip() for h in reader.fieldnames or []]
                for col in ("path", "label"):
                    if col not in header:
                        raise FileFormatError(
                            f"{p}: no {col!r} column in the header {header[:8]} "
                            "(an image manifest needs 'path,label')"
                        )
                reader.fieldnames = header
                for n, row in enumerate(reader, 2):
                    next_line = n + 1
                    if row.get("path") in (None, "") or row.get("label") in (None, ""):
                        raise FileFormatError(f"{p} line {n}: empty path or label")
                    rows.append((row["path"].strip(), row["label"].strip()))
        else:
            raise FileFormatError(f"{p}: a manifest is a .csv or .jsonl file")
    except csv.Error as e:  # e.g. a field above csv's 131,072-character limit
        line = f" line {next_line}" if reader is not None else ""
        raise FileFormatError(f"cannot read manifest {p}{line}: {e}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"cannot read manifest {p}: {e}") from None
    if not rows:
        raise FileFormatError(f"manifest {p} lists no images")
    base = p.parent
    paths = [str(base / r[0]) if not os.path.isabs(r[0]) else r[0] for r in rows]
    labels = [r[1] for r in rows]
    if check_files:
        missing = [q for q in paths if not os.path.isfile(q)]
        if missing:
            raise MissingFileError(
                f"manifest {p} names {len(missing)} files that do not exist, e.g. "
                + ", ".join(_display(q) for q in missing[:3])
            )
    return paths, labels


def scan_images(source: str | os.PathLike[str], skip_bad: bool = False, unlabelled: bool = False):
    """``(paths, labels)`` of an image folder (``ROOT/<class>/.../<image>``) or a manifest.

    ``unlabelled``: a folder with images directly under ROOT (a plain photo folder) is taken
    whole without classes: every image under it, each labelled by its path relative to ROOT
    (the file path is its id), for embedding, indexing and searching a gallery.

    Example:
        >>> paths, labels = scan_images("../shared/data/att_faces")  # doctest: +SKIP
    """
    src = Path(source)
    if src.is_file() and src.suffix.lower() in MANIFEST_EXTENSIONS:
        return read_image_manifest(src)
    if not src.is_dir():
        raise MissingFileError(f"image folder or manifest not found: {src}")
    files, labels, other, _ = _scan_image_folder(src, skip_bad)
    loose = [f for f in other if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    if unlabelled and loose:  # photos without class folders: each file is its own id
        taken = set(loose)
        other = [f for f in other if f not in taken]
        files = loose + files
        labels = [os.path.relpath(f, src).replace(os.sep, "/") for f in files]
    if other and not skip_bad:
        raise FileFormatError(
            f"{len(other)} files in {_display(src)} are not images in a class folder (e.g. "
            f"{_display(other[0])}); move them away or pass --skip-bad to ignore them"
        )
    if not files:
        raise FileFormatError(
            f"no images found under {_display(src)} (expected ROOT/<class>/<image>, "
            f"extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files, labels


def is_manifest(spec: str) -> bool:
    """A CSV whose header has ``path`` and ``label`` columns, or a JSONL whose first object
    has ``path`` (other .csv/.jsonl files are vector or text data)."""
    p = Path(spec)
    if p.suffix.lower() not in MANIFEST_EXTENSIONS or not p.is_file():
        return False
    try:
        with open(p, encoding="utf-8", newline="") as f:
            first = next((line for line in f if line.strip()), "")
        if p.suffix.lower() == ".csv":
            header = [h.strip() for h in next(csv.reader([first]), [])]
            return "path" in header and "label" in header
        obj = json.loads(first)
        return isinstance(obj, dict) and "path" in obj
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error):
        return False


# --------------------------------------------------------------------------- augmentation


def class_ids(labels: list[str]) -> tuple[list[int], list[str]]:
    """Contiguous ids in natural order of the label names, and the names."""
    classes = sorted(set(labels), key=natural_key)
    index = {c: i for i, c in enumerate(classes)}
    return [index[x] for x in labels], classes


def probe_images(paths: list[str], n: int = 32) -> tuple[tuple[int, int] | None, int]:
    """((H, W) if the probed files share one size else None, channels) from up to ``n`` files
    spread over the list (a file that cannot be read is skipped here; it fails when used)."""
    step = max(1, len(paths) // n)
    sizes, colour = set(), False
    for p in paths[::step][:n]:
        try:
            a = _read_image(p, None, None)
        except FileFormatError:
            continue
        sizes.add(a.shape[1:])
        colour = colour or a.shape[0] == 3
    size = next(iter(sizes)) if len(sizes) == 1 else None
    return (None if size is None else (int(size[0]), int(size[1]))), 3 if colour else 1
