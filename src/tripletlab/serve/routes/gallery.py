"""Gallery routes: list the items, enrol images under a label, delete an item, and an item's
thumbnail. Every change goes through the app's one gallery writer
(:func:`tripletlab.serve.state.gallery_writer`)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..gallery import Enrolment, GalleryStore
from ..images import decode_image, thumbnail_png
from ..state import ServeState

__all__ = [
    "FORMAT_EXT",
    "MAX_CACHED_THUMBNAILS",
    "ItemId",
    "build_router",
    "gallery_listing",
    "make_thumbnail",
]

#: the file extension an enrolled image is stored under, by its decoded Pillow format
FORMAT_EXT = {
    "PNG": "png",
    "JPEG": "jpg",
    "GIF": "gif",
    "BMP": "bmp",
    "PPM": "pgm",
    "TIFF": "tif",
    "WEBP": "webp",
}
MAX_CACHED_THUMBNAILS = 4096  # the cache is emptied when it grows past this
#: a gallery id: ids are int64 on disk, so anything else is 422 before it reaches the index
ItemId = Annotated[int, Path(ge=0, le=2**63 - 1, description="a gallery item's id")]


def gallery_listing(store: GalleryStore, offset: int, limit: int) -> dict:
    """``GET /gallery``'s answer: the items from ``offset`` (at most ``limit``), the item count
    and the number of items per label (read under the store's lock)."""
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


def make_thumbnail(state: ServeState, item_id: int) -> bytes | None:
    """A PNG thumbnail of gallery item ``item_id``'s image (``None``: it has no readable
    file; ``KeyError``: no such item)."""
    s = state.settings
    data = state.store.image_bytes(item_id)
    if data is None:
        return None
    im = decode_image(data, s.max_pixels, f"gallery item {item_id}")
    return thumbnail_png(im, s.thumbnail_size)


def build_router(state: ServeState) -> APIRouter:
    """``GET /gallery`` and ``GET /gallery/{id}/image`` (read token), ``POST /gallery`` and
    ``DELETE /gallery/{id}`` (full token)."""
    router = APIRouter(tags=["gallery"])
    store, thumbs = state.store, state.thumbnails

    @router.get("/gallery", dependencies=state.read)
    async def list_gallery(
        offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> dict:
        """Gallery items (id, label, path) and the number of items per label."""
        return await run_in_threadpool(gallery_listing, store, offset, limit)

    @router.post("/gallery", dependencies=state.write, status_code=201)
    async def enrol(
        images: Annotated[list[UploadFile], File(description="one or more images")],
        label: Annotated[str | None, Form(max_length=200)] = None,
    ) -> dict:
        """Enrol images under a label (without one, each image under its file name: an
        unlabelled gallery, the file is the id); answered once the gallery is safely on disk."""
        names = None
        if label is None:
            names = [(f.filename or f"image[{i}]").strip() for i, f in enumerate(images)]
        else:
            label = label.strip()
            if not label:
                raise HTTPException(422, "label must be non-empty printable text")
        for name in names or [label]:
            if not name or any(ord(c) < 32 for c in name):
                raise HTTPException(422, "label must be non-empty printable text")
        decoded = await state.read_images(images, "images")
        e = await state.embed_images([im for im, _ in decoded])
        futs = []
        for i, ((im, data), row) in enumerate(zip(decoded, e, strict=True)):
            ext = FORMAT_EXT.get(im.format or "", "img")
            lab = names[i] if names is not None else label
            futs.append(await state.queue_change(Enrolment(row, lab, data, ext)))
        results = await asyncio.gather(*futs)
        bad = [r for r in results if isinstance(r, Exception)]
        if bad:
            raise HTTPException(422, f"enrolment failed: {bad[0]}")
        return {
            "ids": results,
            "label": label if names is None else names,
            "gallery_size": len(store),
        }

    @router.delete("/gallery/{item_id}", dependencies=state.write)
    async def delete(item_id: ItemId) -> dict:
        """Remove one gallery item."""
        r = await (await state.queue_change(item_id))
        thumbs.pop(item_id, None)
        if isinstance(r, KeyError):
            raise HTTPException(404, f"no gallery item with id {item_id}")
        if isinstance(r, Exception):
            raise HTTPException(422, str(r))
        return {"deleted": item_id, "gallery_size": len(store)}

    @router.get("/gallery/{item_id}/image", dependencies=state.read)
    async def gallery_image(item_id: ItemId) -> Response:
        """A PNG thumbnail of a gallery item's image (when its file is readable)."""
        if item_id not in thumbs:
            try:
                png = await run_in_threadpool(make_thumbnail, state, item_id)
            except KeyError:
                raise HTTPException(404, f"no gallery item with id {item_id}") from None
            if png is None:
                raise HTTPException(404, f"gallery item {item_id} has no image file")
            if len(thumbs) > MAX_CACHED_THUMBNAILS:
                thumbs.clear()
            thumbs[item_id] = png
        return Response(
            thumbs[item_id],
            media_type="image/png",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    return router
