"""What every route of the server shares: :class:`ServeSettings` (the options) and
:class:`ServeState` (the model, the micro-batcher, the gallery and its single writer, the
metrics, the token dependencies), with the request helpers the routes have in common.

:func:`tripletlab.serve.app.create_app` builds one ``ServeState`` per app; each module of
:mod:`tripletlab.serve.routes` builds its ``APIRouter`` from it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import InputError
from ..inference.run import Inference
from ..validation import check_k
from .batching import BatchQueue
from .gallery import GalleryStore
from .http import PixelBudget, _Metrics, auth_dependencies
from .images import decode_image, image_header

__all__ = ["ServeSettings", "ServeState", "check_settings", "gallery_writer"]


@dataclass
class ServeSettings:
    """Server options (the ``tripletlab serve`` flags).

    ``token``: bearer token required on every API route (reads and writes) when set;
    ``read_token``: an extra token that may only read (search, verify, identify, embed, list).

    Example:
        >>> ServeSettings(token="s3cret", max_upload_bytes=2 * 1024 * 1024).max_k
        100
    """

    token: str | None = None
    read_token: str | None = None
    max_upload_bytes: int = 10 * 1024 * 1024  # whole request body
    max_pixels: int = 4096 * 4096  # per decoded image (decompression bombs)
    max_request_pixels: int = 4 * 4096 * 4096  # all images of one request, from their headers
    max_inflight_pixels: int = 16 * 4096 * 4096  # all requests being decoded or embedded
    max_k: int = 100
    max_files: int = 64  # images per /embed or /gallery request
    max_vectors: int = 1024  # rows per /embed vectors request
    max_batch: int = 64  # images per model call
    max_wait_ms: float = 2.0  # how long the batcher waits for more requests
    threshold: float | None = None  # overrides the run's calibrated threshold
    thumbnail_size: int = 160
    # with faces on (serve --faces): /search and /identify answer one result per face
    all_faces: bool = False


def check_settings(s: ServeSettings) -> None:
    """Raise :class:`~tripletlab.errors.InputError` for settings the server cannot run with.

    Example:
        >>> check_settings(ServeSettings(read_token="r"))
        Traceback (most recent call last):
        ...
        tripletlab.errors.InputError: a read-only token needs a full token too (--token)
    """
    for name in (
        "max_upload_bytes",
        "max_pixels",
        "max_request_pixels",
        "max_inflight_pixels",
        "max_k",
        "max_files",
        "max_batch",
    ):
        v = getattr(s, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    for name in ("token", "read_token"):
        v = getattr(s, name)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            # e.g. --token "$UNSET_VAR": an empty token must never mean "no authentication"
            raise InputError(f"the {name.replace('_', ' ')} must not be empty or blank")
    if s.threshold is not None and not np.isfinite(s.threshold):
        raise InputError(f"the threshold must be a finite number, got {s.threshold!r}")
    if s.read_token and not s.token:
        raise InputError("a read-only token needs a full token too (--token)")


@dataclass
class ServeState:
    """One app's shared objects. ``embedder`` has the
    :class:`~tripletlab.serve.engine.Embedder` interface; ``threshold`` is the verification
    distance in use (the settings' override, else the run's); ``runtime`` "torch" or "onnx";
    ``read`` / ``write`` are the
    route dependencies of the bearer tokens; ``changes`` is the gallery writer's queue (made in
    the app's lifespan, on its event loop); ``thumbnails`` caches PNGs by gallery id."""

    settings: ServeSettings
    embedder: Any
    store: GalleryStore
    batcher: BatchQueue
    threshold: float | None
    runtime: str = "torch"
    metrics: _Metrics = field(default_factory=_Metrics)
    read: list = field(default_factory=list)
    write: list = field(default_factory=list)
    changes: asyncio.Queue | None = None
    thumbnails: dict[int, bytes] = field(default_factory=dict)
    pixels: PixelBudget = field(default_factory=lambda: PixelBudget(16 * 4096 * 4096))

    @classmethod
    def for_embedder(cls, embedder: Any, index: Any, settings: ServeSettings) -> ServeState:
        """The state serving ``embedder`` with the gallery in ``index`` (``None``: in memory)."""
        store = GalleryStore(
            index,
            embedder.embedding_dim,
            embedder.distance,
            embedder.fingerprint,
            postprocess=getattr(embedder, "postprocess", "none"),
            faces=getattr(embedder, "faces", None),
        )
        faces = getattr(embedder, "faces", None)
        batcher = BatchQueue(
            {
                # with faces on, the routes detect first (one answer per request, the box in
                # it) and the batch embeds the aligned crops
                "images": (lambda ims: embedder.embed_images(ims, detect=False))
                if faces is not None
                else embedder.embed_images,
                "vectors": lambda rows: embedder.embed_vectors(np.stack(rows)),
            },
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
        )
        read, write = auth_dependencies(settings)
        threshold = settings.threshold if settings.threshold is not None else embedder.threshold
        return cls(
            settings,
            embedder,
            store,
            batcher,
            threshold=threshold,
            runtime=getattr(embedder, "runtime", "torch"),
            read=read,
            write=write,
            pixels=PixelBudget(settings.max_inflight_pixels),
        )

    # -------------------------------------------------------------- request helpers
    async def read_images(self, files: list[UploadFile], what: str) -> list:
        """Decode uploaded files (off the event loop) into ``[(PIL image, bytes), ...]``;
        422 for no file or a non-file, 413 above ``max_files`` or, from the headers alone
        before any pixel is decoded, above ``max_request_pixels`` in all; 503 while the
        requests in flight already hold ``max_inflight_pixels`` (released when this request's
        answer is sent, see :class:`~tripletlab.serve.http.PixelBudget`)."""
        s = self.settings
        if not files:
            raise HTTPException(422, f"send at least one image in '{what}'")
        if len(files) > s.max_files:
            raise HTTPException(413, f"at most {s.max_files} images per request")
        uploads = []
        for i, f in enumerate(files):
            if not hasattr(f, "read"):
                raise HTTPException(422, f"'{what}' must be a file upload")
            uploads.append((await f.read(), f.filename or f"{what}[{i}]"))

        def headers() -> list[tuple[int, int]]:
            return [image_header(data, s.max_pixels, name) for data, name in uploads]

        sizes = await run_in_threadpool(headers)
        total = sum(w * h for w, h in sizes)
        if total > s.max_request_pixels:
            raise HTTPException(
                413,
                f"the {len(sizes)} image(s) of this request hold {total:,} pixels in all, above "
                f"this server's limit of {s.max_request_pixels:,} pixels per request; send "
                "fewer or smaller images",
            )
        self.pixels.reserve(total)  # 503 when busy; released after the answer is sent

        def decode() -> list:
            return [(decode_image(data, s.max_pixels, name), data) for data, name in uploads]

        return await run_in_threadpool(decode)

    @property
    def faces(self) -> str | None:
        """The face template applied to posted photos (``--faces``), or None."""
        return getattr(self.embedder, "faces", None)

    async def embed_images(self, images: list, with_faces: bool = False):
        """Embeddings of decoded images, through the micro-batcher. With faces on (the run's
        ``--faces`` or ``serve --faces``) each image's largest face is detected and aligned
        first (off the event loop; no face: an InputError, answered 422).
        ``with_faces``: return ``(embeddings, faces)``, ``faces`` a list of ``{"box": [x1, y1,
        x2, y2], "score"}`` per image (None with faces off)."""
        faces = None
        if self.faces is not None:
            found = await run_in_threadpool(self.embedder.face_crops, images)
            images = [crop for crop, _ in found]
            faces = [
                {"box": [round(float(v), 1) for v in f.box], "score": round(f.score, 4)}
                for _, f in found
            ]
        e = await self.batcher.submit("images", images)
        return (e, faces) if with_faces else e

    async def embed_all_faces(self, image) -> tuple[np.ndarray, list[dict]]:
        """``serve --faces --all-faces``: the embeddings (F, D) of every face of one image,
        the largest first, and their ``{"box", "score"}``; no face: an InputError (422)."""
        found = await run_in_threadpool(self.embedder.face_crops_all, image)
        faces = [
            {"box": [round(float(v), 1) for v in f.box], "score": round(f.score, 4)}
            for _, f in found
        ]
        return await self.batcher.submit("images", [c for c, _ in found]), faces

    def hits(self, dist: np.ndarray, ids: np.ndarray) -> list[dict]:
        """One query's neighbours as the CLI's `search` describes them, plus `match`."""
        store, threshold = self.store, self.threshold
        with store.lock:
            rows = Inference.describe_neighbours(store.index, dist[None], ids[None])[0]
        return [
            {**h, "match": None if threshold is None else bool(h["distance"] <= threshold)}
            for h in rows
            if h["id"] >= 0  # approximate indexes may return fewer than k
        ]

    def bounded_k(self, k: int) -> int:
        """``k`` checked: a positive integer (else 422) of at most ``max_k`` (else 422)."""
        k = check_k(k)  # a positive integer (validation.py), else 422
        if k > self.settings.max_k:
            raise HTTPException(422, f"k must be between 1 and {self.settings.max_k}, got {k}")
        return k

    async def queue_change(self, change: Any) -> asyncio.Future:
        """Hand a gallery change (an ``Enrolment`` or an id to delete) to the single writer;
        the returned future gets the change's result (see :meth:`GalleryStore.apply`)."""
        if self.changes is None:
            raise RuntimeError("the gallery writer runs in the app's lifespan, not started yet")
        fut = asyncio.get_running_loop().create_future()
        await self.changes.put((change, fut))
        return fut


async def gallery_writer(store: GalleryStore, changes: asyncio.Queue) -> None:
    """The gallery's one writer: apply whatever changes are waiting in one
    :meth:`GalleryStore.apply` (one persist), off the event loop, and resolve their futures;
    an error of the whole batch goes to every waiting request. Runs until cancelled."""
    while True:
        first = await changes.get()
        jobs = [first]
        while not changes.empty():
            jobs.append(changes.get_nowait())
        try:
            results = await run_in_threadpool(store.apply, [c for c, _ in jobs])
        except BaseException as e:  # noqa: BLE001 - every waiting request gets it
            for _, fut in jobs:
                if not fut.done():
                    fut.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            continue
        for (_, fut), r in zip(jobs, results, strict=True):
            if not fut.done():
                fut.set_result(r)
