"""Evaluation groups of items (camera, session, sequence) from a ``--groups`` spec, for the
re-identification protocol of :func:`tripletlab.metrics.retrieval_metrics` (a query's gallery
excludes every item of its own group).

Specs:

* ``path:N`` — the N-th folder above each item's file: ``path:1`` its parent folder's name,
  ``path:2`` the folder above that, ... (``.../cam3/0001_x.jpg`` with ``path:1`` is ``cam3``).
* ``column:NAME`` — the ``NAME`` column of the CSV manifest (``path,label,NAME,...``) the items
  were read from (see :func:`manifest_columns`).
* ``FILE`` — a ``.csv`` or ``.tsv`` file with a header holding ``path`` and ``group`` columns,
  one row per item; relative paths are relative to the file's folder, as in a manifest. Every
  item must be listed (the error names the first one that is not).

Example:
    >>> load_groups("path:1", ["data/cam1/a.png", "data/cam2/b.png", "data/cam1/c.png"], 3)
    array([0, 1, 0])
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, InputError, MissingFileError

__all__ = ["load_groups", "manifest_columns"]


def _key(path: str | os.PathLike[str], base: Path | None = None) -> str:
    """A path as compared: absolute (relative ones taken from ``base``), normalised."""
    p = Path(path)
    if not p.is_absolute() and base is not None:
        p = base / p
    return os.path.normcase(os.path.normpath(os.path.abspath(p)))


def _codes(values: Sequence) -> np.ndarray:
    table: dict = {}
    return np.fromiter((table.setdefault(v, len(table)) for v in values), np.int64, len(values))


def _need_paths(paths: Sequence[str] | None, spec: str) -> Sequence[str]:
    if paths is None:
        raise InputError(
            f"--groups {spec} needs the items' file paths; these data (digits, vectors, idx, "
            "texts) have none"
        )
    return paths


def _from_levels(spec: str, paths: Sequence[str]) -> np.ndarray:
    level = spec.split(":", 1)[1]
    if not level.isdigit() or int(level) < 1:
        raise InputError(f"--groups path:N takes N >= 1 (1 = the parent folder), got {spec!r}")
    n = int(level)
    values = []
    for p in paths:
        parts = Path(os.path.normpath(p)).parts[:-1]  # the folders above the file
        if len(parts) < n:
            raise InputError(f"--groups {spec}: {p} has fewer than {n} folders above it")
        values.append(parts[-n])
    return _codes(values)


def _read_table(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise MissingFileError(f"groups file not found: {path}")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FileFormatError(f"cannot read groups file {path}: {e}") from None
    for col in ("path", "group"):
        if col not in header:
            raise FileFormatError(
                f"{path}: no {col!r} column in the header {header[:8]} (a groups file is "
                "'path,group' rows, tab-separated for .tsv)"
            )
    return rows


def _from_file(spec: str, paths: Sequence[str]) -> np.ndarray:
    file = Path(spec)
    table: dict[str, str] = {}
    for n, row in enumerate(_read_table(file), 2):
        p, g = (row.get("path") or "").strip(), (row.get("group") or "").strip()
        if not p or not g:
            raise FileFormatError(f"{file} line {n}: empty path or group")
        table[_key(p, file.parent)] = g
    values = []
    for p in paths:
        g = table.get(_key(p))
        if g is None:
            raise InputError(
                f"{file} has no group for {p} (relative paths in it are relative to its "
                f"folder, {file.parent})"
            )
        values.append(g)
    return _codes(values)


def manifest_columns(
    manifest: str | os.PathLike[str], paths: Sequence[str]
) -> dict[str, list[str]]:
    """Every column of a CSV manifest, as one value per item of ``paths`` (matched by file
    path; relative manifest paths are relative to its folder), for ``column:NAME`` groups.

    Example:
        >>> cols = manifest_columns("market.csv", paths)  # doctest: +SKIP
        >>> load_groups("column:camera", paths, len(paths), csv_columns=cols)  # doctest: +SKIP
    """
    m = Path(manifest)
    if m.suffix.lower() != ".csv" or not m.is_file():
        raise InputError(f"--groups column:NAME needs a CSV manifest as the data; got {m}")
    try:
        with open(m, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = {_key((r.get("path") or "").strip(), m.parent): r for r in reader}
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FileFormatError(f"cannot read manifest {m}: {e}") from None
    out: dict[str, list[str]] = {c: [] for c in header}
    for p in paths:
        row = rows.get(_key(p))
        if row is None:
            raise InputError(f"manifest {m} does not list {p}")
        for c in header:
            out[c].append((row.get(c) or "").strip())
    return out


def load_groups(
    spec: str | None,
    paths: Sequence[str] | None,
    n_items: int,
    csv_columns: Mapping[str, Sequence] | None = None,
) -> np.ndarray | None:
    """Integer group codes (n_items,) of the items from ``spec`` (see the module docstring),
    or None when ``spec`` is None. ``paths``: the items' files, in item order; ``csv_columns``:
    the manifest's columns as per-item values (:func:`manifest_columns`) for ``column:NAME``.
    """
    if spec is None:
        return None
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"--groups takes path:N, column:NAME or a file, got {spec!r}")
    spec = spec.strip()
    if paths is not None and len(paths) != n_items:
        raise InputError(f"{len(paths)} paths for {n_items} items")
    if spec.startswith("path:"):
        codes = _from_levels(spec, _need_paths(paths, spec))
    elif spec.startswith("column:"):
        name = spec.split(":", 1)[1]
        if csv_columns is None:
            raise InputError(f"--groups {spec} needs the data to be a CSV manifest")
        if name not in csv_columns:
            raise InputError(
                f"--groups {spec}: the manifest has no column {name!r} "
                f"(columns: {', '.join(list(csv_columns)[:12])})"
            )
        values = list(csv_columns[name])
        if len(values) != n_items:
            raise InputError(f"column {name!r} has {len(values)} values for {n_items} items")
        empty = [i for i, v in enumerate(values) if v in ("", None)]
        if empty and paths is not None:
            raise InputError(f"column {name!r} is empty for {paths[empty[0]]}")
        if empty:
            raise InputError(f"column {name!r} is empty for item {empty[0]}")
        codes = _codes(values)
    else:
        codes = _from_file(spec, _need_paths(paths, spec))
    return codes
