"""A bounded cache of derived folders in a run directory: ``RUN_DIR/faces_cache/<key>``, the
aligned faces of the folders given to ``eval`` / ``embed`` / ``index --faces`` (issue #26).

Each entry is built in a private ``.tmp-<key>-<pid>`` folder and renamed into place with its
``.summary.json``, so an entry is complete or absent; a per-entry ``flock`` (``.<key>.lock``)
makes one process build it while the others wait and then reuse it, and is held shared by every
process using the entry. After each new entry the cache keeps the ``keep`` most recently used
entries (recency: the entry folder's modification time, set on every use) and removes the
others, except those another process (or this one) holds: their lock cannot be taken. Building
folders of processes that are gone (``.tmp-*-PID``, e.g. killed by SIGKILL) are removed too.

Example:
    >>> entry, summary, held = cached_folder(
    ...     Path("run/faces_cache"), "ab12", build=lambda tmp: {"n": 1}, keep=8
    ... )  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..utils import atomic_write_json

__all__ = ["DEFAULT_KEEP", "SUMMARY", "cache_keep", "cached_folder", "lock_file", "prune_cache"]

#: entries kept by default (``TRIPLETLAB_FACES_CACHE_KEEP`` overrides it)
DEFAULT_KEEP = 8
#: the file that marks a complete entry (the build's summary)
SUMMARY = ".summary.json"


def cache_keep() -> int:
    """How many entries the face cache keeps: ``TRIPLETLAB_FACES_CACHE_KEEP`` (an integer >= 1)
    or :data:`DEFAULT_KEEP`.

    Example:
        >>> cache_keep() >= 1
        True
    """
    from ..errors import InputError

    raw = os.environ.get("TRIPLETLAB_FACES_CACHE_KEEP", "").strip()
    if not raw:
        return DEFAULT_KEEP
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"TRIPLETLAB_FACES_CACHE_KEEP must be an integer >= 1, got {raw!r}")
    return n


def lock_file(path: str | Path, exclusive: bool, blocking: bool = True) -> IO[Any] | None:
    """``path`` opened (created if need be) with a ``flock`` held: exclusive or shared,
    waiting for it or not. Returns the open file (close it to release), or None when
    ``blocking`` is False and another holder has a conflicting lock. The lock is checked to be
    on the file ``path`` names now (a pruner may unlink it meanwhile: then it is taken again).
    Without ``fcntl`` (Windows) the file is returned unlocked.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / ".k.lock"
        >>> a = lock_file(p, exclusive=False)
        >>> lock_file(p, exclusive=True, blocking=False) is None  # a reader holds it
        True
        >>> a.close()
    """
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return open(path, "a+", encoding="utf-8")  # noqa: SIM115 - the caller closes it
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
    while True:
        f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open as the lock
        try:
            fcntl.flock(f.fileno(), mode)
        except BlockingIOError:
            f.close()
            return None
        except BaseException:
            f.close()
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()  # the file was unlinked (pruned) while we waited: lock the new one


def _relock(f: IO[Any] | None, exclusive: bool) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    if f is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)


def _touch(entry: Path) -> None:
    now = time.time_ns()
    os.utime(entry, ns=(now, now))


def cached_folder(
    cache: str | Path,
    key: str,
    build: Callable[[Path], dict],
    keep: int = DEFAULT_KEEP,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, dict, IO[Any] | None, list[str]]:
    """The entry ``cache/key``, built by ``build(folder) -> summary`` when absent (into a
    private folder renamed into place), marked most recently used, and held shared.

    Returns ``(entry, summary, held, removed)``: ``held`` is the open lock file (close it when
    done reading the entry; until then no pruner removes it), ``removed`` the keys pruned after
    a new entry (see :func:`prune_cache`; each also passed to ``log``).

    Example:
        >>> import tempfile
        >>> c = Path(tempfile.mkdtemp())
        >>> e, s, held, _ = cached_folder(c, "k1", lambda tmp: {"n": len(list(tmp.iterdir()))})
        >>> s, e.name
        ({'n': 0}, 'k1')
        >>> held.close()
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    entry, lock_path = cache / key, cache / f".{key}.lock"
    done = entry / SUMMARY
    held = lock_file(lock_path, exclusive=False)
    built = False
    if not done.is_file():
        if held is not None:
            held.close()
        held = lock_file(lock_path, exclusive=True)  # one builder; the others wait for it
        try:
            if not done.is_file():
                tmp = cache / f".tmp-{key}-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                try:
                    summary = build(tmp)
                    atomic_write_json(tmp / SUMMARY, summary)
                    if entry.exists():  # an incomplete entry (written in place before)
                        shutil.rmtree(entry)
                    os.replace(tmp, entry)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                built = True
            _touch(entry)  # the most recent before the lock becomes shared
            _relock(held, exclusive=False)
        except BaseException:
            if held is not None:
                held.close()
            raise
    else:
        _touch(entry)
    summary = json.loads(done.read_text(encoding="utf-8"))
    removed = prune_cache(cache, keep, log) if built else []
    return entry, summary, held, removed


def prune_cache(
    cache: str | Path, keep: int = DEFAULT_KEEP, log: Callable[[str], None] | None = None
) -> list[str]:
    """Remove all but the ``keep`` most recently used entries of ``cache`` (entry folders
    without a leading dot, by modification time), skipping those whose lock another holder
    has (in use); also the building folders of processes that are gone, and lock files left
    without an entry. Returns the removed keys; each is passed to ``log``.

    Example:
        >>> prune_cache("run/faces_cache", keep=8)  # doctest: +SKIP
        ['3f9a0c...']
    """
    from .files import _pid_alive

    cache = Path(cache)
    if not cache.is_dir():
        return []
    entries, locks = [], []
    for p in cache.iterdir():
        if p.name.startswith(".tmp-") and p.is_dir():
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.name.endswith(".lock"):
            locks.append(p)
        elif not p.name.startswith(".") and p.is_dir():
            try:
                entries.append((p.stat().st_mtime_ns, p))
            except FileNotFoundError:  # removed by another pruner meanwhile
                continue
    entries.sort(key=lambda t: (t[0], t[1].name), reverse=True)
    removed = []
    for _, p in entries[max(int(keep), 1) :]:
        held = lock_file(cache / f".{p.name}.lock", exclusive=True, blocking=False)
        if held is None:  # in use (read or being rebuilt): keep it for now
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
            (cache / f".{p.name}.lock").unlink(missing_ok=True)
        finally:
            held.close()
        removed.append(p.name)
        if log is not None:
            log(f"removed the least recently used entry {p} (keeping {keep})")
    names = {p.name for _, p in entries}
    for lk in locks:  # locks of entries never completed (a failed build) or removed elsewhere
        key = lk.name[1 : -len(".lock")]
        if key in names or (cache / key).exists():
            continue
        held = lock_file(lk, exclusive=True, blocking=False)
        if held is not None:
            try:
                if not (cache / key).exists():
                    lk.unlink(missing_ok=True)
            finally:
                held.close()
    return removed
