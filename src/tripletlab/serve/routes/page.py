"""The web page at ``/``: one self-contained file (``serve/static/index.html``) that loads
nothing from elsewhere."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

__all__ = ["PAGE_HEADERS", "build_router"]

#: The page loads nothing from elsewhere: its own inline script and style, thumbnails as blobs
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src 'self' blob:; connect-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def build_router() -> APIRouter:
    """``GET /``: the page (not in the OpenAPI schema; no token: it asks for one itself)."""
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("tripletlab.serve").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache", **PAGE_HEADERS})

    return router
