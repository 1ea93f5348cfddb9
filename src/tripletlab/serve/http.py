"""HTTP plumbing of the server: request-size limit, request metrics, JSON errors and bearer-token
dependencies (used by :func:`tripletlab.serve.app.create_app`)."""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import math
import threading
import time
from collections import defaultdict
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from ..errors import TripletLabError
from .images import ImageRejected

log = logging.getLogger("tripletlab.serve")


class _BodyLimit:
    """Reject request bodies above ``max_bytes`` with 413 (Content-Length or streamed), and
    bodies not complete within ``timeout_s`` of the request's start with 408 (a slow client
    trickling its upload)."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 60.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await _send_json(send, 413, _too_large(limit))
        seen = 0
        started = False
        body_done = False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive():
            nonlocal seen, body_done
            if body_done:  # e.g. waiting for a disconnect while the answer streams
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(
                    408, f"the request body did not arrive within {self.timeout_s:g} s"
                ) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, _too_large(limit)["error"]["message"])
                body_done = not msg.get("more_body", False)
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except HTTPException as e:
            if started or e.status_code not in (408, 413):
                raise
            body = _too_large(limit) if e.status_code == 413 else _err("timeout", str(e.detail))
            await _send_json(send, e.status_code, body)


class _DrainBody:
    """Read (and drop) what is left of a request body before an early answer goes out.

    A layer inside may answer before the body is read: a 413 from the Content-Length alone or
    mid-stream, a 401 before the body of an unauthenticated request is parsed. The server then
    closes the connection, and a socket closed with unread bytes in its buffer is *reset* by the
    kernel: a client still uploading gets "connection reset by peer" instead of the answer.
    Here, when the answer starts while the declared body is not complete, up to
    ``drain_bytes`` more are read within ``drain_s`` seconds and thrown away (nothing is
    parsed or kept; the lingering close of nginx and Apache does the same). A bigger or slower
    body is cut off as before.
    """

    def __init__(self, app, drain_bytes: int = 64 * 1024 * 1024, drain_s: float = 5.0) -> None:
        self.app, self.drain_bytes, self.drain_s = app, int(drain_bytes), float(drain_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"transfer-encoding", b"").lower() == b"chunked"
        try:
            declared = declared or int(headers.get(b"content-length", b"0")) > 0
        except ValueError:
            pass
        body_done = not declared

        async def tracking_receive():
            nonlocal body_done
            msg = await receive()
            if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
                body_done = True
            return msg

        async def draining_send(msg):
            nonlocal body_done
            if msg["type"] == "http.response.start" and not body_done:
                body_done = True
                await self._drain(receive)
            await send(msg)

        await self.app(scope, tracking_receive, draining_send)

    async def _drain(self, receive) -> None:
        dropped, deadline = 0, time.monotonic() + self.drain_s
        while dropped <= self.drain_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                msg = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                return
            if msg["type"] != "http.request":
                return
            dropped += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return


_RESERVED: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "tripletlab_reserved_pixels", default=None
)


class PixelBudget:
    """The decoded pixels of all requests in flight, bounded by ``limit``.

    :meth:`reserve` is called with a request's pixel count (from the image headers, before
    decoding) and raises a 503 HTTPException while the others already hold too much; the
    reservation is returned by :class:`_ReleasePixels` once the request's answer is sent
    (a request outside that middleware reserves nothing).

    Example:
        >>> b = PixelBudget(100)
        >>> b.in_use
        0
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.in_use, self.refused = int(limit), 0, 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> None:
        held = _RESERVED.get()
        if held is None or n <= 0:
            return
        with self._lock:
            if self.in_use and self.in_use + n > self.limit:
                self.refused += 1
                raise HTTPException(
                    503,
                    f"the server is busy decoding {self.in_use:,} pixels for other requests "
                    f"(limit {self.limit:,}); retry in a moment",
                    headers={"Retry-After": "1"},
                )
            self.in_use += n
        held.append(n)

    def release(self, n: int) -> None:
        with self._lock:
            self.in_use = max(0, self.in_use - n)


class _ReleasePixels:
    """Give back the pixels a request reserved in its :class:`PixelBudget` when it ends."""

    def __init__(self, app, budget: PixelBudget) -> None:
        self.app, self.budget = app, budget

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: list = []
        token = _RESERVED.set(held)
        try:
            await self.app(scope, receive, send)
        finally:
            _RESERVED.reset(token)
            self.budget.release(sum(held))


class _EarlyAuth:
    """With a token set, answer 401 to a request that has a body (POST, PUT, PATCH, DELETE)
    and no valid token *before* its body is read: FastAPI parses a multipart body before it
    runs the routes' token dependencies, so an unauthenticated client could otherwise make
    the server parse up to the upload limit. (Which token may do what stays with
    :func:`auth_dependencies`.)"""

    def __init__(self, app, settings: Any) -> None:
        self.app, self.s = app, settings

    async def __call__(self, scope, receive, send):
        s = self.s
        if (
            scope["type"] != "http"
            or s.token is None
            or scope.get("method") not in ("POST", "PUT", "PATCH", "DELETE")
        ):
            return await self.app(scope, receive, send)
        given = b""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, cred = v.partition(b" ")
                given = cred.strip() if scheme.lower() == b"bearer" else b""
        tokens = [t.encode() for t in (s.token, s.read_token) if t]
        if not given or not any(hmac.compare_digest(given, t) for t in tokens):
            body = _err(
                "unauthorized",
                "this server needs a bearer token: send 'Authorization: Bearer TOKEN'"
                if not given
                else "invalid token",
            )
            return await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


