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


def run_server(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    max_connections: int = 256,
    header_timeout_s: float = 10.0,
    keep_alive_s: float = 5.0,
) -> None:
    """Run ``app`` with uvicorn until interrupted (one process, one event loop).

    The port is bound first, so a port in use or out of range is an
    :class:`~tripletlab.errors.InputError` (the CLI: a message, exit 1). Slow clients are
    bounded: a connection must send its complete request headers within ``header_timeout_s``
    (else it is closed), an idle keep-alive connection is closed after ``keep_alive_s``, and
    above ``max_connections`` open connections new requests get 503 (uvicorn's
    ``limit_concurrency``); the body's own deadline is :class:`.http._BodyLimit`'s.

    Example:
        >>> run_server(create_app("runs/faces"), port=8000)  # doctest: +SKIP
    """
    import socket

    import uvicorn

    from ..errors import InputError
    from .server import header_timeout_protocol

    if not 0 < port < 65536:
        raise InputError(f"port must be between 1 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, *_, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        limit_concurrency=max_connections,
        timeout_keep_alive=int(keep_alive_s),
        http=header_timeout_protocol(header_timeout_s),
    )
    uvicorn.Server(config).run(sockets=[sock])
