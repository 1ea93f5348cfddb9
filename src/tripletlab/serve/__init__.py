"""HTTP service over a trained run: search, verify, identify, embed, a gallery and a web page.

Needs the ``serve`` extra (``pip install 'tripletlab[serve]'``: FastAPI, uvicorn,
python-multipart, onnxruntime). ``tripletlab serve --model RUN_DIR`` runs it; from Python::

    from tripletlab.serve import create_app
    app = create_app("runs/faces", index="gallery")   # any ASGI server can run `app`

What lives where: ``app.py`` (:func:`create_app`: builds the state, middleware, error handlers
and includes the routers), ``state.py`` (:class:`ServeSettings`, the shared ``ServeState`` and
the gallery writer), ``routes/`` (one ``APIRouter`` per concern: page, service, model,
gallery), ``http.py`` (body limit, metrics, JSON errors, bearer tokens), ``batching.py``,
``gallery.py``, ``images.py``, ``engine.py`` (the ``Embedder`` protocol, :func:`load_embedder`).
The ONNX runtime (:class:`OnnxInference`) lives with the export in
:mod:`tripletlab.inference.onnx`: serve imports inference, never the other way round.
"""

from __future__ import annotations

from .app import ServeSettings, create_app
from .engine import Embedder, OnnxInference, load_embedder

__all__ = [
    "Embedder",
    "OnnxInference",
    "ServeSettings",
    "create_app",
    "load_embedder",
    "run_server",
]


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted (one process, one event loop).

    Example:
        >>> run_server(create_app("runs/faces"), port=8000)  # doctest: +SKIP
    """
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
