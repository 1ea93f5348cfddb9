"""Routes about the service itself: liveness, the model and limits, request metrics."""

from __future__ import annotations

from fastapi import APIRouter

from ... import __version__
from ..state import ServeState

__all__ = ["build_router"]


def build_router(state: ServeState) -> APIRouter:
    """``GET /healthz`` (open), ``GET /info`` and ``GET /metrics`` (read token)."""
    router = APIRouter(tags=["service"])
    s, embedder, store, batcher = state.settings, state.embedder, state.store, state.batcher

    @router.get("/healthz")
    async def healthz() -> dict:
        """Liveness: no token needed, no model call."""
        return {"status": "ok", "version": __version__}

    @router.get("/info", dependencies=state.read)
    async def info() -> dict:
        """The model, its threshold and this server's limits (used by the page)."""
        return {
            "model": embedder.run_dir.name,
            "runtime": state.runtime,
            "input_shape": embedder.input_shape,
            "embedding_dim": embedder.embedding_dim,
            "distance": embedder.distance,
            "threshold": state.threshold,
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

    @router.get("/metrics", dependencies=state.read)
    async def get_metrics() -> dict:
        """Request counts and latency per route and status, batching and gallery figures."""
        snap = state.metrics.snapshot()
        snap["batching"] = {
            "model_calls": batcher.batches,
            "items": batcher.items,
            "mean_batch": batcher.items / batcher.batches if batcher.batches else None,
        }
        snap["gallery"] = {"size": len(store), "version": store.version}
        return snap

    return router
