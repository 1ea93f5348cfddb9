"""The FastAPI application: search, verify, identify, embed and a gallery over a trained run.

Use :func:`create_app` from Python (e.g. under any ASGI server) or ``tripletlab serve``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import InputError
from ..inference.run import Inference
from ..validation import check_k
from .batching import BatchQueue
from .engine import load_embedder
from .gallery import Enrolment, GalleryStore
from .http import (
    _BodyLimit,
    _Metrics,
    _MetricsMiddleware,
    auth_dependencies,
    install_error_handlers,
)
from .images import decode_image, thumbnail_png

__all__ = ["ServeSettings", "create_app"]

log = logging.getLogger("tripletlab.serve")
TOKEN_ENV = "TRIPLETLAB_TOKEN"
READ_TOKEN_ENV = "TRIPLETLAB_READ_TOKEN"
_FORMAT_EXT = {
    "PNG": "png",
    "JPEG": "jpg",
    "GIF": "gif",
    "BMP": "bmp",
    "PPM": "pgm",
    "TIFF": "tif",
    "WEBP": "webp",
}


# The page loads nothing from elsewhere: its own inline script and style, thumbnails as blobs
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src 'self' blob:; connect-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


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
    max_k: int = 100
    max_files: int = 64  # images per /embed or /gallery request
    max_vectors: int = 1024  # rows per /embed vectors request
    max_batch: int = 64  # images per model call
    max_wait_ms: float = 2.0  # how long the batcher waits for more requests
    threshold: float | None = None  # overrides the run's calibrated threshold
    thumbnail_size: int = 160


# ---------------------------------------------------------------------------- middleware


def create_app(
    model: Any,
    index: str | Path | None = None,
    settings: ServeSettings | None = None,
    runtime: str = "torch",
    onnx_path: str | Path | None = None,
    threads: int = 0,
) -> FastAPI:
    """The FastAPI app serving ``model`` (a run directory, or an object with the
    :class:`~tripletlab.serve.engine.Embedder` interface) with the gallery in ``index`` (an
    index directory, created on the first enrolment; ``None``: in memory only). ``runtime``
    "onnx" serves ``onnx_path`` (default: the run exported at start-up) with onnxruntime using
    ``threads`` intra-op threads (0: its default); torch's threads are the process's.

    Example:
        >>> import uvicorn
        >>> from tripletlab.serve import create_app
        >>> app = create_app("runs/faces", index="gallery")  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    from PIL import Image

    s = settings or ServeSettings()
    for name in ("max_upload_bytes", "max_pixels", "max_k", "max_files", "max_batch"):
        v = getattr(s, name)
        if not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if s.token is not None and not s.token:
        raise InputError("the token must not be empty")
    if s.read_token and not s.token:
        raise InputError("a read-only token needs a full token too (--token)")
    # Pillow refuses to decode more than 2x this many pixels; decode_image checks 1x first
    Image.MAX_IMAGE_PIXELS = s.max_pixels
    embedder = (
        load_embedder(model, runtime=runtime, onnx_path=onnx_path, threads=threads)
        if isinstance(model, (str, Path))
        else model
    )
    threshold = s.threshold if s.threshold is not None else embedder.threshold
    runtime_name = getattr(embedder, "runtime", "torch")
    store = GalleryStore(index, embedder.embedding_dim, embedder.distance, embedder.fingerprint)
    batcher = BatchQueue(
        {
            "images": embedder.embed_images,
            "vectors": lambda rows: embedder.embed_vectors(np.stack(rows)),
        },
        max_batch=s.max_batch,
        max_wait_s=s.max_wait_ms / 1000.0,
    )
    metrics = _Metrics()
    writes: dict[str, Any] = {}

    async def writer() -> None:
        q: asyncio.Queue = writes["queue"]
        while True:
            first = await q.get()
            jobs = [first]
            while not q.empty():
                jobs.append(q.get_nowait())
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

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        writes["queue"] = asyncio.Queue()
        task = asyncio.create_task(writer())
        try:
            yield
        finally:
            task.cancel()
            batcher.stop()

    app = FastAPI(
        title="tripletlab",
        version=__version__,
        description=(
            "Search, verification and open-set identification with a trained tripletlab run. "
            "Images are sent as multipart/form-data files; errors are JSON "
            '`{"error": {"code", "message"}}` with a 4xx status.'
        ),
        lifespan=lifespan,
    )
    app.state.embedder, app.state.store, app.state.settings = embedder, store, s
    app.state.metrics, app.state.batcher = metrics, batcher

    install_error_handlers(app)
    app.add_middleware(_BodyLimit, max_bytes=s.max_upload_bytes)
    app.add_middleware(_MetricsMiddleware, metrics=metrics, routes=app.router.routes)

    Read, Write = auth_dependencies(s)

    # -------------------------------------------------------------- helpers
    async def read_images(files: list[UploadFile], what: str) -> list:
        if not files:
            raise HTTPException(422, f"send at least one image in '{what}'")
        if len(files) > s.max_files:
            raise HTTPException(413, f"at most {s.max_files} images per request")
        out = []
        for i, f in enumerate(files):
            if not hasattr(f, "read"):
                raise HTTPException(422, f"'{what}' must be a file upload")
            data = await f.read()
            name = f.filename or f"{what}[{i}]"
            im = await run_in_threadpool(decode_image, data, s.max_pixels, name)
            out.append((im, data))
        return out

    async def embed_images(images: list) -> np.ndarray:
        return await batcher.submit("images", images)

    def hits(dist: np.ndarray, ids: np.ndarray) -> list[dict]:
        """One query's neighbours as the CLI's `search` describes them, plus `match`."""
        with store.lock:
            rows = Inference.describe_neighbours(store.index, dist[None], ids[None])[0]
        return [
            {**h, "match": None if threshold is None else bool(h["distance"] <= threshold)}
            for h in rows
            if h["id"] >= 0  # approximate indexes may return fewer than k
        ]

    def bounded_k(k: int) -> int:
        k = check_k(k)  # a positive integer (validation.py), else 422
        if k > s.max_k:
            raise HTTPException(422, f"k must be between 1 and {s.max_k}, got {k}")
        return k

    # -------------------------------------------------------------- routes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("tripletlab.serve").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache", **_PAGE_HEADERS})

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict:
        """Liveness: no token needed, no model call."""
        return {"status": "ok", "version": __version__}

    @app.get("/info", tags=["service"], dependencies=Read)
    async def info() -> dict:
        """The model, its threshold and this server's limits (used by the page)."""
        return {
            "model": embedder.run_dir.name,
            "runtime": runtime_name,
            "input_shape": embedder.input_shape,
            "embedding_dim": embedder.embedding_dim,
            "distance": embedder.distance,
            "threshold": threshold,
            "threshold_info": embedder.threshold_info,
            "fingerprint": embedder.fingerprint,
            "gallery_size": len(store),
            "limits": {
                "max_upload_bytes": s.max_upload_bytes,
                "max_pixels": s.max_pixels,
                "max_k": s.max_k,
                "max_files": s.max_files,
            },
            "auth": s.token is not None,
        }

    @app.get("/metrics", tags=["service"], dependencies=Read)
    async def get_metrics() -> dict:
        """Request counts and latency per route and status, batching and gallery figures."""
        snap = metrics.snapshot()
        snap["batching"] = {
            "model_calls": batcher.batches,
            "items": batcher.items,
            "mean_batch": batcher.items / batcher.batches if batcher.batches else None,
        }
        snap["gallery"] = {"size": len(store), "version": store.version}
        return snap

    @app.post(
        "/embed",
        tags=["model"],
        dependencies=Read,
        openapi_extra={
            "requestBody": {
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "images": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                }
                            },
                            "required": ["images"],
                        }
                    },
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "vectors": {
                                    "type": "array",
                                    "items": {"type": "array", "items": {"type": "number"}},
                                }
                            },
                            "required": ["vectors"],
                        }
                    },
                }
            }
        },
    )
    async def embed(request: Request) -> dict:
        """Embeddings of uploaded images (multipart field `images`, repeatable; image models) or
        of input vectors (JSON `{"vectors": [[...], ...]}`; vector models)."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            if len(embedder.input_shape) == 3:
                raise HTTPException(
                    422, "this model takes images: send multipart/form-data with 'images'"
                )
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise HTTPException(422, "the body is not valid JSON") from None
            vec = body.get("vectors") if isinstance(body, dict) else None
            if not isinstance(vec, list) or not vec:
                raise HTTPException(422, 'send JSON {"vectors": [[...], ...]}')
            if len(vec) > s.max_vectors:
                raise HTTPException(413, f"at most {s.max_vectors} vectors per request")
            try:
                x = np.asarray(vec, dtype=np.float32)
            except (ValueError, TypeError):
                raise HTTPException(422, "vectors must be a list of lists of numbers") from None
            if x.ndim < 2 or list(x.shape[1:]) != list(embedder.input_shape):
                raise HTTPException(
                    422,
                    f"vectors of shape {list(x.shape[1:])} but the model takes "
                    f"{embedder.input_shape}",
                )
            if not np.isfinite(x).all():
                raise HTTPException(422, "vectors contain NaN or Inf")
            e = await batcher.submit("vectors", list(x))
        elif ctype.startswith("multipart/form-data"):
            if len(embedder.input_shape) != 3:
                raise HTTPException(422, 'this model takes vectors: send JSON {"vectors": ...}')
            form = await request.form(max_files=s.max_files + 1)
            files = form.getlist("images")
            if any(isinstance(f, str) for f in files):
                raise HTTPException(422, "'images' must be file uploads")
            decoded = await read_images(files, "images")  # type: ignore[arg-type]
            e = await embed_images([im for im, _ in decoded])
        else:
            raise HTTPException(
                415, "send multipart/form-data with 'images' or JSON with 'vectors'"
            )
        return {"embeddings": e.tolist(), "dim": int(e.shape[1]), "metric": embedder.distance}

    @app.post("/search", tags=["model"], dependencies=Read)
    async def search(
        image: Annotated[UploadFile, File(description="the query image")],
        k: Annotated[int | None, Form(description="neighbours to return (5)")] = None,
    ) -> dict:
        """The k nearest gallery items of a query image: id, label, path, distance and whether
        the distance passes the verification threshold (`match`)."""
        k = bounded_k(min(5, s.max_k) if k is None else k)
        ((im, _),) = await read_images([image], "image")
        if len(store) == 0:
            raise HTTPException(409, "the gallery is empty: enrol images with POST /gallery")
        e = await embed_images([im])
        dist, ids = await run_in_threadpool(store.search, e, k)
        return {
            "k": k,
            "threshold": threshold,
            "metric": embedder.distance,
            "neighbours": hits(dist[0], ids[0]),
        }

    @app.post("/verify", tags=["model"], dependencies=Read)
    async def verify(
        image_a: Annotated[UploadFile, File()], image_b: Annotated[UploadFile, File()]
    ) -> dict:
        """Same identity or not: the distance of two images against the run's calibrated
        threshold (with the threshold's false-accept rate where the run recorded it)."""
        if threshold is None:
            raise HTTPException(
                409, "this run has no calibrated threshold; start the server with --threshold"
            )
        (a, _), (b, _) = await read_images([image_a, image_b], "image")
        e = await embed_images([a, b])
        d = float(embedder.distance_between(e[:1], e[1:])[0])
        ti = embedder.threshold_info or {}
        far = ti.get("far", ti.get("far_at_threshold"))
        return {
            "distance": d,
            "same": d <= threshold,
            "threshold": threshold,
            "far": far,
            "metric": embedder.distance,
            "threshold_info": embedder.threshold_info,
        }

    @app.post("/identify", tags=["model"], dependencies=Read)
    async def identify(image: Annotated[UploadFile, File()]) -> dict:
        """Open-set identification: the label of the nearest gallery item if its distance passes
        the threshold, else "unknown"."""
        if threshold is None:
            raise HTTPException(
                409, "this run has no calibrated threshold; start the server with --threshold"
            )
        ((im, _),) = await read_images([image], "image")
        if len(store) == 0:
            return {
                "label": "unknown",
                "known": False,
                "id": None,
                "distance": None,
                "threshold": threshold,
            }
        e = await embed_images([im])
        dist, ids = await run_in_threadpool(store.search, e, 1)
        (best,) = hits(dist[0], ids[0])
        known = bool(best["distance"] <= threshold)
        return {
            "label": best["label"] if known else "unknown",
            "known": known,
            "id": best["id"],
            "nearest_label": best["label"],
            "distance": best["distance"],
            "threshold": threshold,
        }

    @app.get("/gallery", tags=["gallery"], dependencies=Read)
    async def list_gallery(
        offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> dict:
        """Gallery items (id, label, path) and the number of items per label."""

        def listing() -> dict:
            with store.lock:
                labels: dict[str, int] = defaultdict(int)
                for it in store.describe(store.index.ids):
                    labels[str(it["label"])] += 1
                return {
                    "count": len(store),
                    "offset": offset,
                    "items": store.items(offset, limit),
                    "labels": dict(labels),
                }

        return await run_in_threadpool(listing)

    @app.post("/gallery", tags=["gallery"], dependencies=Write, status_code=201)
    async def enrol(
        images: Annotated[list[UploadFile], File(description="one or more images")],
        label: Annotated[str, Form(min_length=1, max_length=200)],
    ) -> dict:
        """Enrol images under a label; answered once the gallery is safely on disk."""
        label = label.strip()
        if not label or any(ord(c) < 32 for c in label):
            raise HTTPException(422, "label must be non-empty printable text")
        decoded = await read_images(images, "images")
        e = await embed_images([im for im, _ in decoded])
        futs = []
        for (im, data), row in zip(decoded, e, strict=True):
            ext = _FORMAT_EXT.get(im.format or "", "img")
            fut = asyncio.get_running_loop().create_future()
            await writes["queue"].put((Enrolment(row, label, data, ext), fut))
            futs.append(fut)
        results = await asyncio.gather(*futs)
        bad = [r for r in results if isinstance(r, Exception)]
        if bad:
            raise HTTPException(422, f"enrolment failed: {bad[0]}")
        return {"ids": results, "label": label, "gallery_size": len(store)}

    @app.delete("/gallery/{item_id}", tags=["gallery"], dependencies=Write)
    async def delete(item_id: int) -> dict:
        """Remove one gallery item."""
        fut = asyncio.get_running_loop().create_future()
        await writes["queue"].put((item_id, fut))
        r = await fut
        thumbs.pop(item_id, None)
        if isinstance(r, KeyError):
            raise HTTPException(404, f"no gallery item with id {item_id}")
        if isinstance(r, Exception):
            raise HTTPException(422, str(r))
        return {"deleted": item_id, "gallery_size": len(store)}

    thumbs: dict[int, bytes] = {}

    @app.get("/gallery/{item_id}/image", tags=["gallery"], dependencies=Read)
    async def gallery_image(item_id: int) -> Response:
        """A PNG thumbnail of a gallery item's image (when its file is readable)."""
        if item_id not in thumbs:

            def make() -> bytes | None:
                data = store.image_bytes(item_id)
                if data is None:
                    return None
                im = decode_image(data, s.max_pixels, f"gallery item {item_id}")
                return thumbnail_png(im, s.thumbnail_size)

            try:
                png = await run_in_threadpool(make)
            except KeyError:
                raise HTTPException(404, f"no gallery item with id {item_id}") from None
            if png is None:
                raise HTTPException(404, f"gallery item {item_id} has no image file")
            if len(thumbs) > 4096:
                thumbs.clear()
            thumbs[item_id] = png
        return Response(
            thumbs[item_id],
            media_type="image/png",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    return app
