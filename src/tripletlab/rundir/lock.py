"""The lock that keeps two processes from writing one index directory at once (the server's
gallery, ``tripletlab index --out``)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

__all__ = ["lock_gallery"]


def lock_gallery(directory: str | Path):
    """An open file holding an exclusive, non-blocking ``flock`` on ``directory``'s lock file
    ``.NAME.lock`` (its parent is created if need be); :class:`InputError` naming the holder's
    pid when another process has it. Close the file to release the lock. ``None`` where the
    platform has no ``fcntl``.

    Example:
        >>> f = lock_gallery("gallery")  # doctest: +SKIP
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    path = d.parent / f".{d.name}.lock"
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open as the lock
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise InputError(
            f"the index {d} is in use by another process (pid {holder}, lock {path}): two "
            "writers of one index (servers, `tripletlab index --out`) would lose each other's "
            "changes. Stop the other process, or use a copy of the index"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
