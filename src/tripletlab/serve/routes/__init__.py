"""The server's routes, one ``APIRouter`` per concern, each built from the app's
:class:`~tripletlab.serve.state.ServeState`:

* :mod:`.page`: the web page at ``/``;
* :mod:`.service`: ``/healthz``, ``/info``, ``/metrics``;
* :mod:`.model`: ``/embed``, ``/search``, ``/verify``, ``/identify`` (model calls);
* :mod:`.gallery`: ``/gallery`` (list, enrol), ``/gallery/{id}`` (delete) and its thumbnail.

:func:`routers` lists them in the order the app includes them.
"""

from __future__ import annotations

from fastapi import APIRouter

from ..state import ServeState
from . import gallery, model, page, service

__all__ = ["routers"]


def routers(state: ServeState) -> list[APIRouter]:
    """The routers of an app serving ``state``, in the order of its routes."""
    return [
        page.build_router(),
        service.build_router(state),
        model.build_router(state),
        gallery.build_router(state),
    ]
