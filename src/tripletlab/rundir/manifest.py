"""One sha256 manifest writer and verifier, shared by checkpoints and indexes.

A directory of artefacts gets a ``manifest.json`` written last (atomically) that holds a format
number, caller fields (step, dimension, ...) and the sha256 of every listed file. A reader checks
the format, that the required files are listed, present and unchanged, before it opens any of
them; a crash mid-write, a truncated copy or a swapped file is then a clear error naming the file.

Example:
    >>> import tempfile, pathlib
    >>> from tripletlab.rundir.manifest import read_manifest, verify_files, write_manifest
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.bin").write_bytes(b"hello")
    >>> _ = write_manifest(d, ["a.bin"], format=1, step=3)
    >>> man = read_manifest(d / "manifest.json", format=1, what="demo")
    >>> man["step"], verify_files(d, man["files"], ["a.bin"], what="demo")
    (3, None)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import FileFormatError, MissingFileError
from ..utils import atomic_write_json, sha256_file

__all__ = ["MANIFEST", "read_manifest", "verify_files", "write_manifest"]

MANIFEST = "manifest.json"


def write_manifest(
    directory: str | Path, files: Iterable[str], *, format: int, **fields: Any
) -> dict[str, Any]:
    """Checksum ``files`` (names inside ``directory``) and write ``directory/manifest.json``
    atomically: ``{"format": format, **fields, "files": {name: sha256}}``. Returns it."""
    d = Path(directory)
    manifest = {"format": format, **fields, "files": {f: sha256_file(d / f) for f in files}}
    atomic_write_json(d / MANIFEST, manifest)
    return manifest


def read_manifest(path: str | Path, *, format: int, what: str) -> dict[str, Any]:
    """Parse a manifest: a JSON object of the expected ``format`` whose ``files`` maps plain
    file names to sha256 strings. Anything else is a :class:`FileFormatError` that names
    ``path`` ("corrupt <what> manifest ...")."""
    path = Path(path)
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(man, dict):
            raise ValueError("not a JSON object")
        if man.get("format") != format:
            raise ValueError(f"unsupported format {man.get('format')!r} (expected {format})")
        files = man["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' must be an object")
        if not all(
            isinstance(name, str) and name == Path(name).name and isinstance(h, str)
            for name, h in files.items()
        ):
            raise ValueError("'files' must map plain file names to sha256 strings")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise FileFormatError(f"corrupt {what} manifest {path}: {e}") from None
    return man


def verify_files(
    directory: str | Path, files: dict[str, str], required: Iterable[str], *, what: str
) -> None:
    """Check that every ``required`` name is listed in ``files`` and that every listed file
    exists with its recorded sha256. Raises :class:`FileFormatError` (unlisted, corrupted or
    truncated file) or :class:`MissingFileError` (listed but absent), naming the file."""
    d = Path(directory)
    unlisted = sorted(set(required) - set(files))
    if unlisted:
        raise FileFormatError(
            f"corrupt {what} manifest {d / MANIFEST}: 'files' must list {sorted(required)} "
            f"with their sha256 (missing {unlisted})"
        )
    for name, digest in files.items():
        p = d / name
        if not p.exists():
            raise MissingFileError(f"{what} file missing: {p}")
        if sha256_file(p) != digest:
            raise FileFormatError(
                f"{what} file {p} is corrupted or truncated (sha256 does not match {MANIFEST})"
            )
