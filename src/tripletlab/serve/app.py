"""The FastAPI application: :func:`create_app` builds the shared
:class:`~tripletlab.serve.state.ServeState`, the middleware and the error handlers, and includes
the routers of :mod:`tripletlab.serve.routes`.

Use :func:`create_app` from Python (e.g. under any ASGI server) or ``tripletlab serve``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from .. import __version__
from .engine import load_embedder
from .http import (
    _BodyLimit,
    _DrainBody,
    _EarlyAuth,
    _MetricsMiddleware,
    _ReleasePixels,
    install_error_handlers,
)
from .routes import routers
from .state import ServeSettings, ServeState, check_settings, gallery_writer

__all__ = ["READ_TOKEN_ENV", "TOKEN_ENV", "ServeSettings", "create_app"]

log = logging.getLogger("tripletlab.serve")
TOKEN_ENV = "TRIPLETLAB_TOKEN"
READ_TOKEN_ENV = "TRIPLETLAB_READ_TOKEN"

APP_DESCRIPTION = (
    "Search, verification and open-set identification with a trained tripletlab run. "
    "Images are sent as multipart/form-data files; errors are JSON "
    '`{"error": {"code", "message"}}` with a 4xx status.'
)


def create_app(
    model: Any,
    index: str | Path | None = None,
    settings: ServeSettings | None = None,
    runtime: str = "torch",
    onnx_path: str | Path | None = None,
    threads: int = 0,
    postprocess: str = "auto",
    faces: str | None = "auto",
) -> FastAPI:
    """The FastAPI app serving ``model`` (a run directory, or an object with the
    :class:`~tripletlab.serve.engine.Embedder` interface) with the gallery in ``index`` (an
    index directory, created on the first enrolment; ``None``: in memory only). ``runtime``
    "onnx" serves ``onnx_path`` (default: the run exported at start-up) with onnxruntime using
    ``threads`` intra-op threads (0: its default); torch's threads are the process's.
    ``postprocess``: the retrieval post-processing of ``/search`` and ``/identify`` ("auto": the
    run's choice, see :meth:`~tripletlab.inference.Inference.use_postprocess`); a gallery
    directory built with another one is refused at start-up. ``faces``: detect and align the
    largest face of every posted photo first ("auto": the run's own ``train --faces``;
    "arcface" | "head" | None), see :meth:`~tripletlab.inference.Inference.use_faces`; the
    answers then carry the face's box, and a photo without a face is a 422.

    Example:
        >>> import uvicorn
        >>> from tripletlab.serve import create_app
        >>> app = create_app("runs/faces", index="gallery")  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    from PIL import Image

    s = settings or ServeSettings()
    check_settings(s)
    # Pillow refuses to decode more than 2x this many pixels; decode_image checks 1x first
    Image.MAX_IMAGE_PIXELS = s.max_pixels
    embedder = (
        load_embedder(model, runtime=runtime, onnx_path=onnx_path, threads=threads)
        if isinstance(model, (str, Path))
        else model
    )
    if hasattr(embedder, "use_postprocess"):
        embedder.use_postprocess(postprocess)
    if hasattr(embedder, "use_faces"):
        embedder.use_faces(faces)
    state = ServeState.for_embedder(embedder, index, s)
    app = FastAPI(
        title="tripletlab",
        version=__version__,
        description=APP_DESCRIPTION,
        lifespan=serving_lifespan(state),
        redoc_url=None,  # it loads its script from a CDN; /docs (Swagger UI) does too
    )
    app.state.serve = state
    app.state.embedder, app.state.store, app.state.settings = embedder, state.store, s
    app.state.metrics, app.state.batcher = state.metrics, state.batcher

    route_groups = routers(state)
    for router in route_groups:
        app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(_ReleasePixels, budget=state.pixels)
    app.add_middleware(_BodyLimit, max_bytes=s.max_upload_bytes)
    app.add_middleware(_EarlyAuth, settings=s)  # 401 before a byte of the body is read
    app.add_middleware(_DrainBody)  # ... and the rest of the upload dropped before an early answer
    # the metrics name a request rejected before routing by its path when that is a route's:
    # the routers' own routes too (recent FastAPI keeps an included router as one entry)
    known_routes = [*app.router.routes, *(r for router in route_groups for r in router.routes)]
    app.add_middleware(_MetricsMiddleware, metrics=state.metrics, routes=known_routes)
    return app


def serving_lifespan(
    state: ServeState,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: the micro-batcher's thread and the gallery writer run while the app
    does (the writer's queue is made here, on the server's event loop)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        state.changes = asyncio.Queue()
        task = asyncio.create_task(gallery_writer(state.store, state.changes))
        try:
            yield
        finally:
            task.cancel()
            state.batcher.stop()

    return lifespan
