"""Decode uploaded images safely: known formats only, bounded pixel count, complete files."""

from __future__ import annotations

import io

from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import InputError

__all__ = [
    "ALLOWED_FORMATS",
    "ImageRejected",
    "decode_image",
    "image_header",
    "thumbnail_png",
]

#: Pillow formats accepted from clients (no EPS/PDF/ICO oddities, nothing with a plugin zoo).
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "PPM", "TIFF", "WEBP")


class ImageRejected(InputError):
    """An upload that is not a usable image; ``status`` is the HTTP status to answer with.
    An :class:`~tripletlab.errors.InputError`, so every decode or conversion problem of an
    upload is one kind of error (answered with its own 4xx, never a 500)."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_image") -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _bomb(name: str, max_pixels: int) -> ImageRejected:
    # Pillow's own message names its limit (2x Image.MAX_IMAGE_PIXELS): name the one in force
    return ImageRejected(
        f"{name} declares more pixels than this server's limit of {max_pixels:,} pixels "
        "(a decompression bomb?); send a smaller image",
        413,
        "image_too_large",
    )


def _open(data: bytes, max_pixels: int, name: str) -> Image.Image:
    if not data:
        raise ImageRejected(f"{name} is empty", 400, "empty_upload")
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise _bomb(name, max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise ImageRejected(
            f"{name} is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})",
            400,
            "not_an_image",
        ) from None
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageRejected(f"{name} has no pixels ({w}x{h})", 400, "bad_image")
    if w * h > max_pixels:
        im.close()
        raise ImageRejected(
            f"{name} is {w}x{h} = {w * h:,} pixels, above this server's limit of "
            f"{max_pixels:,} pixels; send a smaller image",
            413,
            "image_too_large",
        )
    return im


def image_header(data: bytes, max_pixels: int, name: str = "image") -> tuple[int, int]:
    """``(width, height)`` from the header alone (no pixel decoded), or :class:`ImageRejected`
    as :func:`decode_image` would raise it for a bad header: what a request's pixel budget is
    checked with before anything is decoded.

    Example:
        >>> buf = io.BytesIO(); Image.new("L", (4, 3)).save(buf, "PNG")
        >>> image_header(buf.getvalue(), max_pixels=100)
        (4, 3)
    """
    im = _open(data, max_pixels, name)
    size = im.size
    im.close()
    return size


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode ``data`` into a loaded PIL image (first frame), or raise :class:`ImageRejected`.

    The header is read first: an image of more than ``max_pixels`` pixels (a decompression
    bomb: a few KB of PNG can declare 20,000 x 20,000 pixels) is rejected with 413 before any
    pixel is decoded. Truncated or corrupt files are rejected with 400; an image whose mode
    has no conversion to RGB or greyscale (e.g. a LAB TIFF) with 422 -- here, so that it fails
    its own request and never reaches the model's batch.

    Example:
        >>> buf = io.BytesIO(); Image.new("L", (4, 4)).save(buf, "PNG")
        >>> decode_image(buf.getvalue(), max_pixels=100).size
        (4, 4)
    """
    im = _open(data, max_pixels, name)
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        im.seek(0)
        im.load()
    except Image.DecompressionBombError:
        raise _bomb(name, max_pixels) from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageRejected(
            f"{name} is truncated or corrupt ({type(e).__name__}: {e})", 400, "corrupt_image"
        ) from None
    try:  # one pixel is enough to know whether the mode converts (the model takes L or RGB)
        corner = im.crop((0, 0, 1, 1))
        corner.convert("RGB")
        corner.convert("L")
    except (ValueError, OSError) as e:
        raise ImageRejected(
            f"{name} has image mode {im.mode}, which cannot be converted to RGB or greyscale "
            f"({e}); send an RGB or greyscale image",
            422,
            "unsupported_image_mode",
        ) from None
    return im


def thumbnail_png(im: Image.Image, size: int = 160) -> bytes:
    """A PNG thumbnail (longest side ``size``) that any browser shows (PGM/TIFF are not)."""
    t = im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode)
    t.thumbnail((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    t.save(buf, "PNG", optimize=False)
    return buf.getvalue()
