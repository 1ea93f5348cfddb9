"""The server's gallery: an :class:`~tripletlab.index.EmbeddingIndex` on disk, changed by
enrolments and deletions, each batch of changes persisted atomically before it is answered.

``EmbeddingIndex.save`` writes each file atomically, but not the directory as a whole. The store
therefore writes the complete new index into a sibling ``.NAME.new`` directory and swaps it in
with two renames (``NAME -> .NAME.old``, ``.NAME.new -> NAME``), fsyncing the parent. A crash
between the renames leaves ``.NAME.old``, which the next :class:`GalleryStore` puts back: the
gallery on disk is always a complete index whose checksums verify, holding every change that
was answered with success. Enrolled images are kept, named by their sha256, in ``NAME.images/``.

One process at a time: a store holds an exclusive ``fcntl.flock`` on ``.NAME.lock`` beside
the directory (the directory itself is replaced on every change, so the lock cannot live
inside it) for as long as it is open; a second server on the same ``--index`` refuses to start
with an :class:`~tripletlab.errors.InputError` naming the process that holds it. The lock goes
with the process, however it ends (the kernel drops it), so a killed server never leaves a
stale lock behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..index.embedding_index import EmbeddingIndex
from ..inference.run import check_index_faces, check_index_postprocess
from ..metrics.postprocess import PostProcess, parse_postprocess
from ..rundir.lock import lock_gallery
from ..utils import atomic_write_bytes, atomic_write_json, fsync_dir

__all__ = ["Enrolment", "GalleryStore", "lock_gallery", "recover_gallery"]

SERVE_STATE = "serve.json"  # the server's own state beside the index files (next id)


@dataclass
class Enrolment:
    """One image to add: its embedding (D,), label name, original bytes and file extension."""

    embedding: np.ndarray
    label: str
    data: bytes | None = None
    ext: str = "png"


def recover_gallery(directory: str | Path) -> None:
    """Finish or undo an interrupted swap of ``directory`` (see the module docstring)."""
    d = Path(directory)
    new, old = d.parent / f".{d.name}.new", d.parent / f".{d.name}.old"
    if not d.exists() and old.exists():
        os.rename(old, d)  # the swap stopped halfway: the previous complete index
        fsync_dir(d.parent)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


class GalleryStore:
    """Thread-safe gallery: search, enrol, delete, list; persisted after every change.

    ``directory=None`` keeps the gallery in memory only.

    Example:
        >>> store = GalleryStore(None, dim=2, metric="cosine", fingerprint="x")
        >>> store.apply([Enrolment(np.array([1.0, 0.0], "f"), "alice")])
        [0]
        >>> store.search(np.array([[1.0, 0.1]], "f"), k=1)[1]
        array([[0]])
    """

    def __init__(
        self,
        directory: str | Path | None,
        dim: int,
        metric: str,
        fingerprint: str,
        images_dir: str | Path | None = None,
        postprocess: str | PostProcess = "none",
        faces: str | None = None,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.postprocess = parse_postprocess(postprocess)  # of every search; kept on changes
        self.faces = faces  # the face template of the embeddings (serve --faces), or None
        self.fingerprint = fingerprint
        self.lock = threading.RLock()  # guards the in-memory index
        self._write_lock = threading.Lock()  # serialises apply() (changes + persist)
        self._lock_file = None
        if self.directory is not None:
            self._lock_file = lock_gallery(self.directory)  # before anything is read
        try:
            self._open(dim, metric, images_dir)
        except BaseException:
            self.close()
            raise

    def _open(self, dim: int, metric: str, images_dir: str | Path | None) -> None:
        fingerprint = self.fingerprint
        if self.directory is not None:
            recover_gallery(self.directory)
            d = self.directory
            if d.exists() and (
                not d.is_dir() or (any(d.iterdir()) and not (d / "manifest.json").exists())
            ):
                # every change replaces the directory: never adopt one holding other files
                raise InputError(
                    f"{d} is not an index directory (no manifest.json) and not empty; give a "
                    "new directory or one written by `tripletlab index`"
                )
        if self.directory is not None and (self.directory / "manifest.json").exists():
            self.index = EmbeddingIndex.load(self.directory, expected_fingerprint=fingerprint)
            check_index_postprocess(self.index, self.postprocess, self.directory)
            check_index_faces(self.index, self.faces, self.directory)
            if self.index.dim != dim or self.index.metric != metric:
                raise InputError(
                    f"the gallery {self.directory} holds {self.index.metric} vectors of dimension "
                    f"{self.index.dim}; the model gives {metric} vectors of dimension {dim}"
                )
        else:
            self.index = EmbeddingIndex(dim, metric=metric, postprocess=self.postprocess)
            self.index.classes, self.index.paths = [], []
            self.index.faces = self.faces
        if self.index.classes is None:  # e.g. an index of vectors with integer labels
            n = int(self.index.labels.max()) + 1 if len(self.index) else 0
            self.index.classes = [str(i) for i in range(max(n, 0))]
        if images_dir is not None:
            self.images_dir: Path | None = Path(images_dir)
        elif self.directory is not None:
            self.images_dir = self.directory.parent / f"{self.directory.name}.images"
        else:
            self.images_dir = None
        self.version = 0
        # ids are never reused, even after deleting the largest: the next one is kept on disk
        self.next_id = self._read_next_id()
        self._memory_images: dict[int, bytes] = {}  # enrolled images of an in-memory gallery

    def close(self) -> None:
        """Release the index directory's lock (the store must not be changed afterwards)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __len__(self) -> int:
        return len(self.index)

    # ------------------------------------------------------------------ reads
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, ids)`` of the ``k`` nearest gallery items (k clamped to the size)."""
        with self.lock:
            return self.index.search(queries, k)

    def describe(self, ids) -> list[dict]:
        """``{"id", "label", "path"}`` of each id (label ``None`` for unknown ids)."""
        with self.lock:
            ids = np.asarray(ids, dtype=np.int64).ravel()
            labels = self.index.labels_of(ids)
            paths = self.index.paths_of(ids) if len(self.index) else [None] * len(ids)
            classes = self.index.classes or []
            return [
                {"id": int(i), "label": self._label(int(lab), classes), "path": p}
                for i, lab, p in zip(ids, labels, paths, strict=True)
            ]

    @staticmethod
    def _label(lab: int, classes: list[str]):
        if lab < 0:
            return None
        return classes[lab] if lab < len(classes) else str(lab)

    def items(self, offset: int = 0, limit: int = 100) -> list[dict]:
        with self.lock:
            return self.describe(self.index.ids[offset : offset + limit])

    def image_bytes(self, item_id: int) -> bytes | None:
        """The stored image file of an item (``None`` without one); KeyError for unknown ids."""
        with self.lock:
            if not (self.index.ids == item_id).any():
                raise KeyError(item_id)
            if item_id in self._memory_images:
                return self._memory_images[item_id]
            path = self.index.paths_of([item_id])[0]
        if not path or not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()

    # ------------------------------------------------------------------ writes
    def apply(self, changes: list) -> list:
        """Apply enrolments (:class:`Enrolment`) and deletions (``int`` ids) in order, persist
        once, and return one result per change: the new id, ``True`` for a deletion, or the
        exception of a change that failed (the others still apply). When persisting fails the
        gallery is reloaded from disk and the error is raised for every change."""
        with self._write_lock:  # one writer at a time; readers only wait for the changes
            results: list = []
            changed = False
            try:
                with self.lock:
                    for ch in changes:
                        try:
                            if isinstance(ch, Enrolment):
                                results.append(self._enrol(ch))
                            else:
                                if self.index.remove_ids(self._item_id(ch)) == 0:
                                    raise KeyError(int(ch))
                                results.append(True)
                            changed = True
                        except Exception as e:  # noqa: BLE001 - this change's own answer
                            results.append(e)
                if changed:
                    self._persist()  # reads the index only: searches go on meanwhile
            except BaseException:
                # nothing may stay in memory that is not on disk: a later persist would store
                # changes whose requests were answered with an error (and retried)
                with self.lock:
                    self._reload()
                raise
            return results

    @staticmethod
    def _item_id(ch) -> list[int]:
        i = int(ch)
        if not 0 <= i < 2**63:
            raise KeyError(i)
        return [i]

    def _enrol(self, e: Enrolment) -> int:
        classes = self.index.classes
        if e.label not in classes:
            classes.append(e.label)
        lab = classes.index(e.label)
        path = ""
        if e.data is not None and self.images_dir is not None:
            name = hashlib.sha256(e.data).hexdigest()[:32] + "." + e.ext
            p = self.images_dir / name
            if not p.exists():
                self.images_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(p, e.data)
            path = str(p.resolve())
        new_id = max(self.next_id, int(self.index.ids.max()) + 1 if len(self.index) else 0)
        self.next_id = new_id + 1
        self.index.add(e.embedding[None], labels=np.array([lab]), paths=[path], ids=[new_id])
        if e.data is not None and self.images_dir is None:
            self._memory_images[new_id] = e.data
        return new_id

    def _persist(self) -> None:
        self.version += 1
        d = self.directory
        if d is None:
            return
        d.parent.mkdir(parents=True, exist_ok=True)
        new, old = d.parent / f".{d.name}.new", d.parent / f".{d.name}.old"
        shutil.rmtree(new, ignore_errors=True)
        self.index.save(new, fingerprint=self.fingerprint)
        atomic_write_json(new / SERVE_STATE, {"next_id": self.next_id})  # beside the manifest
        fsync_dir(new)
        if d.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(d, old)
        os.rename(new, d)
        fsync_dir(d.parent)
        shutil.rmtree(old, ignore_errors=True)

    def _read_next_id(self) -> int:
        if self.directory is None or not (self.directory / SERVE_STATE).exists():
            return 0
        try:
            n = json.loads((self.directory / SERVE_STATE).read_text(encoding="utf-8"))["next_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0  # only a hint: ids stay unique without it
        return int(n) if isinstance(n, int) and n >= 0 else 0

    def _reload(self) -> None:
        if self.directory is not None and (self.directory / "manifest.json").exists():
            self.index = EmbeddingIndex.load(self.directory, expected_fingerprint=self.fingerprint)
        elif self.directory is not None:
            self.index = EmbeddingIndex(
                self.index.dim, metric=self.index.metric, postprocess=self.postprocess
            )
            self.index.faces = self.faces
            self.index.classes, self.index.paths = [], []
