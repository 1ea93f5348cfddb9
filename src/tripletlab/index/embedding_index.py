"""A nearest-neighbour index over embeddings (faiss; exact numpy fallback), with save/load.

Directory layout written by :meth:`EmbeddingIndex.save`::

    manifest.json   format, dim, metric, kind, backend, count, fingerprint, sha256 of every file
    index.faiss     the faiss index (faiss backend) | vectors.npy (numpy backend)
    ids.npy         int64 ids (allow_pickle=False)
    labels.npy      int64 labels (-1 where unknown)
    meta.json       paths and class names (JSON, never pickle)
    raw.npy         the vectors before post-processing (only with a ``postprocess``)

Distances are in the metric's own units: euclidean distance, or cosine distance ``1 - cos``.

Post-processing (``postprocess=``, see :mod:`tripletlab.metrics.postprocess`) is part of the
index: ``dba`` and ``dba+aqe`` store the augmented gallery (recomputed from the raw vectors on
every ``add`` and ``remove_ids``, so a changed gallery stays consistent), ``aqe`` expands each
query over the gallery before the search, ``rerank`` re-ranks each query with k-reciprocal
encoding against the whole gallery (exact, one query at a time, O(N^2) per query: galleries up
to :data:`RERANK_MAX_ITEMS`). The manifest records it; an index is searched only with its own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..distances import iter_score_blocks, normalize_rows
from ..errors import FileFormatError, InputError, MissingFileError, missing_dependency
from ..metrics.postprocess import (
    PostProcess,
    alpha_query_expansion,
    database_augmentation,
    k_reciprocal_rerank,
    parse_postprocess,
)
from ..rundir.manifest import read_manifest, verify_files, write_manifest
from ..utils import atomic_write_bytes, atomic_write_json
from ..validation import as_matrix, check_k

__all__ = ["RERANK_MAX_ITEMS", "EmbeddingIndex", "default_pq_m", "search_quality"]

#: k-reciprocal re-ranking at search time is exact and costs O(N^2 D) per query: refused above
#: this many gallery items (measured in docs/retrieval.md)
RERANK_MAX_ITEMS = 20000

FORMAT = 1
KINDS = ("flat", "hnsw", "ivf", "ivfpq")
_IVF_KINDS = ("ivf", "ivfpq")


def default_pq_m(dim: int) -> int:
    """Sub-quantisers of an IVF-PQ index: the largest divisor of ``dim`` that leaves at least 4
    dimensions per sub-vector (16 for 128-d: 16 bytes per vector with 8-bit codes).

    Example:
        >>> default_pq_m(128), default_pq_m(64), default_pq_m(10)
        (16, 16, 2)
    """
    m = max(1, min(16, dim // 4))
    while dim % m:
        m -= 1
    return m


METRICS = ("cosine", "euclidean")

try:  # faiss is a dependency, but keep an exact fallback where it cannot be imported
    import faiss  # type: ignore

    HAVE_FAISS = True
except ImportError:  # pragma: no cover
    faiss = None
    HAVE_FAISS = False


def _exact_search(q: np.ndarray, x: np.ndarray, k: int, metric: str):
    """Exact k-NN by brute force in query blocks (the library's blocked distance, float64):
    (scores, positions) in faiss's conventions (inner products for cosine, squared L2 for
    euclidean); ties in insertion order. Cosine rows are already normalised (``_prep``)."""
    nq = q.shape[0]
    scores = np.empty((nq, k), dtype=np.float32)
    pos = np.empty((nq, k), dtype=np.int64)
    qt, xt = torch.from_numpy(q).double(), torch.from_numpy(x).double()
    for s, e, sc in iter_score_blocks(qt, xt, metric, block_elems=1 << 22):
        key = sc.numpy()
        p = np.argsort(key, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(key, p, axis=1)
        scores[s:e] = 1.0 - best if metric == "cosine" else best
        pos[s:e] = p
    return scores, pos


class EmbeddingIndex:
    """Search embeddings by nearest neighbour; holds ids, labels and optional paths.

    ``kind``: ``flat`` (exact, default), ``hnsw`` (graph, approximate), ``ivf`` (inverted lists,
    approximate; trained on the first ``add``), ``ivfpq`` (inverted lists of product-quantised
    codes, ``pq_m`` bytes per vector with ``pq_bits=8``: for millions of vectors; trained on the
    first ``add``, which needs at least ``max(ivf_nlist, 2**pq_bits)`` vectors). ``backend``:
    ``faiss``, ``numpy`` (exact brute force, flat only) or ``auto``.

    Example:
        >>> import numpy as np
        >>> from tripletlab.index import EmbeddingIndex
        >>> index = EmbeddingIndex(dim=4, metric="cosine")
        >>> index.add(np.eye(4), labels=[0, 1, 2, 3])
        >>> d, ids = index.search(np.eye(4)[:1], k=2)
        >>> int(ids[0, 0])
        0
    """

    def __init__(
        self,
        dim: int,
        metric: str = "cosine",
        kind: str = "flat",
        backend: str = "auto",
        hnsw_m: int = 32,
        ivf_nlist: int = 64,
        nprobe: int = 8,
        pq_m: int | None = None,
        pq_bits: int = 8,
        postprocess: str | PostProcess = "none",
    ) -> None:
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise InputError(f"index dimension must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise InputError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
        if kind not in KINDS:
            raise InputError(f"unknown index kind {kind!r}; choose one of {list(KINDS)}")
        if backend == "auto":
            backend = "faiss" if HAVE_FAISS else "numpy"
        if backend not in ("faiss", "numpy"):
            raise InputError(f"unknown backend {backend!r}; choose 'faiss', 'numpy' or 'auto'")
        if backend == "faiss" and not HAVE_FAISS:
            raise missing_dependency("faiss", "the faiss backend (or use backend='numpy')")
        if backend == "numpy" and kind != "flat":
            raise InputError("the numpy backend supports only the exact 'flat' index")
        self.dim, self.metric, self.kind, self.backend = int(dim), metric, kind, backend
        self.hnsw_m, self.ivf_nlist, self.nprobe = hnsw_m, ivf_nlist, nprobe
        self.pq_m = int(pq_m) if pq_m else default_pq_m(self.dim)
        self.pq_bits = int(pq_bits)
        if kind == "ivfpq" and (self.dim % self.pq_m or not 1 <= self.pq_bits <= 16):
            raise InputError(
                f"ivfpq needs pq_m dividing the dimension {self.dim} (got {self.pq_m}) and "
                f"1 <= pq_bits <= 16 (got {self.pq_bits})"
            )
        self.ids = np.zeros(0, dtype=np.int64)
        self.labels = np.zeros(0, dtype=np.int64)
        self.paths: list[str] | None = None
        #: the directory relative ``paths`` are relative to (recorded by ``tripletlab index``:
        #: the working directory it ran in); :meth:`paths_of` resolves against it
        self.root: str | None = None
        self.classes: list[str] | None = None
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)  # numpy backend
        self._index = self._new_faiss() if backend == "faiss" else None
        # recall@k against exact search and latency (search_quality), kept in the manifest
        self.quality: dict | None = None
        #: the post-processing every search applies (:mod:`tripletlab.metrics.postprocess`)
        self.postprocess = parse_postprocess(postprocess)
        self._raw = np.zeros((0, self.dim), dtype=np.float32)  # kept with a postprocess
        self._aug: np.ndarray | None = None  # the DBA of _raw (dba, dba+aqe), once computed
        #: the face template the indexed images were aligned with (``--faces``), or None
        self.faces: str | None = None

    # ------------------------------------------------------------------ build
    def _new_faiss(self):
        ip = self.metric == "cosine"
        mt = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim) if ip else faiss.IndexFlatL2(self.dim)
        if self.kind == "hnsw":
            return faiss.IndexHNSWFlat(self.dim, self.hnsw_m, mt)
        quant = faiss.IndexFlatIP(self.dim) if ip else faiss.IndexFlatL2(self.dim)
        if self.kind == "ivfpq":
            idx = faiss.IndexIVFPQ(quant, self.dim, self.ivf_nlist, self.pq_m, self.pq_bits, mt)
        else:
            idx = faiss.IndexIVFFlat(quant, self.dim, self.ivf_nlist, mt)
        self._quantizer = quant  # faiss does not own it: keep it alive
        return idx

    def _prep(self, x: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            x = normalize_rows(torch.from_numpy(x)).numpy()
        return np.ascontiguousarray(x, dtype=np.float32)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def add(self, embeddings, labels=None, paths=None, ids=None) -> None:
        """Add vectors with optional labels (ints; -1 = unknown), paths (str) and unique int
        ids (default: consecutive, after the largest id so far). Cosine indexes store the
        L2-normalised vectors."""
        x = self._prep(as_matrix(embeddings, self.dim, "embeddings"))
        n = x.shape[0]
        lab = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels)
        if lab.shape != (n,):
            raise InputError(f"{n} embeddings but labels of shape {lab.shape}")
        if lab.dtype.kind not in "iu":
            raise InputError(f"labels must be integers, got dtype {lab.dtype}")
        if ids is None:
            start = int(self.ids.max()) + 1 if len(self) else 0
            new_ids = np.arange(start, start + n, dtype=np.int64)
        else:
            new_ids = np.asarray(ids)
            if new_ids.dtype.kind not in "iu":
                raise InputError(f"ids must be integers, got dtype {new_ids.dtype}")
            new_ids = new_ids.astype(np.int64)
        if new_ids.shape != (n,):
            raise InputError(f"{n} embeddings but {new_ids.shape} ids")
        all_ids = np.concatenate([self.ids, new_ids])
        if np.unique(all_ids).size != all_ids.size:
            raise InputError("ids must be unique (within this add and across the index)")
        if paths is not None and len(paths) != n:
            raise InputError(f"{n} embeddings but {len(paths)} paths")
        if paths is None and self.paths is not None:
            paths = [""] * n
        if paths is not None and self.paths is None:
            self.paths = [""] * len(self)
        if self.postprocess.method != "none":
            self._raw = np.concatenate([self._raw, x])
        if self.postprocess.method in _DBA:
            self._reaugment()
        else:
            self._store(x)
        self.ids = np.concatenate([self.ids, new_ids])
        self.labels = np.concatenate([self.labels, lab.astype(np.int64)])
        if paths is not None:
            self.paths = list(self.paths or []) + [str(p) for p in paths]

    def _reaugment(self) -> None:
        """Recompute the DBA of the whole raw gallery and store it as the searched vectors
        (``dba``, ``dba+aqe``; after every change: each item's neighbours may have changed)."""
        self._aug = self._augmented(self._raw)
        self._store(self._aug, rebuild=True)

    def _gallery_augmented(self) -> np.ndarray:
        """The index's own DBA gallery, computed once (a loaded index computes it lazily)."""
        if self._aug is None:
            self._aug = self._augmented(self._raw)
        return self._aug

    def _augmented(self, raw: np.ndarray) -> np.ndarray:
        """The DBA of ``raw`` gallery vectors."""
        if raw.shape[0] == 0:
            return raw
        p = self.postprocess.params
        k = min(int(p["k"]), raw.shape[0])  # a gallery smaller than k: all of it, no warning
        aug = database_augmentation(torch.from_numpy(raw), k=k, alpha=p["alpha"],
                                    distance=self.metric)  # fmt: skip
        return self._prep(aug.numpy())

    def _store(self, x: np.ndarray, rebuild: bool = False) -> None:
        """Add ``x`` to the searched structure (``rebuild``: replace its content by ``x``)."""
        n = x.shape[0]
        if rebuild:
            if self.backend == "faiss":
                self._index = self._new_faiss()
            else:
                self._vectors = np.zeros((0, self.dim), dtype=np.float32)
            if n == 0:
                return
        if self.backend == "faiss":
            if self.kind in _IVF_KINDS and not self._index.is_trained:
                need = self.ivf_nlist
                if self.kind == "ivfpq":
                    need = max(need, 2**self.pq_bits)
                if n < need:
                    raise InputError(
                        f"an {self.kind} index with {self.ivf_nlist} lists"
                        + (f" and {self.pq_bits}-bit codes" if self.kind == "ivfpq" else "")
                        + f" needs at least {need} vectors in the first add, got {n}: use "
                        "--kind flat (exact) for small sets"
                    )
                self._index.train(x)
            self._index.add(x)
        else:
            self._vectors = np.concatenate([self._vectors, x])

    # ------------------------------------------------------------------ search
    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest items of each query: ``(distances, ids)`` of shape (n_queries, k).

        ``k`` larger than the index is clamped to its size (so the result may have fewer than
        k columns). Distances are euclidean distances or cosine distances (1 - cos), ascending,
        float32. The numpy backend orders equal distances by insertion order; faiss's order of
        exact ties is its own. Approximate kinds (hnsw, ivf) may find fewer than k items for a
        query: the missing slots have id -1 and distance inf, as in faiss.
        """
        if len(self) == 0:
            raise InputError("the index is empty: add embeddings before searching")
        k = check_k(k)
        q = self._prep(as_matrix(queries, self.dim, "queries"))
        k = min(int(k), len(self))
        method, p = self.postprocess.method, self.postprocess.params
        if method == "rerank":
            return self._rerank(q, k)
        if method in ("aqe", "dba+aqe"):
            gallery = self._raw if method == "aqe" else self._gallery_augmented()
            q = self._prep(
                alpha_query_expansion(torch.from_numpy(q), torch.from_numpy(gallery),
                    k=min(int(p["k"]), len(self)), alpha=p["alpha"], distance=self.metric,
                ).numpy()
            )  # fmt: skip
        return self._search_base(q, k)

    def _rerank(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k-reciprocal re-ranking of each query against the whole gallery, one at a time (a
        query's answer never depends on the others searched with it)."""
        n = len(self)
        if n > RERANK_MAX_ITEMS:
            raise InputError(
                f"k-reciprocal re-ranking is exact and costs O(N^2) per query; this gallery "
                f"holds {n} items (limit {RERANK_MAX_ITEMS}): rebuild the index with "
                "--postprocess none, aqe or dba"
            )
        p = self.postprocess.params
        raw = torch.from_numpy(self._raw)
        dist = np.empty((q.shape[0], k), dtype=np.float32)
        pos = np.empty((q.shape[0], k), dtype=np.int64)
        for i in range(q.shape[0]):
            d, j = k_reciprocal_rerank(torch.from_numpy(q[i : i + 1]), raw, k1=p["k1"],
                k2=p["k2"], lambda_value=p["lambda"], top_k=k, distance=self.metric,
            )  # fmt: skip
            dist[i], pos[i] = d[0].numpy(), j[0].numpy()
        return dist, self.ids[pos]

    def _search_base(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The search of the stored vectors (after DBA, before any query-side step)."""
        if self.backend == "faiss":
            if self.kind in _IVF_KINDS:
                self._index.nprobe = self.nprobe
            scores, pos = self._index.search(q, k)
        else:
            scores, pos = _exact_search(q, self._vectors, k, self.metric)
        if self.metric == "cosine":
            dist = np.clip(1.0 - scores, 0.0, 2.0)
        else:
            dist = np.sqrt(np.maximum(scores, 0.0))
        valid = pos >= 0
        ids = np.where(valid, self.ids[np.clip(pos, 0, None)], -1)
        dist = np.where(valid, dist, np.inf)
        return dist.astype(np.float32), ids.astype(np.int64)

    def remove_ids(self, ids) -> int:
        """Remove the items with the given ids (unknown ids are ignored); returns how many were
        removed. Exact ``flat`` indexes only (approximate kinds: rebuild the index).

        Example:
            >>> index = EmbeddingIndex(dim=2)
            >>> index.add(np.eye(2))
            >>> index.remove_ids([0]), len(index)
            (1, 1)
        """
        if self.kind != "flat":
            raise InputError(f"cannot remove items from a {self.kind!r} index; rebuild it")
        ids = np.asarray(ids, dtype=np.int64).ravel()
        drop = np.isin(self.ids, ids)
        n = int(drop.sum())
        if n == 0:
            return 0
        keep = ~drop
        if self.postprocess.method != "none":
            self._raw = self._raw[keep]
        if self.postprocess.method in _DBA:  # every item's DBA neighbours may have changed
            self._reaugment()
        elif self.backend == "faiss":
            self._index.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(drop).astype(np.int64)))
        else:
            self._vectors = self._vectors[~drop]
        self.ids, self.labels = self.ids[keep], self.labels[keep]
        if self.paths is not None:
            self.paths = [p for p, k in zip(self.paths, keep, strict=True) if k]
        return n

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        order = np.argsort(self.ids, kind="stable")
        where = np.searchsorted(self.ids[order], ids)
        where = np.clip(where, 0, len(order) - 1)
        pos = order[where]
        return np.where(self.ids[pos] == ids, pos, -1)

    def labels_of(self, ids) -> np.ndarray:
        """Labels of the given ids (-1 for unknown ids)."""
        ids = np.asarray(ids)
        pos = self._positions(ids.ravel()).reshape(ids.shape)
        return np.where(pos >= 0, self.labels[np.clip(pos, 0, None)], -1)

    def paths_of(self, ids) -> list:
        """Paths of the given ids (None where unknown or not stored)."""
        ids = np.asarray(ids)
        pos = self._positions(ids.ravel())
        out = [self.paths[p] if (self.paths is not None and p >= 0) else None for p in pos]
        if self.root:
            out = [  # root is an absolute, resolved directory: joining and normpath is exact
                os.path.normpath(Path(self.root) / q) if q and not Path(q).is_absolute() else q
                for q in out
            ]
        return np.asarray(out, dtype=object).reshape(ids.shape).tolist()

    def __repr__(self) -> str:
        extras = [x for x, v in (("labels", self.labels.size), ("paths", self.paths)) if v]
        return (
            f"EmbeddingIndex({len(self)} items, dim={self.dim}, metric={self.metric!r}, "
            f"kind={self.kind!r}, backend={self.backend!r}"
            + (f", with {' and '.join(extras)}" if extras else "")
            + ")"
        )

    # ------------------------------------------------------------------ persistence
    def save(self, directory, fingerprint: str | None = None) -> None:
        """Write the index to ``directory`` (files atomically, the manifest last)."""
        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create index directory {d}: {e}") from None
        if not os.access(d, os.W_OK):
            raise InputError(f"index directory {d} is not writable")
        if self.backend == "faiss":
            atomic_write_bytes(d / "index.faiss", faiss.serialize_index(self._index).tobytes())
            data_file = "index.faiss"
        else:
            self._save_npy(d / "vectors.npy", self._vectors)
            data_file = "vectors.npy"
        self._save_npy(d / "ids.npy", self.ids)
        self._save_npy(d / "labels.npy", self.labels)
        files = [data_file, "ids.npy", "labels.npy", "meta.json"]
        if self.postprocess.method != "none":
            self._save_npy(d / "raw.npy", self._raw)
            files.append("raw.npy")
        atomic_write_json(
            d / "meta.json", {"paths": self.paths, "classes": self.classes, "root": self.root}
        )
        write_manifest(
            d,
            files,
            format=FORMAT,
            dim=self.dim,
            metric=self.metric,
            kind=self.kind,
            backend=self.backend,
            count=len(self),
            fingerprint=fingerprint,
            nprobe=self.nprobe,
            pq_m=self.pq_m if self.kind == "ivfpq" else None,
            pq_bits=self.pq_bits if self.kind == "ivfpq" else None,
            quality=self.quality,
            postprocess=str(self.postprocess),
            faces=self.faces,
        )

    @staticmethod
    def _save_npy(path: Path, arr: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, directory, expected_fingerprint: str | None = None) -> EmbeddingIndex:
        """Load and verify an index written by :meth:`save`.

        Raises MissingFileError for a missing directory, manifest or listed file;
        FileFormatError naming the file for a bad manifest, a checksum mismatch (truncated or
        corrupted file) or data inconsistent with the manifest; InputError when
        ``expected_fingerprint`` is given and differs from the stored model fingerprint.
        Nothing is unpickled (``allow_pickle=False``, JSON metadata)."""
        d = Path(directory)
        man_path = d / "manifest.json"
        if not d.is_dir():
            raise MissingFileError(f"index directory not found: {d}")
        if not man_path.exists():
            raise MissingFileError(f"not an index directory (no manifest.json): {d}")
        man = read_manifest(man_path, format=FORMAT, what="index")
        try:
            dim, metric, kind = int(man["dim"]), str(man["metric"]), str(man["kind"])
            backend, count = str(man["backend"]), int(man["count"])
        except (ValueError, KeyError, TypeError) as e:
            raise FileFormatError(f"corrupt index manifest {man_path}: {e}") from None
        data_file = "index.faiss" if backend == "faiss" else "vectors.npy"
        try:
            post = parse_postprocess(str(man.get("postprocess") or "none"))
        except InputError as e:
            raise FileFormatError(f"corrupt index manifest {man_path}: {e}") from None
        needed = [data_file, "ids.npy", "labels.npy", "meta.json"]
        needed += ["raw.npy"] if post.method != "none" else []
        verify_files(d, man["files"], needed, what="index")
        fp = man.get("fingerprint")
        if expected_fingerprint is not None and fp != expected_fingerprint:
            raise InputError(
                f"the index in {d} was built with another model (fingerprint {str(fp)[:12]}…, "
                f"this model {expected_fingerprint[:12]}…); rebuild it with `tripletlab index`"
            )
        if backend == "faiss" and not HAVE_FAISS:
            raise missing_dependency("faiss", f"{d} (a faiss index)")
        try:
            index = cls(
                dim,
                metric=metric,
                kind=kind,
                backend=backend,
                nprobe=int(man.get("nprobe", 8)),
                pq_m=man.get("pq_m"),
                pq_bits=int(man.get("pq_bits") or 8),
                postprocess=post,
            )
            index.quality = man.get("quality")
            index.faces = man.get("faces") if isinstance(man.get("faces"), str) else None
        except (InputError, ValueError, TypeError) as e:
            raise FileFormatError(f"corrupt index manifest {man_path}: {e}") from None
        try:
            index.ids = np.load(d / "ids.npy", allow_pickle=False)
            index.labels = np.load(d / "labels.npy", allow_pickle=False)
            meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("meta.json must hold an object")
            index.paths, index.classes = meta.get("paths"), meta.get("classes")
            index.root = meta.get("root") if isinstance(meta.get("root"), str) else None
            if backend == "faiss":
                raw = np.frombuffer((d / "index.faiss").read_bytes(), dtype=np.uint8)
                index._index = faiss.deserialize_index(raw)
                n_vec, vdim = index._index.ntotal, index._index.d
            else:
                index._vectors = np.load(d / "vectors.npy", allow_pickle=False)
                if index._vectors.dtype != np.float32:
                    raise ValueError(f"vectors.npy has dtype {index._vectors.dtype}, not float32")
                n_vec, vdim = index._vectors.shape
            if post.method != "none":
                index._raw = np.load(d / "raw.npy", allow_pickle=False)
                if index._raw.dtype != np.float32 or index._raw.shape != (count, dim):
                    raise ValueError(
                        f"raw.npy holds {index._raw.shape} {index._raw.dtype}, not "
                        f"({count}, {dim}) float32"
                    )
        except (OSError, ValueError, RuntimeError) as e:
            raise FileFormatError(f"cannot read index in {d}: {e}") from None
        bad = []
        if (vdim, n_vec) != (dim, count):
            bad.append(f"{data_file} holds {n_vec} vectors of dim {vdim}")
        for name, arr in (("ids.npy", index.ids), ("labels.npy", index.labels)):
            if arr.shape != (count,) or arr.dtype != np.int64:
                bad.append(f"{name} has shape {arr.shape} and dtype {arr.dtype}")
        if index.paths is not None and (
            not isinstance(index.paths, list)
            or len(index.paths) != count
            or not all(isinstance(x, str) for x in index.paths)
        ):
            bad.append("meta.json paths are not a list of strings of the index's length")
        if not bad and np.unique(index.ids).size != count:
            bad.append("ids.npy holds duplicate ids")
        if not bad:
            bad += _content_problems(index, data_file)
        if bad:
            raise FileFormatError(
                f"index in {d} is inconsistent with its manifest ({count} x {dim}): "
                + "; ".join(bad)
            )
        return index

    @staticmethod
    def remove(directory) -> None:
        shutil.rmtree(directory, ignore_errors=True)


#: the faiss class each kind is stored as (a manifest naming another kind is a damaged index)
_DBA = ("dba", "dba+aqe")  # post-processings that change the stored vectors

_FAISS_CLASSES = {
    "flat": ("IndexFlatIP", "IndexFlatL2", "IndexFlat"),
    "hnsw": ("IndexHNSWFlat",),
    "ivf": ("IndexIVFFlat",),
    "ivfpq": ("IndexIVFPQ",),
}


def _content_problems(index: EmbeddingIndex, data_file: str) -> list[str]:
    """What a loaded index's files hold that no :meth:`EmbeddingIndex.save` writes: a faiss
    structure of another kind than the manifest's, or non-finite vectors (checked where the
    vectors are stored as such: numpy, faiss flat and hnsw)."""
    bad = []
    vectors = None
    if index.backend == "faiss":
        name = type(index._index).__name__
        if name not in _FAISS_CLASSES[index.kind]:
            bad.append(f"{data_file} holds a faiss {name}, not a {index.kind!r} index")
        elif index.kind in ("flat", "hnsw") and len(index):
            vectors = index._index.reconstruct_n(0, len(index))
    else:
        vectors = index._vectors
    if vectors is not None and not np.isfinite(vectors).all():
        bad.append(f"{data_file} holds NaN or infinite vectors")
    return bad


def search_quality(
    index: EmbeddingIndex, vectors, n_queries: int = 1000, k: int = 10, seed: int = 0
) -> dict[str, float | int]:
    """Recall@k of ``index`` against exact search over ``vectors`` (the indexed vectors, in
    insertion order) and the query latency, with up to ``n_queries`` of the vectors as queries.

    ``recall_at_k`` = mean over queries of |approximate top-k ids ∩ exact top-k ids| / k (1.0 for
    a flat index up to exact ties). Latencies are wall-clock milliseconds per query in one batch.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(300, 8)).astype("float32")
        >>> idx = EmbeddingIndex(8, metric="euclidean", kind="flat")
        >>> idx.add(x)
        >>> search_quality(idx, x, n_queries=50)["recall_at_k"]
        1.0
    """
    import time

    x = index._prep(as_matrix(vectors, index.dim, "vectors"))
    if x.shape[0] != len(index):
        raise InputError(f"{x.shape[0]} vectors for an index of {len(index)} items")
    if index.postprocess.method in _DBA:  # the structure holds the augmented vectors
        x = index._augmented(x)
    k = min(check_k(k), len(index))
    rng = np.random.default_rng(seed)
    pick = rng.choice(x.shape[0], size=min(n_queries, x.shape[0]), replace=False)
    q = x[pick]
    t0 = time.perf_counter()
    _, ids = index._search_base(index._prep(q), k)  # the structure's own quality
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, pos = _exact_search(q, x, k, index.metric)
    t_exact = time.perf_counter() - t0
    exact_ids = index.ids[pos]
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact_ids, strict=True))
    return {
        "k": k,
        "n_queries": len(pick),
        "recall_at_k": hits / (k * len(pick)),
        "ms_per_query": 1000 * t_index / len(pick),
        "exact_ms_per_query": 1000 * t_exact / len(pick),
    }
