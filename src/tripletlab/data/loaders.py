"""Loaders for the built-in digits, image folders, MNIST idx files and vector files."""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import FileFormatError, InputError, MissingFileError
from .dataset import Dataset, natural_key

__all__ = ["IMAGE_EXTENSIONS", "load_dataset", "load_image_files"]

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".pgm",
    ".ppm",
    ".pbm",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def warn_skipped(bad: list[str], stacklevel: int = 2) -> None:
    """One warning for the unreadable images that ``--skip-bad`` left out (the first three named);
    ``stacklevel`` as for :func:`warnings.warn`, counted from the caller of this function."""
    if bad:
        msg = f"skipped {len(bad)} unreadable images: " + "; ".join(bad[:3])
        warnings.warn(msg, stacklevel=stacklevel + 1)


def _display(path: str | os.PathLike[str]) -> str:
    """A printable form of a path, even with undecodable bytes in it."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _contiguous_labels(raw: list) -> tuple[torch.Tensor, list[str]]:
    names = [str(v) for v in raw]
    classes = sorted(set(names), key=natural_key)
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[n] for n in names], dtype=torch.long), classes


# ------------------------------------------------------------------------------------- digits


def load_digits_dataset() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 items, 10 classes) as 64-d vectors in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return Dataset(
        x=x,
        y=y,
        classes=[str(i) for i in range(10)],
        paths=None,
        kind="vector",
        name="digits",
        info={"source": "sklearn.datasets.load_digits"},
    )


# -------------------------------------------------------------------------------------- images


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _scan_image_folder(root: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    """(files, class names, non-image files, ignored folders), in sorted order.

    Hidden files and folders (``.name``) are ignored. Symlinked folders are followed when they
    point outside ROOT; every folder is read at most once (by device and inode), and links back
    into ROOT are ignored, so loops end and no image is read under two names.
    """
    files, labels, other, ignored_links = [], [], [], []
    real_root = os.path.realpath(root)
    st = os.stat(root)
    seen: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            full = os.path.join(dirpath, d)
            try:
                st = os.stat(full)
            except OSError:  # broken link, or unreadable
                ignored_links.append(full)
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen or (os.path.islink(full) and _inside(os.path.realpath(full), real_root)):
                ignored_links.append(full)  # a loop, or a folder reached a second way
                continue
            seen.add(key)
            keep.append(d)
        dirnames[:] = keep
        rel = os.path.relpath(dirpath, root)
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            if fn.startswith("."):
                continue
            if rel == ".":
                other.append(full)  # files directly under ROOT have no class
                continue
            if os.path.splitext(fn)[1].lower() in IMAGE_EXTENSIONS:
                files.append(full)
                labels.append(_display(rel).replace(os.sep, "/"))
            else:
                other.append(full)
    return files, labels, other, ignored_links


_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def _read_image(path: str, mode: str | None, size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 (C, H, W). ``mode`` "L" or "RGB" converts; ``None`` keeps grey images
    grey (C=1; palette images whose colours are all grey count as grey) and others RGB (C=3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            raise FileFormatError(f"empty image file: {_display(path)}")
        with Image.open(path) as im:
            if size is not None and im.format == "JPEG":
                # decode at 1/2, 1/4 or 1/8 scale in the DCT when that still covers ``size``
                # (3-4x less work for a 224-pixel JPEG read at 112); the resize below finishes
                im.draft(mode or im.mode, (size[1], size[0]))
            im.load()
            return image_to_array(im, mode, size)
    except FileFormatError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        MemoryError,
        EOFError,
    ) as e:
        raise FileFormatError(f"cannot read image {_display(path)}: {e}") from None


def image_to_array(im, mode: str | None, size: tuple[int, int] | None) -> np.ndarray:
    """A PIL image as uint8 (C, H, W), converted and resized the way training data is read.

    ``mode`` "L" or "RGB" converts; ``None`` keeps grey images grey (C=1; palette images whose
    colours are all grey count as grey) and others RGB (C=3). ``size`` is (H, W), bilinear.

    Example:
        >>> from PIL import Image
        >>> image_to_array(Image.new("RGB", (8, 4)), "L", (2, 3)).shape
        (1, 2, 3)
    """
    from PIL import Image

    palette = im.mode in ("P", "PA")
    if mode is None:
        im = im.convert("L" if im.mode in _GREY_MODES else "RGB")
    else:
        im = im.convert(mode)
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        return arr[None]
    arr = np.transpose(arr, (2, 0, 1))
    if mode is None and palette and (arr[0] == arr[1]).all() and (arr[0] == arr[2]).all():
        return np.ascontiguousarray(arr[:1])  # e.g. a GIF with a grey palette
    return arr


def load_image_files(
    paths: list[str],
    *,
    image_size: tuple[int, int] | None = None,
    grayscale: bool | None = None,
    skip_bad: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """Read images into a float tensor (N, C, H, W) in [0, 1]; returns (x, indices kept).

    ``grayscale=None``: one channel if every image is grey, else RGB (grey images replicated);
    True/False force one/three channels. Without ``image_size`` every image must have the size
    of the first one (else a :class:`FileFormatError` naming the file). Unreadable files raise a
    :class:`FileFormatError` naming the file, or with ``skip_bad`` are left out and counted in a
    warning.
    """
    mode = None if grayscale is None else ("L" if grayscale else "RGB")
    arrays, kept, bad = [], [], []
    size = image_size
    for i, p in enumerate(paths):
        try:
            arr = _read_image(p, mode, image_size)
        except FileFormatError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
            continue
        if size is None:
            size = (arr.shape[1], arr.shape[2])
        elif arr.shape[1:] != tuple(size):
            raise FileFormatError(
                f"image {_display(p)} is {arr.shape[2]}x{arr.shape[1]} but earlier images are "
                f"{size[1]}x{size[0]}; pass an image size (e.g. --image-size H W) to resize all"
            )
        arrays.append(arr)
        kept.append(i)
    warn_skipped(bad, stacklevel=3)
    if not arrays:
        raise FileFormatError("no readable images")
    if mode is None and any(a.shape[0] == 3 for a in arrays):
        # some image has colour: RGB throughout (grey -> RGB replicates the channel, as Pillow)
        arrays = [a if a.shape[0] == 3 else np.repeat(a, 3, axis=0) for a in arrays]
    x = torch.from_numpy(np.stack(arrays)).float().div_(255.0)
    return x, kept


def load_image_folder(root: Path, image_size=None, grayscale=None, skip_bad=False) -> Dataset:
    files, labels, other, ignored_links = _scan_image_folder(root)
    if ignored_links:
        warnings.warn(
            f"ignored {len(ignored_links)} folders under {_display(root)} reached again "
            f"through a symlink, or broken links (e.g. {_display(ignored_links[0])})",
            stacklevel=3,
        )
    if other:
        msg = (
            f"{len(other)} files in {_display(root)} are not images in a class folder "
            f"(e.g. {_display(other[0])})"
        )
        if not skip_bad:
            raise FileFormatError(msg + "; move them away or pass --skip-bad to ignore them")
        warnings.warn(msg + ": ignored", stacklevel=3)
    if not files:
        raise FileFormatError(
            f"no images found under {_display(root)} (expected ROOT/<class>/<image>, "
            f"extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    x, kept = load_image_files(files, image_size=image_size, grayscale=grayscale, skip_bad=skip_bad)
    y, classes = _contiguous_labels([labels[i] for i in kept])
    return Dataset(
        x=x,
        y=y,
        classes=classes,
        paths=[files[i] for i in kept],
        kind="image",
        name=root.name or str(root),
        info={
            "source": str(root),
            "skipped_files": len(files) - len(kept) + len(other) if skip_bad else 0,
        },
    )


# ----------------------------------------------------------------------------------------- idx


def _open_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except Exception as e:  # noqa: BLE001 - OSError, EOFError, zlib.error, BadGzipFile
        raise FileFormatError(f"cannot read {path}: {e}") from None


def read_idx(path: Path) -> np.ndarray:
    """Read an MNIST-style idx file (optionally gzip-compressed)."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise FileFormatError(f"{path} is not an idx file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes or ndim == 0:
        raise FileFormatError(f"{path}: unsupported idx type 0x{dtype_code:02x} / {ndim} dims")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FileFormatError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dt = np.dtype(dtypes[dtype_code])
    need = int(np.prod(shape)) * dt.itemsize
    if len(data) - header != need:
        raise FileFormatError(
            f"{path} is truncated or corrupt: {len(data) - header} data bytes, expected {need}"
        )
    return np.frombuffer(data, dtype=dt, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for cand in (root / stem, root / f"{stem}.gz", root / stem.replace("-idx", ".idx")):
        if cand.exists():
            return cand
    return None


def is_idx_dir(root: Path) -> bool:
    return root.is_dir() and _find_idx(root, _IDX_FILES["train"][0]) is not None


def load_idx_dir(root: Path) -> Dataset:
    xs, ys, split = [], [], {}
    offset = 0
    for part, (img_stem, lab_stem) in _IDX_FILES.items():
        img, lab = _find_idx(root, img_stem), _find_idx(root, lab_stem)
        if img is None or lab is None:
            if part == "train":
                raise MissingFileError(f"{root}: missing {img_stem}[.gz] or {lab_stem}[.gz]")
            continue
        x, y = read_idx(img), read_idx(lab)
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise FileFormatError(f"{img} / {lab}: shapes {x.shape} and {y.shape} do not match")
        xs.append(x)
        ys.append(y)
        split[part] = list(range(offset, offset + len(y)))
        offset += len(y)
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)[:, None]
    y, classes = _contiguous_labels(np.concatenate(ys).tolist())
    return Dataset(
        x=x,
        y=y,
        classes=classes,
        paths=None,
        kind="image",
        name=root.name,
        predefined_split=split if "test" in split else None,
        info={"source": str(root)},
    )


