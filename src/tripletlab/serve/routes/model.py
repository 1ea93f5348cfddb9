"""Routes that call the model: embeddings of images or vectors, gallery search, verification of
two images and open-set identification."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..state import ServeState

__all__ = [
    "EMBED_REQUEST_BODY",
    "build_router",
    "identification_answer",
    "images_from_form",
    "vectors_from_json",
    "verification_answer",
]

#: The OpenAPI request body of ``POST /embed``: images (multipart) or vectors (JSON)
EMBED_REQUEST_BODY = {
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

NO_THRESHOLD = "this run has no calibrated threshold; start the server with --threshold"


async def vectors_from_json(state: ServeState, request: Request) -> np.ndarray:
    """The rows of a JSON ``{"vectors": [[...], ...]}`` body as float32 ``(N, *input_shape)``,
    or the 413/422 that says what is wrong with it."""
    input_shape = state.embedder.input_shape
    if len(input_shape) == 3:
        raise HTTPException(422, "this model takes images: send multipart/form-data with 'images'")
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting
        raise HTTPException(422, "the body is not valid JSON (or is nested too deeply)") from None
    vec = body.get("vectors") if isinstance(body, dict) else None
    if not isinstance(vec, list) or not vec:
        raise HTTPException(422, 'send JSON {"vectors": [[...], ...]}')
    if len(vec) > state.settings.max_vectors:
        raise HTTPException(413, f"at most {state.settings.max_vectors} vectors per request")
    try:
        x = np.asarray(vec, dtype=np.float32)
    except (ValueError, TypeError, OverflowError, RecursionError):  # e.g. a 400-digit integer
        raise HTTPException(422, "vectors must be a list of lists of (float32) numbers") from None
    if x.ndim < 2 or list(x.shape[1:]) != list(input_shape):
        raise HTTPException(
            422,
            f"vectors of shape {list(x.shape[1:])} but the model takes {input_shape}",
        )
    if not np.isfinite(x).all():
        raise HTTPException(422, "vectors contain NaN or Inf")
    return x


async def images_from_form(state: ServeState, request: Request) -> list:
    """The decoded images of a multipart body's ``images`` field (repeatable)."""
    if len(state.embedder.input_shape) != 3:
        raise HTTPException(422, 'this model takes vectors: send JSON {"vectors": ...}')
    form = await request.form(max_files=state.settings.max_files + 1)
    files = form.getlist("images")
    if any(isinstance(f, str) for f in files):
        raise HTTPException(422, "'images' must be file uploads")
    decoded = await state.read_images(files, "images")  # type: ignore[arg-type]
    return [im for im, _ in decoded]


def verification_answer(state: ServeState, pair: np.ndarray) -> dict:
    """``POST /verify``'s answer for the embeddings ``(2, D)`` of two images: their distance,
    whether it passes the threshold, and the threshold's false-accept rate where recorded."""
    embedder, threshold = state.embedder, state.threshold
    d = float(embedder.distance_between(pair[:1], pair[1:])[0])
    ti = embedder.threshold_info or {}
    far = ti.get("far", ti.get("far_at_threshold"))
    return {
        "distance": d,
        "same": d <= threshold,
        "threshold": threshold,
        "far": far,
        # the calibration: target FAR and the FAR interval on the validation identities
        "target_far": ti.get("target_far"),
        "far_ci": ti.get("validation_far_ci"),
        "calibration_warning": ti.get("validation_warning"),
        "metric": embedder.distance,
        "threshold_info": embedder.threshold_info,
    }


def identification_answer(best: dict | None, threshold: float) -> dict:
    """``POST /identify``'s answer for the nearest gallery item ``best`` (``None``: the gallery
    is empty): its label if its distance passes ``threshold``, else "unknown"."""
    if best is None:
        return {
            "label": "unknown",
            "known": False,
            "id": None,
            "distance": None,
            "threshold": threshold,
        }
    known = bool(best["distance"] <= threshold)
    return {
        "label": best["label"] if known else "unknown",
        "known": known,
        "id": best["id"],
        "nearest_label": best["label"],
        "distance": best["distance"],
        "threshold": threshold,
    }


