"""Small shared helpers: atomic file writes, JSON conversion and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success fsync it and rename it over ``path``.

    A reader never sees a half-written file: either the old content or the complete new one.
    On an exception the temporary file is removed and ``path`` is left untouched.

    Example:
        >>> with atomic_open("out.json", "w") as f:  # doctest: +SKIP
        ...     f.write("{}")
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp's 0600 would hide the file from a team
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)  # make the rename durable


def check_replaceable(path: str | os.PathLike[str]) -> None:
    """Raise :class:`~tripletlab.errors.InputError` when ``path`` exists (following links) and
    is not a regular file: an atomic write renames a new file over it, which would turn
    ``/dev/full`` or a FIFO into a regular file (and, as root, ``/dev/null``), or fail late on a
    directory.

    Example:
        >>> check_replaceable("/dev/null")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        tripletlab.errors.InputError: /dev/null exists and is a character device, not a ...
    """
    import stat

    from .errors import InputError

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    if stat.S_ISREG(st.st_mode):
        return
    kind = (
        "a directory"
        if stat.S_ISDIR(st.st_mode)
        else "a character device"
        if stat.S_ISCHR(st.st_mode)
        else "a block device"
        if stat.S_ISBLK(st.st_mode)
        else "a FIFO"
        if stat.S_ISFIFO(st.st_mode)
        else "a socket"
        if stat.S_ISSOCK(st.st_mode)
        else "not a regular file"
    )
    raise InputError(
        f"{path} exists and is {kind}, not a regular file: give the path of a file to write"
    )


def current_umask() -> int:
    """The process umask (read by setting and restoring it), e.g. ``0o022``: files are created
    with ``0o666 & ~umask`` as ``open()`` would, not mkstemp's private 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames inside it survive a crash (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays as Python values and non-finite floats as None.

    Example:
        >>> import numpy as np
        >>> jsonable({"a": np.float32(0.5), "b": [float("nan")], 1: np.arange(2)})
        {'a': 0.5, 'b': [None], '1': [0, 1]}
    """
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