# ------------------------------------------------------------------------------------- vectors


def _vectors(x: np.ndarray, y: np.ndarray, path: Path) -> Dataset:
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise FileFormatError(f"{path}: features must be a non-empty 2-D array, got {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise FileFormatError(f"{path}: {x.shape[0]} rows but labels of shape {y.shape}")
    try:
        xf = x.astype(np.float32)
    except (TypeError, ValueError):
        raise FileFormatError(f"{path}: features are not numeric") from None
    if not np.isfinite(xf).all():
        bad = int((~np.isfinite(xf)).any(axis=1).sum())
        raise FileFormatError(f"{path}: {bad} rows contain NaN or Inf")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise FileFormatError(f"{path}: labels must be integers or strings")
        y = y.astype(np.int64)
    labels, classes = _contiguous_labels(y.tolist())
    return Dataset(
        x=torch.from_numpy(xf),
        y=labels,
        classes=classes,
        paths=None,
        kind="vector",
        name=path.stem,
        info={"source": str(path)},
    )


def load_vector_file(path: Path) -> Dataset:
    """``.npz`` with ``x``/``embeddings`` and ``y``/``labels``; ``.npy`` (N, D+1) with the label
    in the last column; ``.csv`` with a header and a ``label`` column (other columns numeric)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                xk = next((k for k in ("x", "embeddings", "features") if k in z.files), None)
                yk = next((k for k in ("y", "labels", "label") if k in z.files), None)
                if xk is None or yk is None:
                    raise FileFormatError(
                        f"{path}: needs arrays 'x' (or 'embeddings') and 'y' (or 'labels'); "
                        f"found {z.files}"
                    )
                return _vectors(z[xk], z[yk], path)
        if suffix == ".npy":
            a = np.load(path, allow_pickle=False)
            if a.ndim != 2 or a.shape[1] < 2:
                raise FileFormatError(
                    f"{path}: expected shape (N, D+1) with the label in the last column, "
                    f"got {a.shape}"
                )
            return _vectors(a[:, :-1], a[:, -1], path)
        if suffix == ".csv":
            import csv

            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
            if not rows:
                raise FileFormatError(f"{path} is empty")
            header = [h.strip() for h in rows[0]]
            if "label" not in header:
                raise FileFormatError(f"{path}: no 'label' column in the header {header[:8]}")
            li = header.index("label")
            body = [r for r in rows[1:] if r]
            if not body:
                raise FileFormatError(f"{path} has a header but no data rows")
            if any(len(r) != len(header) for r in body):
                raise FileFormatError(f"{path}: rows have differing numbers of columns")
            try:
                x = np.array([[float(v) for j, v in enumerate(r) if j != li] for r in body])
            except ValueError as e:
                raise FileFormatError(f"{path}: non-numeric feature value ({e})") from None
            y = np.array([r[li].strip() for r in body], dtype=object)
            return _vectors(x.reshape(len(body), -1), y, path)
    except FileFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile, numpy and csv raise many error types
        raise FileFormatError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    raise FileFormatError(f"{path}: unsupported vector file type {suffix!r} (.npz, .npy, .csv)")


# --------------------------------------------------------------------------------------- entry


def load_dataset(
    spec: str,
    *,
    image_size: tuple[int, int] | None = None,
    grayscale: bool | None = None,
    skip_bad: bool = False,
) -> Dataset:
    """Load a data set into memory.

    ``spec`` is one of:

    * ``"digits"``: scikit-learn's bundled 8x8 digits as 64-d vectors in [0, 1], classes "0".."9";
    * a folder ``ROOT/<class>/.../<image>`` (class = the folder path relative to ROOT, e.g.
      ``Greek/character03``; png/jpg/pgm/gif/bmp/...; files sorted; symlinked folders are not
      followed, so links cannot loop); ``image_size`` (H, W) resizes, ``grayscale`` forces the
      channels (default: grey if every image is grey, else RGB);
    * a folder of MNIST-style idx files (``train-images-idx3-ubyte[.gz]``, ``...-labels-...``,
      ``t10k-...``): images (N, 1, H, W) with ``predefined_split`` {"train", "test"};
    * a vector file: ``.npz`` with ``x``/``embeddings`` and ``y``/``labels``; ``.csv`` with a
      header, a ``label`` column and numeric feature columns; ``.npy`` of shape (N, D+1) whose last
      column is the (integer) label;
    * a text file (:mod:`tripletlab.data.text`): ``.csv``/``.tsv``/``.jsonl`` with ``text,label``
      columns, as a data set of kind ``"text"`` (``texts`` holds the strings).

    Labels become contiguous ids 0..C-1 in natural order of their names (``classes``).
    Unreadable or non-image files raise :class:`FileFormatError` naming the file; with
    ``skip_bad=True`` they are left out and counted in a warning.
    """
    if spec == "digits":
        return load_digits_dataset()
    path = Path(spec)
    if not path.exists():
        raise MissingFileError(f"data not found: {spec} (expected 'digits', a folder or a file)")
    if path.is_dir():
        if is_idx_dir(path):
            ds = load_idx_dir(path)
            if image_size is not None and tuple(image_size) != ds.input_shape[1:]:
                ds.x = torch.nn.functional.interpolate(
                    ds.x, size=tuple(image_size), mode="bilinear", align_corners=False
                )
            if grayscale is False:
                ds.x = ds.x.expand(-1, 3, -1, -1).contiguous()
            return ds
        return load_image_folder(path, image_size, grayscale, skip_bad)
    from .text import is_text_file, load_text_dataset

    if is_text_file(path):  # .tsv/.jsonl, or a .csv with a text column
        return load_text_dataset(path, skip_bad=skip_bad)
    if path.suffix.lower() in (".npz", ".npy", ".csv"):
        return load_vector_file(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        raise InputError(f"{spec} is a single image; give the folder of class folders instead")
    raise FileFormatError(f"{spec}: unsupported data file (use a folder, .npz, .npy or .csv)")