def build_router(state: ServeState) -> APIRouter:
    """``POST /embed``, ``/search``, ``/verify``, ``/identify`` (read token)."""
    router = APIRouter(tags=["model"], dependencies=state.read)
    s, embedder, store = state.settings, state.embedder, state.store
    threshold = state.threshold

    @router.post("/embed", openapi_extra={"requestBody": EMBED_REQUEST_BODY})
    async def embed(request: Request) -> dict:
        """Embeddings of uploaded images (multipart field `images`, repeatable; image models) or
        of input vectors (JSON `{"vectors": [[...], ...]}`; vector models)."""
        ctype = request.headers.get("content-type", "")
        faces = None
        if ctype.startswith("application/json"):
            x = await vectors_from_json(state, request)
            e = await state.batcher.submit("vectors", list(x))
        elif ctype.startswith("multipart/form-data"):
            images = await images_from_form(state, request)
            e, faces = await state.embed_images(images, with_faces=True)
        else:
            raise HTTPException(
                415, "send multipart/form-data with 'images' or JSON with 'vectors'"
            )
        out = {"embeddings": e.tolist(), "dim": int(e.shape[1]), "metric": embedder.distance}
        return {**out, "faces": faces} if faces is not None else out

    @router.post("/search")
    async def search(
        image: Annotated[UploadFile, File(description="the query image")],
        k: Annotated[int | None, Form(description="neighbours to return (5)")] = None,
    ) -> dict:
        """The k nearest gallery items of a query image: id, label, path, distance and whether
        the distance passes the verification threshold (`match`)."""
        k = state.bounded_k(min(5, s.max_k) if k is None else k)
        ((im, _),) = await state.read_images([image], "image")
        if len(store) == 0:
            raise HTTPException(409, "the gallery is empty: enrol images with POST /gallery")
        if s.all_faces and state.faces is not None:  # one result per face, the largest first
            e, faces = await state.embed_all_faces(im)
        else:
            e, faces = await state.embed_images([im], with_faces=True)
        dist, ids = await run_in_threadpool(store.search, e, k)
        out = {
            "k": k,
            "threshold": threshold,
            "metric": embedder.distance,
            "neighbours": state.hits(dist[0], ids[0]),
        }
        if faces and s.all_faces:
            per_face = [
                {"face": f, "neighbours": state.hits(dist[i], ids[i])} for i, f in enumerate(faces)
            ]
            return {**out, "face": faces[0], "faces": per_face}
        return {**out, "face": faces[0]} if faces else out

    @router.post("/verify")
    async def verify(
        image_a: Annotated[UploadFile, File()], image_b: Annotated[UploadFile, File()]
    ) -> dict:
        """Same identity or not: the distance of two images against the run's calibrated
        threshold (with the threshold's false-accept rate where the run recorded it)."""
        if threshold is None:
            raise HTTPException(409, NO_THRESHOLD)
        (a, _), (b, _) = await state.read_images([image_a, image_b], "image")
        e, faces = await state.embed_images([a, b], with_faces=True)
        out = verification_answer(state, e)
        return {**out, "faces": faces} if faces else out

    @router.post("/identify")
    async def identify(image: Annotated[UploadFile, File()]) -> dict:
        """Open-set identification: the label of the nearest gallery item if its distance passes
        the threshold, else "unknown"."""
        if threshold is None:
            raise HTTPException(409, NO_THRESHOLD)
        ((im, _),) = await state.read_images([image], "image")
        if len(store) == 0:
            return identification_answer(None, threshold)
        if s.all_faces and state.faces is not None:  # one answer per face, the largest first
            e, faces = await state.embed_all_faces(im)
        else:
            e, faces = await state.embed_images([im], with_faces=True)
        dist, ids = await run_in_threadpool(store.search, e, 1)
        answers = [
            {**identification_answer(state.hits(dist[i], ids[i])[0], threshold), "face": f}
            for i, f in enumerate(faces or [None])
        ]
        out = answers[0] if faces else {k: v for k, v in answers[0].items() if k != "face"}
        return {**out, "faces": answers} if faces and s.all_faces else out

    return router