def _too_large(limit: int) -> dict:
    return _err("request_too_large", f"request body above this server's limit of {limit:,} bytes")


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _err(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


class _Metrics:
    """Request counts and latency per route template and status."""

    BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, math.inf)

    def __init__(self) -> None:
        self.started = time.time()
        self.count: dict[tuple[str, str, int], int] = defaultdict(int)
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.hist: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * len(self.BUCKETS))

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        self.count[(method, route, status)] += 1
        self.seconds[(method, route)] += seconds
        h = self.hist[(method, route)]
        for i, b in enumerate(self.BUCKETS):
            if seconds <= b:
                h[i] += 1
                break

    def snapshot(self) -> dict:
        routes: dict[str, Any] = {}
        for (m, r, s), n in sorted(self.count.items()):
            e = routes.setdefault(f"{m} {r}", {"requests": 0, "by_status": {}})
            e["requests"] += n
            e["by_status"][str(s)] = n
        for (m, r), secs in self.seconds.items():
            e = routes[f"{m} {r}"]
            e["latency_s_sum"] = secs
            e["latency_s_mean"] = secs / max(e["requests"], 1)
            h = self.hist[(m, r)]
            e["latency_s_histogram"] = {
                ("+Inf" if math.isinf(b) else f"{b:g}"): c
                for b, c in zip(self.BUCKETS, h, strict=True)
            }
            e["latency_s_p50_upper"] = self._quantile(h, 0.5)
            e["latency_s_p99_upper"] = self._quantile(h, 0.99)
        return {"uptime_s": time.time() - self.started, "routes": routes}

    def _quantile(self, h: list[int], q: float) -> float | None:
        total = sum(h)
        if not total:
            return None
        acc = 0
        for b, c in zip(self.BUCKETS, h, strict=True):
            acc += c
            if acc >= q * total:
                return None if math.isinf(b) else b
        return None


class _MetricsMiddleware:
    def __init__(self, app, metrics: _Metrics, routes) -> None:
        self.app, self.metrics, self._routes, self._known = app, metrics, routes, None

    def known_paths(self) -> set:
        if self._known is None:
            self._known = {getattr(r, "path", None) for r in self._routes}
        return self._known

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            if path is None:  # rejected before routing (e.g. by the body limit)
                path = scope["path"] if scope["path"] in self.known_paths() else "(unmatched)"
            self.metrics.record(scope["method"], path, status, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------- app


def install_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"error": {"code", "message"}}``: HTTP errors with their status,
    invalid requests 422 with the fields, rejected images with their own status, library
    errors 422, anything else 500 (logged)."""

    @app.exception_handler(HTTPException)
    async def _http_error(_req, e: HTTPException):
        code = {
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
            408: "timeout",
            409: "conflict",
            413: "request_too_large",
            415: "unsupported_media_type",
            422: "invalid_request",
            503: "busy",
        }.get(e.status_code, "bad_request")
        headers = getattr(e, "headers", None)
        return JSONResponse(_err(code, str(e.detail)), status_code=e.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, e: RequestValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{loc or 'request'}: {err.get('msg')}")
        body = _err("invalid_request", "; ".join(parts) or "invalid request")
        body["error"]["fields"] = [
            {"loc": [str(x) for x in err.get("loc", ())], "msg": err.get("msg")}
            for err in e.errors()
        ]
        return JSONResponse(body, status_code=422)

    @app.exception_handler(ImageRejected)
    async def _image_error(_req, e: ImageRejected):
        return JSONResponse(_err(e.code, str(e)), status_code=e.status)

    @app.exception_handler(TripletLabError)
    async def _lib_error(_req, e: TripletLabError):
        return JSONResponse(_err("invalid_input", str(e)), status_code=422)

    @app.exception_handler(Exception)
    async def _internal(_req, e: Exception):
        log.exception("internal error")
        return JSONResponse(_err("internal", f"{type(e).__name__}: {e}"), status_code=500)


def auth_dependencies(s: Any) -> tuple[list, list]:
    """FastAPI dependencies ``(read, write)`` for the settings' bearer tokens: with no
    ``s.token`` every route is open; ``s.read_token`` may read but not change the gallery."""
    bearer = HTTPBearer(auto_error=False, description="--token (all routes) or --read-token")

    def _check(cred: HTTPAuthorizationCredentials | None, write: bool) -> None:
        if s.token is None:
            return
        if cred is None or not cred.credentials:
            raise HTTPException(
                401,
                "this server needs a bearer token: send 'Authorization: Bearer TOKEN'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        given = cred.credentials.encode()
        if hmac.compare_digest(given, s.token.encode()):
            return
        if s.read_token and hmac.compare_digest(given, s.read_token.encode()):
            if write:
                raise HTTPException(
                    403, "this token may only read; changing the gallery needs the full token"
                )
            return
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})

    # (defaults, not Annotated: ``bearer`` is local and annotations are strings here)
    def read_auth(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        _check(cred, write=False)

    def write_auth(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        _check(cred, write=True)

    Read = [Depends(read_auth)]
    Write = [Depends(write_auth)]
    return Read, Write
